"""Benchmark of the training data pipeline against torchvision's detection reference, on the same files.

    python -m hvd_megdet.bench.data [--images 64] [--rounds 3] [--workers 0] [--json OUT]

Generates --images COCO-like 640x480 JPEGs (smooth-noise background, 3-8 filled rectangles and discs, JPEG
quality 90) and their COCO JSON in a temporary directory, then times, image by image, pipelines that
resize to short side 800 / long side <= 1333 (here 1067x800; torchvision floors to 1066) and flip with
probability 0.5, the image with its boxes:
  - hvd_megdet: CocoDetection + build_transforms(True, [800], 1333) (cv2 decode, albumentations resize and
    flip), returning a uint8 CHW image that `engine.to_device` turns into float [0, 1] on the device; the
    model then only normalizes.
  - hvd_megdet_float32: the same, converting to float32 [0, 1] in the loader (hvd_megdet before the uint8
    change), to show what the transfer of 4x the bytes costs.
  - torchvision: references/detection/presets.py DetectionPresetTrain(data_augmentation="hflip") with the
    v2 API (torchvision CocoDetection + wrap_dataset_for_transforms_v2, PIL decode, RandomHorizontalFlip,
    ToImage, ToDtype(float, scale=True), SanitizeBoundingBoxes, ToPureTensor), then the resize that
    GeneralizedRCNNTransform does inside torchvision's model (GeneralizedRCNNTransform(800, 1333).resize:
    bilinear interpolate of the float image, boxes scaled), included because our pipeline does it in the
    loader and the model skips it: both sides then cost the same work.
Per worker: one process, torch at 1 thread (what a DataLoader worker gets); the pipelines take turns every
--chunk images for --rounds rounds, so load changes hit all alike; images/s is total images / total time
per pipeline. --workers K > 0 also times a DataLoader with K workers per pipeline (batch 2, the same
files), up to float images in the main process: each batch goes through `engine.to_device` (CPU here).
Prints a table and writes JSON.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 480


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="JPEGs to generate")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images per pipeline")
    parser.add_argument("--chunk", type=int, default=8, help="images per turn")
    parser.add_argument("--workers", type=int, default=0, help="also time DataLoaders with this many workers")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or args.chunk < 1 or args.workers < 0:
        parser.error("--images, --rounds and --chunk must be >= 1 and --workers >= 0")
    return args


def make_jpegs(out_dir, num_images, seed=0):
    """Write num_images 640x480 JPEGs and a COCO JSON (one category per shape kind) under out_dir;
    returns (image dir, annotation file)."""
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        coarse = rng.uniform(0, 255, (HEIGHT // 32, WIDTH // 32, 3)).astype(np.float32)
        image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, WIDTH - 40)), int(rng.integers(0, HEIGHT - 40))
            w, h = int(rng.integers(20, min(200, WIDTH - x0))), int(rng.integers(20, min(200, HEIGHT - y0)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                cv2.rectangle(image, (x0, y0), (x0 + w - 1, y0 + h - 1), colour, -1)
                cat = 1
            else:
                w = h = min(w, h)
                cv2.circle(image, (x0 + w // 2, y0 + h // 2), w // 2, colour, -1, cv2.LINE_AA)
                cat = 2
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        file_name = f"{image_id:06d}.jpg"
        cv2.imwrite(os.path.join(image_dir, file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH})
    ann_file = os.path.join(out_dir, "instances.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "disc"}]}, f)
    return image_dir, ann_file


class TorchvisionReference:
    """torchvision's detection reference training pipeline (hflip preset, v2 API) followed by the resize
    GeneralizedRCNNTransform applies in the model; dataset[i] -> (float CHW image, {"boxes", "labels"})."""

    def __init__(self, image_dir, ann_file, min_size=800, max_size=1333):
        import torch
        from torchvision import datasets
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        from torchvision.transforms import v2 as T

        preset = T.Compose([T.RandomHorizontalFlip(0.5), T.ToImage(), T.ToDtype(torch.float, scale=True),
                            T.SanitizeBoundingBoxes(), T.ToPureTensor()])
        self.dataset = datasets.wrap_dataset_for_transforms_v2(
            datasets.CocoDetection(image_dir, ann_file, transforms=preset), target_keys=("boxes", "labels"))
        self.resize = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).resize

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        return self.resize(image, target)


class Float32Images:
    """`dataset` with its uint8 images converted to float32 [0, 1] in the loader."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        return image.float().div_(255), target


def pipelines(image_dir, ann_file):
    """{name: dataset} of the pipelines on the same files."""
    from hvd_megdet.data import CocoDetection, build_transforms

    ours = CocoDetection(image_dir, ann_file, transforms=build_transforms(True, [800], 1333))
    return {"hvd_megdet": ours, "hvd_megdet_float32": Float32Images(ours),
            "torchvision": TorchvisionReference(image_dir, ann_file)}


def time_per_worker(datasets, rounds, chunk):
    """{name: images/s} of each dataset read in this process, the datasets taking turns every `chunk`
    indices (the starting one alternating), `rounds` passes over all indices."""
    n = len(next(iter(datasets.values())))
    spent = {name: 0.0 for name in datasets}
    for rnd in range(rounds):
        for turn, lo in enumerate(range(0, n, chunk)):
            names = list(datasets) if (rnd + turn) % 2 == 0 else list(datasets)[::-1]
            for name in names:
                start = time.perf_counter()
                for i in range(lo, min(lo + chunk, n)):
                    datasets[name][i]
                spent[name] += time.perf_counter() - start
    return {name: rounds * n / s for name, s in spent.items()}


def time_loaders(datasets, workers, rounds):
    """{name: images/s} through a DataLoader with `workers` workers (batch 2) and `engine.to_device` on the
    CPU, the pipelines taking turns per pass (the starting one rotating)."""
    import torch
    from torch.utils.data import DataLoader

    from hvd_megdet.data import collate
    from hvd_megdet.engine import to_device

    names = list(datasets)
    spent = {name: 0.0 for name in datasets}
    for rnd in range(rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            loader = DataLoader(datasets[name], batch_size=2, num_workers=workers, collate_fn=collate)
            start = time.perf_counter()
            for images, targets in loader:
                to_device(images, targets, torch.device("cpu"))
            spent[name] += time.perf_counter() - start
    return {name: rounds * len(ds) / spent[name] for name, ds in datasets.items()}


def workers_needed(gpu_images_per_s, worker_images_per_s, headroom=1.25):
    """Loader workers per GPU so that loading keeps up with `gpu_images_per_s` with `headroom` to spare:
    ceil(headroom * gpu rate / per-worker rate)."""
    return int(np.ceil(headroom * gpu_images_per_s / worker_images_per_s))


# Training images/s per GPU of Faster R-CNN R50-FPN at 800x1333, 2 images per GPU: detectron2's MODEL_ZOO.md
# gives 0.210 s/iter for faster_rcnn_R_50_FPN_1x on 8 V100 (16 images) -> 9.5 images/s per GPU. The A100
# figure is an assumption (about 2.5x a V100 with AMP), as is H100 (about 2x an A100).
GPU_RATES = {"V100 (detectron2 model zoo)": 9.5, "A100 AMP (assumed)": 24.0, "H100 AMP (assumed)": 48.0}


def format_table(result):
    """Markdown table of images/s per pipeline and the ratio, then workers per GPU."""
    per_worker = result["per_worker"]
    lines = [" ".join(f"{k}={v}" for k, v in result["meta"].items()),
             "| pipeline | images/s per worker | x torchvision |" + "".join(
                 f" workers/GPU, {gpu} |" for gpu in GPU_RATES),
             "|---|---|---|" + "---|" * len(GPU_RATES)]
    for name, rate in per_worker.items():
        lines.append(f"| {name} | {rate:.1f} | {rate / per_worker['torchvision']:.2f} |"
                     + "".join(f" {workers_needed(g, rate)} |" for g in GPU_RATES.values()))
    for name, rate in result.get("loader", {}).items():
        lines.append(f"| {name}, DataLoader {result['meta']['workers']} workers | {rate:.1f} (total) | "
                     f"{rate / result['loader']['torchvision']:.2f} |" + " |" * len(GPU_RATES))
    return "\n".join(lines)


def run(args):
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker
    cv2.setNumThreads(1)  # ditto; a worker's cv2 would otherwise start a thread pool per process
    with tempfile.TemporaryDirectory() as tmp:
        datasets = pipelines(*make_jpegs(tmp, args.images))
        for ds in datasets.values():  # warm the page cache and lazy imports
            ds[0]
        result = {"per_worker": time_per_worker(datasets, args.rounds, args.chunk)}
        if args.workers:
            result["loader"] = time_loaders(datasets, args.workers, args.rounds)
    result["meta"] = {"images": args.images, "rounds": args.rounds, "workers": args.workers,
                      "size": f"{WIDTH}x{HEIGHT} -> 1067x800", "loadavg_1m": round(os.getloadavg()[0], 1)}
    return result


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(format_table(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
