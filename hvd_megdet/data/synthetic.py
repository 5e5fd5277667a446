"""A deterministic COCO-format dataset of shapes, small enough to train a detector on CPUs in minutes.

    python -m hvd_megdet.data.synthetic --out DIR [--num-train 600] [--num-val 100] [--seed 0]

writes DIR/train/*.jpg, DIR/val/*.jpg, DIR/annotations/instances_{train,val}.json. Each image (long side
160-200 px, landscape or portrait, aspect 0.6-1) has a textured background (gradient, stripes or smooth
noise) and 1-5 filled shapes of 16-80 px whose category is their shape: disc, rectangle, triangle, cross,
with the non-contiguous COCO category ids 1, 3, 7, 12 (so the label <-> id mapping is exercised). Colours
are drawn far from the background's and from each other; shapes may overlap partly, never mostly; about 5%
of the images have no object and no annotation. Boxes are the shapes' exact extents (pixel-edge
coordinates, as COCO), areas their geometric areas. Image ids are 1.. in train and 100001.. in val, so that
an index/id mix-up cannot go unnoticed. Image i of a split depends only on (seed, split, i): the same
arguments give byte-identical files.
"""
import argparse
import json
import math
import os
import time

import cv2
import numpy as np

CATEGORIES = ((1, "disc"), (3, "rectangle"), (7, "triangle"), (12, "cross"))
SPLITS = {"train": 1, "val": 100001}  # split -> first image id
EMPTY_FRACTION = 0.05
MIN_OBJECT, MAX_OBJECT = 16, 80  # box side range, pixels
SUPERSAMPLE = 8  # anti-aliasing: coverage measured on an 8 x 8 grid per pixel


def _background(rng, h, w):
    """float32 [h, w, 3]: a gradient, stripes or smooth noise between two nearby colours; also returns them."""
    c0 = rng.uniform(30, 225, 3)
    c1 = np.clip(c0 + rng.uniform(-60, 60, 3), 0, 255)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    kind = rng.integers(3)
    if kind == 0:
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    elif kind == 1:
        t = 0.5 + 0.5 * np.sin(along * (2 * math.pi / rng.uniform(6, 30)))
    else:
        coarse = rng.random((h // 16 + 2, w // 16 + 2)).astype(np.float32)
        t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    return c0 + t[..., None] * (c1 - c0), (c0, c1)


def _object_colour(rng, background_colours, object_colours):
    """A colour at least 110 (RGB distance) from both background colours and 80 from the other objects'."""
    while True:
        colour = rng.uniform(0, 255, 3)
        if (all(np.linalg.norm(colour - c) >= 110 for c in background_colours)
                and all(np.linalg.norm(colour - c) >= 80 for c in object_colours)):
            return colour


def _shape(rng, name, w, h):
    """One shape of category `name` inside a w x h image: (polygon [k, 2] float x, y in pixel-edge
    coordinates, box [x0, y0, x1, y1], area)."""
    size = rng.uniform(MIN_OBJECT, min(MAX_OBJECT, w, h))
    if name == "disc":  # a 72-gon: its extremes (angles 0, 90, ...) are exact
        angles = np.arange(72) * (2 * math.pi / 72)
        poly, area = size / 2 * np.stack([1 + np.cos(angles), 1 + np.sin(angles)], 1), math.pi * size**2 / 4
    elif name == "triangle":
        angles = rng.uniform(0, 2 * math.pi) + np.array([0, 2, 4]) * math.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        poly = np.stack([np.cos(angles), np.sin(angles)], 1)
        poly = (poly - poly.min(0)) * (size / np.ptp(poly, 0).max())
        x, y = poly[:, 0], poly[:, 1]
        area = 0.5 * abs(x[0] * (y[1] - y[2]) + x[1] * (y[2] - y[0]) + x[2] * (y[0] - y[1]))
    else:
        bw, bh = size, float(np.clip(size * rng.uniform(0.6, 1.5), MIN_OBJECT, min(MAX_OBJECT, h)))
        if name == "rectangle":
            poly, area = np.array([[0, 0], [bw, 0], [bw, bh], [0, bh]]), bw * bh
        else:  # cross: a horizontal and a vertical bar of thickness t
            t = rng.uniform(0.28, 0.4) * min(bw, bh)
            x0, y0 = (bw - t) / 2, (bh - t) / 2
            x1, y1 = x0 + t, y0 + t
            poly = np.array([[x0, 0], [x1, 0], [x1, y0], [bw, y0], [bw, y1], [x1, y1],
                             [x1, bh], [x0, bh], [x0, y1], [0, y1], [0, y0], [x0, y0]])
            area = (bw + bh - t) * t
    extent = poly.max(0)
    offset = np.array([rng.uniform(0, w - extent[0]), rng.uniform(0, h - extent[1])])
    return poly + offset, np.concatenate([offset, offset + extent]), area


def _mostly_overlaps(box, boxes):
    """True if `box` covers more than 40% of, or is more than 40% covered by, any of `boxes`."""
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        smaller = min(np.prod(box[2:] - box[:2]), np.prod(other[2:] - other[:2]))
        if iw > 0 and ih > 0 and iw * ih > 0.4 * smaller:
            return True
    return False


def _draw(image, poly, colour):
    """Blend `colour` into `image` (uint8) by the fraction of each pixel that `poly` (pixel-edge
    coordinates) covers, measured on a SUPERSAMPLE-times finer grid: anti-aliased, and the shape's extent is
    its box to within 1 / SUPERSAMPLE px (cv2's AA fill would spill over by about half a pixel)."""
    h, w = image.shape[:2]
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = min(math.ceil(poly[:, 0].max()), w), min(math.ceil(poly[:, 1].max()), h)
    fine = np.zeros(((y1 - y0) * SUPERSAMPLE + 1, (x1 - x0) * SUPERSAMPLE + 1), np.uint8)
    # cv2 puts pixel centres at integers, hence -0.5; 4 fractional bits of vertex precision.
    pts = np.round(((poly - (x0, y0)) * SUPERSAMPLE - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(fine, [pts], 255, cv2.LINE_8, 4)
    # fillPoly includes the last column of each run and the last row (hence the canvas' extra row and
    # column): take them off again.
    fine = cv2.erode(fine, np.ones((2, 2), np.uint8), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT,
                     borderValue=0)[:-1, :-1]
    alpha = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)[..., None] / 255.0
    region = image[y0:y1, x0:x1]
    region[:] = np.round(region * (1 - alpha) + np.asarray(colour) * alpha)


def make_image(rng):
    """One image: (uint8 [h, w, 3] BGR, [(category_id, box xyxy, area), ...])."""
    long_side = int(rng.integers(160, 201))
    short_side = round(long_side * rng.uniform(0.6, 1.0))
    h, w = (short_side, long_side) if rng.random() < 0.5 else (long_side, short_side)
    background, background_colours = _background(rng, h, w)
    image = background.round().astype(np.uint8)
    objects, colours = [], []
    num_objects = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, 6))
    for _ in range(num_objects):
        cat_id, name = CATEGORIES[rng.integers(len(CATEGORIES))]
        for _attempt in range(20):
            poly, box, area = _shape(rng, name, w, h)
            if not _mostly_overlaps(box, [o[1] for o in objects]):
                colours.append(_object_colour(rng, background_colours, colours))
                _draw(image, poly, colours[-1])
                objects.append((cat_id, box, area))
                break
    noise = rng.normal(0, rng.uniform(3, 10), image.shape)
    return np.clip(image + noise, 0, 255).round().astype(np.uint8), objects


def make_split(out_dir, split, num_images, seed):
    """Write out_dir/split/*.jpg and out_dir/annotations/instances_split.json; returns (image dir, json)."""
    image_dir = os.path.join(out_dir, split)
    ann_file = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = SPLITS[split] + i
        image, objects = make_image(np.random.default_rng([seed, SPLITS[split], i]))
        file_name = f"{image_id:06d}.jpg"
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        jpeg.tofile(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for cat_id, box, area in objects:
            x0, y0, x1, y1 = (round(float(v), 2) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id,
                                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                                "area": round(area, 2), "iscrowd": 0})
    coco = {"info": {"description": f"hvd_megdet synthetic shapes, {split}, seed {seed}"},
            "images": images, "annotations": annotations,
            "categories": [{"id": cat_id, "name": name, "supercategory": "shape"} for cat_id, name in CATEGORIES]}
    with open(ann_file, "w") as f:
        json.dump(coco, f)
    return image_dir, ann_file


def make_dataset(out_dir, num_train=600, num_val=100, seed=0):
    """Write the train and val splits under out_dir; returns {"train": (image_dir, ann_file), "val": ...}."""
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return {"train": make_split(out_dir, "train", num_train, seed),
            "val": make_split(out_dir, "val", num_val, seed)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits = make_dataset(args.out, args.num_train, args.num_val, args.seed)
    for split, (image_dir, ann_file) in splits.items():
        print(f"{split}: images in {image_dir}, annotations in {ann_file}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
