"""COCO bbox evaluation: model outputs -> COCO results -> COCOeval metrics -> files.

Pure functions of their inputs, no Horovod: each rank converts its own shard with `to_coco_results`, the
caller gathers the lists to rank 0, which calls `evaluate_bbox` and `write_eval`.
"""
import json
import math
from pathlib import Path

import torch
from pycocotools.cocoeval import COCOeval

from hvd_megdet.checkpoint import write_atomic

# COCOeval.stats[0:6], in this order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(outputs, targets, label_to_cat_id):
    """Convert detections of a batch to COCO results (list of dicts), in original image coordinates.

    outputs: the model's eval outputs, one dict per image: "boxes" [N, 4] xyxy in network-input pixels,
        "labels" [N] contiguous labels (1..K), "scores" [N].
    targets: the matching targets: "image_id" (int or 0-d/1-element tensor), "size" (h, w) of the
        network input and "orig_size" (h0, w0) of the image on disk.
    label_to_cat_id: mapping (or sequence) from contiguous label to COCO category id.

    Boxes are scaled back by w0 / w along x and h0 / h along y (the data pipeline resizes each axis by
    round(), so the two factors may differ slightly), clipped to the original image, and written as
    [x, y, width, height]. Returns [{"image_id", "category_id", "bbox", "score"}, ...] of python numbers.
    """
    results = []
    for out, tgt in zip(outputs, targets, strict=True):
        h, w = (float(v) for v in tgt["size"])
        h0, w0 = (float(v) for v in tgt["orig_size"])
        boxes = out["boxes"].detach().float().cpu() * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
        boxes[:, 2:] -= boxes[:, :2]
        image_id = int(tgt["image_id"])
        for box, label, score in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label_to_cat_id[label]),
                            "bbox": box, "score": float(score)})
    return results


def evaluate_bbox(coco_gt, results):
    """Run COCOeval (bbox) of `results` against `coco_gt` (a pycocotools COCO) and print the COCO table.

    Every image of coco_gt is evaluated, so an image without detections counts its objects as misses.
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent; a metric COCOeval cannot define (no
    ground truth in that size range, reported -1 by COCOeval) is NaN. Empty `results` -> all zeros (nothing
    was detected; pycocotools cannot load an empty result list). `results` is not modified (loadRes
    would add "area", "segmentation", ... to each dict).
    """
    unknown = sorted({r["image_id"] for r in results} - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"results name image ids absent from the ground truth, e.g. {unknown[:5]}")
    if not results:
        print("evaluate_bbox: no detections, all metrics are 0")
        return dict.fromkeys(METRICS, 0.0)
    coco_dt = coco_gt.loadRes([dict(r) for r in results])
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return {name: float(s * 100) if s >= 0 else float("nan") for name, s in zip(METRICS, coco_eval.stats[:6])}


def write_eval(output_dir, iteration, metrics, results):
    """Write an evaluation's files under `<output_dir>/eval/`, each atomically:

        detections_<iteration>.json   the detections in COCO results format
        metrics_<iteration>.json      {"iteration": N, "bbox": metrics}
        latest.json                   same as metrics_<iteration>.json, written last

    <iteration> is zero-padded to 7 digits so the files sort by iteration; a NaN metric (see evaluate_bbox: no
    ground truth in that size range) is written as `null`, keeping the files strict JSON. Returns the path
    of latest.json.
    """
    eval_dir = Path(output_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    summary = {"iteration": int(iteration), "bbox": {k: None if math.isnan(v) else v for k, v in metrics.items()}}
    _write_json(eval_dir / f"detections_{iteration:07d}.json", results)
    _write_json(eval_dir / f"metrics_{iteration:07d}.json", summary)
    latest = eval_dir / "latest.json"
    _write_json(latest, summary)
    return latest


def _write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj).encode()))
