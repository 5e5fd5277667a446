"""Classification samples cut from a COCO detection set: the data of `hvd_megdet.pretrain`.

Every annotated object is one sample, labelled by its category (1..K); each image also gives one background
sample (label 0), a square that barely touches any object, its side within the objects' range (5th to 95th
percentile of their longer sides). A sample is a square around the box, `context`
times its longer side added on each side, resized to `crop_size` pixels: the aspect ratio of the object is
kept, and the part outside the image is reflected. Training samples are jittered in scale and position and
flipped, each as a pure function of its seed (`reseed`, as the detection transforms), so the train loader's
sharding and seeding serve crops unchanged.
"""
import math
import random

import cv2
import numpy as np
import torch

from .coco import CocoDetection
from .transforms import image_to_tensor

# A background square and an object's box overlap by at most this fraction of the smaller of the two.
BACKGROUND_MAX_OVERLAP = 0.1


def background_box(rng, width, height, boxes, min_side, max_side, tries=20):
    """A square [x0, y0, x1, y1] inside the image whose overlap with each of `boxes` is at most
    BACKGROUND_MAX_OVERLAP of the smaller of the two (so neither holds much of the other), its side drawn in
    [min_side, max_side]; None if `tries` draws fail."""
    max_side = min(max_side, width, height)
    if max_side < min_side:
        return None
    for _ in range(tries):
        side = rng.uniform(min_side, max_side)
        x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
        ix = np.clip(np.minimum(x0 + side, boxes[:, 2]) - np.maximum(x0, boxes[:, 0]), 0, None)
        iy = np.clip(np.minimum(y0 + side, boxes[:, 3]) - np.maximum(y0, boxes[:, 1]), 0, None)
        smaller = np.minimum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), side * side)
        if not len(boxes) or (ix * iy / smaller).max() <= BACKGROUND_MAX_OVERLAP:
            return np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32)
    return None


class CropTransform:
    """(image uint8 HWC, box xyxy) -> crop uint8 [crop_size, crop_size, 3]: the square of side
    (1 + 2 context) x the box's longer side around its centre; with `train`, that side scaled by
    [0.8, 1.25], the centre moved by up to 10% of it, and a horizontal flip with probability 0.5."""

    def __init__(self, crop_size, context, train):
        self.crop_size, self.context, self.train = crop_size, context, train
        self.rng = random.Random(0)

    def reseed(self, seed):
        """Make the following calls a deterministic function of `seed`."""
        self.rng = random.Random(seed)

    def __call__(self, image, box):
        x0, y0, x1, y1 = (float(v) for v in box)
        side = max(x1 - x0, y1 - y0) * (1 + 2 * self.context)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if self.train:
            side *= math.exp(self.rng.uniform(math.log(0.8), math.log(1.25)))
            cx, cy = cx + self.rng.uniform(-0.1, 0.1) * side, cy + self.rng.uniform(-0.1, 0.1) * side
        scale = self.crop_size / side
        flip = self.train and self.rng.random() < 0.5
        sx = -scale if flip else scale
        # The affine map taking the square's corner (cx - side/2, cy - side/2) to (0, 0), mirrored if flipped.
        matrix = np.array([[sx, 0, (self.crop_size if flip else 0) - sx * (cx - side / 2)],
                           [0, scale, -scale * (cy - side / 2)]], dtype=np.float64)
        return cv2.warpAffine(image, matrix, (self.crop_size, self.crop_size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)


class ObjectCrops(torch.utils.data.Dataset):
    """The crops of the COCO set (`image_dir`, `ann_file`): `dataset[i]` -> (uint8 [3, crop_size, crop_size],
    {"labels": int64 [1]}), label 0 for background, 1..K for the categories in id order (as the detector's
    labels). Background squares are drawn once, from `seed`.

    Attributes: `num_classes` (K + 1), `class_names`, `aspect_ratios` (all 1: for the train sampler),
    `counts` {class name: samples}."""

    def __init__(self, image_dir, ann_file, crop_size, context=0.25, train=True, seed=0):
        self.detection = CocoDetection(image_dir, ann_file, keep_empty=True)
        self.transforms = CropTransform(crop_size, context, train)
        self.num_classes = len(self.detection.label_to_cat_id)
        self.class_names = self.detection.class_names
        annotations = [self.detection.annotation(i) for i in range(len(self.detection))]
        samples = [(i, box, int(label)) for i, ann in enumerate(annotations)
                   for box, label in zip(ann["boxes"], ann["labels"])]  # (image index, box xyxy, label)
        sides = [max(x1 - x0, y1 - y0) for _, (x0, y0, x1, y1), _ in samples] or [min(
            min(ann["width"], ann["height"]) for ann in annotations) / 4]
        min_side, max_side = np.percentile(sides, [5, 95])
        rng = np.random.default_rng(seed)
        for i, ann in enumerate(annotations):
            background = background_box(rng, ann["width"], ann["height"], ann["boxes"], min_side, max_side)
            if background is not None:
                samples.append((i, background, 0))
        if not samples:
            raise ValueError(f"{ann_file}: no object and no background crop")
        self.samples = samples
        labels = np.array([label for _, _, label in samples])
        self.counts = {name: int((labels == k).sum()) for k, name in enumerate(self.class_names)}

    def __len__(self):
        return len(self.samples)

    @property
    def aspect_ratios(self):
        return np.ones(len(self.samples))

    def __getitem__(self, i):
        index, box, label = self.samples[i]
        crop = self.transforms(self.detection.read_image(index), box)
        return image_to_tensor(crop), {"labels": torch.tensor([label], dtype=torch.int64)}
