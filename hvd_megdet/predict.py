"""Predict and draw: run a trained detector on images and write each one with its detections drawn.

    python -m hvd_megdet.predict --config configs/demo_shapes.yaml model.weights=output/demo/checkpoints/model_0000600.pth \
        --input photo.jpg photos/ data/shapes/annotations/instances_val.json --output output/predictions
    horovodrun -np 2 -H localhost:2 python -m hvd_megdet.predict ...     # each rank takes a shard of the images

Inputs: image files; folders (their files with an image extension, sorted, not recursive); COCO instances
files (*.json): their images, from --image-dir, or from the config's data.val.images / data.train.images when
the file is the config's annotation file of that split, with the ground truth drawn beside the predictions.
Images are prepared as for evaluation (decoded by OpenCV, resized to the test size by the data pipeline), so
the detections of the config's validation file are those `hvd_megdet.evaluate` scores.

Writes `<output>/<image file name>.png` for each image: the detections scoring at least --score-threshold with
their category names and scores (and, for a COCO input, the ground truth in another colour to the right), and
`<output>/predictions.json`: every detection the model returns, in COCO results format ({"image_id",
"category_id", "bbox" [x, y, width, height] in image pixels, "score"}, plus the image's "file_name"). Images
that are not from a COCO file get ids after the largest id of the COCO inputs, 1, 2, ... when there is none.

Category names come from the checkpoint. A checkpoint saved without them falls back to the categories of the
config's annotation files, with a warning. An input that cannot be used (missing, unreadable, not an image, too
many pixels to decode safely) is named in a warning and skipped; gray, RGBA and 16-bit images are read as 8-bit
RGB, as in training.
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchvision.ops import box_convert

from hvd_megdet import dist
from hvd_megdet.categories import differences, model_categories
from hvd_megdet.checkpoint import write_atomic
from hvd_megdet.cli import command_parser, exit_on_user_error
from hvd_megdet.config import ConfigError, inference_min_size, load_config
from hvd_megdet.data import CocoDetection, DatasetError, InferenceShard, build_transforms
from hvd_megdet.data.coco import read_rgb
from hvd_megdet.data.transforms import image_to_tensor
from hvd_megdet.engine import inference
from hvd_megdet.inference import inference_model, start_inference
from hvd_megdet.logs import warn, warn_once
from hvd_megdet.visualize import PREDICTION_COLOUR, TRUTH_COLOUR, draw_boxes, save_png, side_by_side

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_NO_BOXES = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}


@dataclass
class Entry:
    """One image to predict: its file, COCO image id and output name; for an image of a COCO file, that
    file's dataset (no transforms) and the image's index in it."""
    path: str
    image_id: int
    name: str = ""
    dataset: CocoDetection | None = None
    index: int = -1


def _coco_images(ann_file, cfg, image_dir):
    """The folder of the images of COCO file `ann_file`: `image_dir` if given, else the config's images of the
    split whose annotation file it is."""
    if image_dir:
        return image_dir
    for split in (cfg.data.val, cfg.data.train):
        if split.annotations and Path(split.annotations).resolve() == ann_file.resolve():
            return split.images
    raise DatasetError(f"{ann_file}: pass --image-dir, the folder of its images (it is not the config's "
                       "data.val or data.train annotation file)")


def list_images(paths, cfg, image_dir=None, categories=None, report=warn):
    """The Entries of `paths` (see the module docstring), in order; the same on every rank. A COCO file that
    cannot be used, or a folder without images, is reported and left out; a COCO file whose categories differ
    from `categories` (the model's) is reported and kept. Files that do not exist are kept: reading them names
    them."""
    coco_entries, files = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                report(f"{path}: no image files ({' '.join(IMAGE_SUFFIXES)}) in this folder; skipped")
            files += found
        elif path.suffix.lower() == ".json":
            try:
                dataset = CocoDetection(_coco_images(path, cfg, image_dir), str(path), keep_empty=True)
            except DatasetError as e:
                report(f"{e}; skipped")
                continue
            if categories is not None and differences(categories, dataset.categories):
                report(f"{path}: its categories differ from the model's; ground truth and predictions are named "
                       "by their own")
            coco_entries += [Entry(dataset.image_path(i), int(image_id), dataset=dataset, index=i)
                             for i, image_id in enumerate(dataset.image_ids)]
        else:
            files.append(path)
    first_id = max((e.image_id for e in coco_entries), default=0) + 1
    entries = coco_entries + [Entry(str(p), first_id + k) for k, p in enumerate(files)]
    taken = set()
    for e in entries:  # output names: the file's name, made unique by the image id when taken
        stem = Path(e.path).stem
        e.name = stem if stem not in taken else f"{stem}_{e.image_id}"
        taken.add(e.name)
    return entries


def check_pixels(path):
    """DatasetError naming `path` if its header declares more pixels than Pillow agrees to decode (its
    decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 million); reads the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            PIL.Image.open(path).close()
    except PIL.Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: too large to decode safely ({e})") from None
    except (OSError, ValueError):
        pass  # missing, or not an image Pillow knows: read_rgb tells which


def read_entry(entry):
    """(image uint8 HWC RGB as on disk, ground truth {"boxes" xyxy, "labels"} or None); DatasetError naming
    the file when it cannot be used."""
    check_pixels(entry.path)
    if entry.dataset is None:
        return read_rgb(entry.path), None
    image, truth = entry.dataset[entry.index]  # no transforms: the image on disk and its boxes
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy()), truth


def detect(model, image, image_id, transform, device, label_to_cat_id, amp="off"):
    """The detections of uint8 HWC RGB `image` in COCO results format, in its pixels: resized by `transform`
    (the data pipeline's test transform), then as evaluation infers (`engine.inference`)."""
    resized, _ = transform(image, _NO_BOXES)
    target = {"image_id": image_id, "size": resized.shape[:2], "orig_size": image.shape[:2]}
    results, _ = inference(model, [((image_to_tensor(resized),), (target,))], device, label_to_cat_id, amp)
    return results


def drawing(image, results, names, score_threshold, truth=None, truth_names=()):
    """uint8 CHW `image` with the `results` (COCO results of this image) scoring at least `score_threshold`
    drawn and labelled "name score" (`names`: category id -> name); with `truth`, a second panel to the right
    with the ground-truth boxes and their names (`truth_names`: label -> name) in another colour."""
    kept = [r for r in results if r["score"] >= score_threshold]
    boxes = box_convert(torch.tensor([r["bbox"] for r in kept]).reshape(-1, 4), "xywh", "xyxy")
    drawn = draw_boxes(image, boxes, [f"{names[r['category_id']]} {r['score']:.2f}" for r in kept],
                       PREDICTION_COLOUR)
    if truth is None:
        return drawn
    truth_drawn = draw_boxes(image, truth["boxes"], [truth_names[i] for i in truth["labels"].tolist()],
                             TRUTH_COLOUR)
    return side_by_side(drawn, truth_drawn)


def predict(cfg, inputs, output, score_threshold=0.5, image_dir=None, max_images=0):
    """Predict and draw `inputs` (paths) into folder `output` (module docstring), the first `max_images` of
    them (0 = all); returns this rank's number of images drawn. Collective: under horovodrun every rank calls
    it; rank 0 writes predictions.json."""
    device = start_inference(cfg, "predict")
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot create the folder ({e.strerror})") from None
    categories = model_categories(cfg, warn_once)
    label_to_cat_id = [-1] + [c["id"] for c in categories]
    names = {c["id"]: c["name"] for c in categories}
    model = inference_model(cfg, len(label_to_cat_id), device)
    transform = build_transforms(False, [inference_min_size(cfg.input)], cfg.input.max_size)
    entries = list_images(inputs, cfg, image_dir, categories, warn_once)[:max_images or None]

    results, drawn = [], 0
    for i in InferenceShard(len(entries), dist.rank(), dist.size()):
        entry = entries[i]
        try:
            image, truth = read_entry(entry)
        except DatasetError as e:
            warn(f"{e}; skipped")
            continue
        found = detect(model, image, entry.image_id, transform, device, label_to_cat_id, cfg.amp)
        for r in found:
            r["file_name"] = entry.path
        truth_names = entry.dataset.class_names if entry.dataset is not None else ()
        save_png(drawing(image_to_tensor(image), found, names, score_threshold, truth, truth_names),
                 output / f"{entry.name}.png")
        results += found
        drawn += 1
    # Horovod: every rank's detections and count to rank 0 (a rank with an empty shard takes part too).
    gathered = dist.gather_object((results, drawn), name="predict")
    if dist.is_main():
        merged = [r for part, _ in gathered for r in part]
        total = sum(n for _, n in gathered)
        write_atomic(output / "predictions.json", lambda f: f.write(json.dumps(merged).encode()))
        print(f"predictions of {total} of {len(entries)} images drawn in {output}/ "
              f"(score >= {score_threshold:g}); all {len(merged)} detections in {output / 'predictions.json'}")
    return drawn


def parse_args(argv=None):
    parser = command_parser(__doc__, config_help="YAML config file (the one the model was trained with)",
                            overrides_example="model.weights=CKPT")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders of them, COCO *.json files")
    parser.add_argument("--output", required=True, help="folder for the drawings and predictions.json")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw detections scoring at least this (predictions.json keeps them all)")
    parser.add_argument("--image-dir", help="folder of the images of the COCO *.json inputs (default: the "
                                            "config's, for its own annotation files)")
    parser.add_argument("--max-images", type=int, default=0, help="only the first N images of the inputs (0 = all)")
    args = parser.parse_intermixed_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.max_images < 0:
        parser.error(f"--max-images must be >= 0, got {args.max_images}")
    return args


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        predict(load_config(args.config, args.overrides), args.input, args.output, args.score_threshold,
                args.image_dir, args.max_images)


if __name__ == "__main__":
    main()
