"""Box-aware augmentation with albumentations: shortest-side resize with a long-side cap, horizontal flip.

A transform is a callable `(image, target) -> (image, target)` as in torchvision's references/detection:
`image` is a uint8 HWC RGB numpy array, `target` a dict whose "boxes" (float32 [N, 4] xyxy pixels) and
"labels" (int64 [N]) are transformed together; other keys pass through unchanged. Conversion to a uint8 CHW
tensor (`image_to_tensor`) is the dataset's last step, so a dataset without transforms returns the same
types. Images stay uint8 until `engine.to_device` makes them float on the training device: a float32 image
is 4x the bytes through the loader workers' shared memory, which limited the loader (docs/performance.md).
There is no normalization here: the model's GeneralizedRCNNTransform normalizes, and it does not resize
again, so this resize is the only one.

Randomness comes from one numpy and one python generator shared by all steps; `reseed(seed)` replaces them,
which the train loader does per sample so that augmentation is a pure function of the sample's position in
the stream (identical after a resume, identical whatever the number of loader workers).
"""
import random

import albumentations as A
import numpy as np
import torch

# Boxes narrower or shorter than this many pixels are dropped (with their labels), in the dataset on the
# original image and here after every transform.
MIN_BOX_SIZE = 1.0


def resize_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """Scale factor that brings the short side of an h x w image to `min_size` unless the long side would
    then exceed `max_size` (MegDet / Detectron's 800/1333 rule): min(min_size / short, max_size / long).
    The output size is (round(h * scale), round(w * scale)); boxes follow the rounded size per axis.
    Annotated for TorchScript: the exported detector (hvd_megdet.export) resizes by this rule too."""
    return min(min_size / min(h, w), max_size / max(h, w))


class ShortestSideResize(A.SmallestMaxSize):
    """Resize so the short side is a size drawn uniformly from `min_sizes` (one fixed size when there is
    one) with the long side capped at `max_size`; see `resize_scale`. Image by cv2.resize (bilinear);
    boxes and masks follow albumentations' SmallestMaxSize, of which only the scale rule is replaced (no
    built-in transform of albumentations 2.0.8 combines a short-side target with a long-side cap)."""

    def __init__(self, min_sizes, max_size):
        super().__init__(max_size=list(min_sizes))
        self.long_side_max = max_size

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        return {"scale": resize_scale(h, w, self.py_random.choice(self.max_size), self.long_side_max)}


class DetectionTransforms:
    """(image uint8 HWC, target) -> (image uint8 HWC, target) through an albumentations Compose; boxes
    that end up narrower or shorter than MIN_BOX_SIZE pixels are dropped together with their labels."""

    def __init__(self, steps):
        self.aug = A.Compose(steps, bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], min_width=MIN_BOX_SIZE, min_height=MIN_BOX_SIZE))

    def reseed(self, seed):
        """Make the following calls a deterministic function of `seed` (one generator pair for all steps:
        seeding each step alike, as Compose.set_random_seed does, would correlate their draws)."""
        self.aug.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image, target):
        out = self.aug(image=image, bboxes=target["boxes"], labels=target["labels"])
        target = dict(target, boxes=np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
                      labels=np.asarray(out["labels"], dtype=np.int64))
        return out["image"], target


def build_transforms(train, min_sizes, max_size, flip_prob=0.5):
    """Train: shortest-side resize to a size drawn from `min_sizes` (multi-scale training when there are
    several), long side capped at `max_size`, then horizontal flip with probability `flip_prob`.
    Test: the same resize to the fixed size max(min_sizes), no flip."""
    min_sizes = tuple(min_sizes)
    if not min_sizes or not all(isinstance(s, int) and s > 0 for s in min_sizes):
        raise ValueError(f"min_sizes must be a non-empty sequence of positive ints, got {min_sizes!r}")
    if not (isinstance(max_size, int) and max_size > 0):
        raise ValueError(f"max_size must be a positive int, got {max_size!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
    if not train:
        return DetectionTransforms([ShortestSideResize((max(min_sizes),), max_size)])
    return DetectionTransforms([ShortestSideResize(min_sizes, max_size), A.HorizontalFlip(p=flip_prob)])


def image_to_tensor(image):
    """uint8 HWC RGB numpy array -> contiguous uint8 CHW tensor (`engine.to_device` scales it to [0, 1])."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
