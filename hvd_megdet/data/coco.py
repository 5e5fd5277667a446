"""COCO-format detection dataset (instances JSON + image folder) with a compact numpy index.

Box rules follow torchvision's references/detection (coco_utils.ConvertCocoPolysToMask): crowd boxes
(iscrowd=1) are dropped from the targets, boxes go from xywh to xyxy and are clipped to the image, and
degenerate boxes are dropped — here any box narrower or shorter than MIN_BOX_SIZE (1 px) after clipping
(torchvision's `_has_only_empty_bbox` uses 1 px too, to call an image empty). Detectron2 does the same
(crowd boxes out, clipped, empty boxes out). Category ids are mapped to contiguous labels 1..K in increasing id order, as
detectron2 does (torchvision keeps the raw ids); label 0 is the background of torchvision's Faster R-CNN.

Copy-on-read: DataLoader workers touching per-image Python objects would un-share their pages, so after
parsing, the index is a handful of numpy arrays (file names, sizes, ids, concatenated boxes and labels with
per-image offsets) and the pycocotools object is dropped.
"""
import contextlib
import io
import json
import os

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .transforms import MIN_BOX_SIZE, image_to_tensor


class DatasetError(ValueError):
    """A dataset file (annotations or image) that cannot be used; the message names the file."""


def load_coco(ann_file):
    """Parse a COCO instances JSON with pycocotools; ValueError naming the file if it is missing, is not
    JSON, lacks the "images", "annotations" and "categories" lists or their required keys, or repeats an
    id."""
    if not os.path.isfile(ann_file):
        raise DatasetError(f"{ann_file}: annotation file not found")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: not a JSON file ({e})") from None
    if not (isinstance(data, dict) and all(isinstance(data.get(k), list)
                                           for k in ("images", "annotations", "categories"))):
        raise DatasetError(f"{ann_file}: not a COCO instances file (needs 'images', 'annotations' and "
                         f"'categories' lists)")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{ann_file}: malformed COCO record (missing or bad key {e})") from None
    for key, index in (("images", coco.imgs), ("annotations", coco.anns), ("categories", coco.cats)):
        if len(index) != len(data[key]):
            raise DatasetError(f"{ann_file}: duplicate ids in '{key}'")
    return coco


def read_rgb(path):
    """The image file `path` as uint8 HWC RGB, decoded in its stored orientation (EXIF orientation ignored);
    gray, RGBA and 16-bit images become 8-bit RGB. DatasetError naming the file if it cannot be read or
    decoded."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image ({e.strerror})") from None
    # IMREAD_COLOR: gray, RGBA and 16-bit become 8-bit 3-channel.
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if buf.size else None
    if image is None:
        raise DatasetError(f"{path}: not a decodable image (corrupt, truncated or empty)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class CocoDetection(Dataset):
    """COCO detection dataset for torchvision's detection models.

    image_dir: folder holding the images' `file_name`s; ann_file: COCO instances JSON.
    transforms: callable (image uint8 HWC RGB, target) -> (image, target), e.g. `build_transforms`.
    keep_empty: keep images without a usable box (for validation: COCO evaluates every image); False drops
        them (training default of torchvision and detectron2).

    `dataset[i]` -> (image uint8 [3, H, W] RGB, target) with target "boxes" float32 [N, 4] xyxy
    in the returned image's pixels, "labels" int64 [N] in 1..K, "image_id" (COCO id, int), "orig_size"
    (h0, w0) on disk and "size" (h, w) returned. Images are decoded in their stored orientation (EXIF
    orientation ignored, as torchvision's PIL loading does): the JSON's width/height must match the decoded
    size, else ValueError naming the file. All bad input raises ValueError naming the file.

    Attributes: `label_to_cat_id` int64 [K + 1] (entry 0, background, is -1), `cat_id_to_label` dict,
    `class_names` tuple [K + 1] (entry 0 "__background__"), `aspect_ratios` float [len] width / height,
    `dropped` {"crowd boxes", "degenerate boxes", "images without a usable box": count} (the trainer logs it).

    Bad images: an image that cannot be read or decoded, or whose size differs from the JSON's, raises
    DatasetError naming the file when it is loaded; it is never replaced silently (the trainer stops every
    rank with that message; fix the file or drop it from the JSON, then resume).
    """

    def __init__(self, image_dir, ann_file, transforms=None, keep_empty=False):
        self.image_dir = image_dir
        self.ann_file = ann_file
        self.transforms = transforms
        coco = load_coco(ann_file)
        cats = sorted(coco.cats.values(), key=lambda c: c["id"])
        self.label_to_cat_id = np.array([-1] + [c["id"] for c in cats], dtype=np.int64)
        self.cat_id_to_label = {int(c): label for label, c in enumerate(self.label_to_cat_id) if label}
        self.class_names = ("__background__",) + tuple(str(c.get("name", c["id"])) for c in cats)

        names, ids, widths, heights, counts, boxes, labels = [], [], [], [], [], [], []
        self.dropped = {"crowd boxes": 0, "degenerate boxes": 0, "images without a usable box": 0}
        for img in sorted(coco.imgs.values(), key=lambda im: im["id"]):
            try:
                w, h, name = float(img["width"]), float(img["height"]), str(img["file_name"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{ann_file}: image record {img!r:.200} needs file_name, width and "
                                 f"height") from None
            if not (w >= 1 and h >= 1):
                raise DatasetError(f"{ann_file}: image {img['id']} has width/height {w}/{h}")
            anns = coco.imgToAnns.get(img["id"], [])
            img_boxes, img_labels = self._usable_boxes(anns, w, h)
            crowd = sum(1 for ann in anns if ann.get("iscrowd", 0))
            self.dropped["crowd boxes"] += crowd
            self.dropped["degenerate boxes"] += len(anns) - crowd - len(img_boxes)
            if not img_boxes and not keep_empty:
                self.dropped["images without a usable box"] += 1
                continue
            names.append(name.encode())
            ids.append(img["id"])
            widths.append(w)
            heights.append(h)
            counts.append(len(img_boxes))
            boxes.extend(img_boxes)
            labels.extend(img_labels)
        unknown_images = set(coco.imgToAnns) - set(coco.imgs)
        if unknown_images:
            raise DatasetError(f"{ann_file}: annotations refer to image ids absent from 'images', e.g. "
                             f"{sorted(unknown_images)[:5]}")
        if not ids:
            raise DatasetError(f"{ann_file}: no images left" + ("" if keep_empty else
                             " with a usable box (keep_empty=False drops the others)"))
        self._file_names = np.array(names, dtype=np.bytes_)
        self._image_ids = np.array(ids, dtype=np.int64)
        self._widths = np.array(widths, dtype=np.int32)
        self._heights = np.array(heights, dtype=np.int32)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        self._labels = np.array(labels, dtype=np.int64)

    def _usable_boxes(self, anns, w, h):
        """Non-crowd boxes of one image as xyxy clipped to (w, h), at least MIN_BOX_SIZE on each side,
        with their contiguous labels."""
        boxes, labels = [], []
        for ann in anns:
            if ann.get("iscrowd", 0):
                continue
            cat_id = ann.get("category_id")
            if cat_id not in self.cat_id_to_label:
                raise DatasetError(f"{self.ann_file}: annotation {ann.get('id')} has category_id {cat_id!r}, "
                                 f"absent from 'categories'")
            try:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{self.ann_file}: annotation {ann.get('id')} has no valid bbox "
                                 f"[x, y, width, height]: {ann.get('bbox')!r:.100}") from None
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if x1 - x0 >= MIN_BOX_SIZE and y1 - y0 >= MIN_BOX_SIZE:
                boxes.append((x0, y0, x1, y1))
                labels.append(self.cat_id_to_label[cat_id])
        return boxes, labels

    def __len__(self):
        return len(self._image_ids)

    @property
    def aspect_ratios(self):
        """float64 [len]: width / height of each image, as in the JSON."""
        return self._widths / self._heights

    @property
    def categories(self):
        """[{"id", "name"}, ...] of labels 1..K in order: what a checkpoint stores to name its detections."""
        return [{"id": int(cat_id), "name": name}
                for cat_id, name in zip(self.label_to_cat_id[1:], self.class_names[1:])]

    @property
    def image_ids(self):
        """int64 [len]: the COCO image id of each index."""
        return self._image_ids

    def image_path(self, i):
        return os.path.join(self.image_dir, self._file_names[i].decode())

    def read_image(self, i):
        """Image i as uint8 HWC RGB, checked against the JSON's size; ValueError naming the file."""
        path = self.image_path(i)
        image = read_rgb(path)
        h, w = image.shape[:2]
        h0, w0 = int(self._heights[i]), int(self._widths[i])
        if (h, w) != (h0, w0):
            hint = " (EXIF-rotated? the JSON has the rotated size)" if (h, w) == (w0, h0) else ""
            raise DatasetError(f"{path}: decoded size {w}x{h} differs from the annotation's {w0}x{h0}{hint}")
        return image

    def annotation(self, i):
        """Image i's usable boxes and labels without reading the image: {"boxes": float32 [N, 4] xyxy in the
        original image's pixels, "labels": int64 [N], "width", "height"} (copies)."""
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return {"boxes": self._boxes[lo:hi].copy(), "labels": self._labels[lo:hi].copy(),
                "width": int(self._widths[i]), "height": int(self._heights[i])}

    def __getitem__(self, i):
        image = self.read_image(i)
        ann = self.annotation(i)
        target = {"boxes": ann["boxes"], "labels": ann["labels"]}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image_to_tensor(image), {
            "boxes": torch.from_numpy(target["boxes"]), "labels": torch.from_numpy(target["labels"]),
            "image_id": int(self._image_ids[i]), "orig_size": (int(self._heights[i]), int(self._widths[i])),
            "size": tuple(image.shape[:2])}
