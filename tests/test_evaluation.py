import json
import math

import pytest
import torch
from pycocotools.coco import COCO

from hvd_megdet.evaluation import METRICS, evaluate_bbox, to_coco_results, write_eval

LABEL_TO_CAT = {1: 3, 2: 7, 3: 12}  # contiguous label -> non-contiguous COCO category id
# image id -> (orig (h0, w0), network input (h, w)); image 5 has no objects.
SIZES = {1: ((200, 300), (160, 240)), 2: ((240, 120), (320, 160)), 5: ((300, 400), (240, 320))}
# image id -> [(category id, [x, y, w, h])]: small (< 32^2), medium and large objects of each category.
OBJECTS = {
    1: [(3, [10, 10, 20, 20]), (7, [50, 40, 50, 40]), (12, [150, 60, 120, 100]), (3, [200, 5, 60, 45])],
    2: [(7, [5, 200, 18, 25]), (12, [30, 30, 40, 60]), (3, [0, 60, 120, 110])],
    5: [],
}


def _coco(tmp_path, objects=OBJECTS):
    anns = [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for i, (img, cat, box) in enumerate((img, cat, box) for img, objs in objects.items() for cat, box in objs)]
    dataset = {
        "images": [{"id": img, "height": SIZES[img][0][0], "width": SIZES[img][0][1], "file_name": f"{img}.png"}
                   for img in objects],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in LABEL_TO_CAT.values()],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    return COCO(str(path))


def _gt_as_model_outputs(objects=OBJECTS):
    """Ground truth as the model would output it: xyxy boxes in network-input coordinates, labels, score 1."""
    cat_to_label = {c: label for label, c in LABEL_TO_CAT.items()}
    outputs, targets = [], []
    for img, objs in objects.items():
        (h0, w0), (h, w) = SIZES[img]
        boxes = torch.tensor([[x, y, x + bw, y + bh] for _, (x, y, bw, bh) in objs]).reshape(-1, 4).float()
        boxes *= torch.tensor([w / w0, h / h0, w / w0, h / h0])
        outputs.append({"boxes": boxes, "labels": torch.tensor([cat_to_label[c] for c, _ in objs], dtype=torch.int64),
                        "scores": torch.ones(len(objs))})
        targets.append({"image_id": torch.tensor(img), "size": torch.tensor([h, w]),
                        "orig_size": torch.tensor([h0, w0])})
    return outputs, targets


def test_ground_truth_as_detections_scores_100(tmp_path):
    coco = _coco(tmp_path)
    results = to_coco_results(*_gt_as_model_outputs(), LABEL_TO_CAT)
    assert len(results) == 7 and {r["category_id"] for r in results} == {3, 7, 12}
    metrics = evaluate_bbox(coco, results)
    assert metrics == pytest.approx(dict.fromkeys(METRICS, 100.0))
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}  # loadRes did not add keys to ours


def test_image_without_detections_counts_as_misses(tmp_path):
    coco = _coco(tmp_path)
    results = [r for r in to_coco_results(*_gt_as_model_outputs(), LABEL_TO_CAT) if r["image_id"] != 2]
    metrics = evaluate_bbox(coco, results)
    # Precision 1 up to recall 2/3 (category 3), 1/2 (7) and 1/2 (12): COCO's 101-point interpolated AP
    # counts the recall thresholds 0, 0.01, ... reached: 67, 51 and 51 of 101.
    assert metrics["AP50"] == pytest.approx(100 * (67 + 51 + 51) / (3 * 101))


def test_size_range_without_ground_truth_is_nan(tmp_path):
    large_only = {1: [(12, [150, 60, 120, 100])], 2: [(3, [0, 60, 120, 110])]}
    metrics = evaluate_bbox(_coco(tmp_path, large_only),
                            to_coco_results(*_gt_as_model_outputs(large_only), LABEL_TO_CAT))
    assert metrics["AP"] == pytest.approx(100.0) and metrics["APl"] == pytest.approx(100.0)
    assert math.isnan(metrics["APs"]) and math.isnan(metrics["APm"])


def test_box_rescale_clip_and_xywh_by_hand():
    outputs = [{"boxes": torch.tensor([[10.0, 20.0, 110.0, 60.0], [190.0, 90.0, 205.0, 101.0]]),
                "labels": torch.tensor([3, 1]), "scores": torch.tensor([0.75, 0.5])}]
    # input 100 x 200 (h x w), original 50 x 300: x scales by 1.5, y by 0.5.
    targets = [{"image_id": 42, "size": (100, 200), "orig_size": (50, 300)}]
    results = to_coco_results(outputs, targets, LABEL_TO_CAT)
    assert results == [
        {"image_id": 42, "category_id": 12, "bbox": [15.0, 10.0, 150.0, 20.0], "score": 0.75},
        # [285, 45, 307.5, 50.5] clipped to the 300 x 50 image
        {"image_id": 42, "category_id": 3, "bbox": [285.0, 45.0, 15.0, 5.0], "score": 0.5},
    ]
    assert all(isinstance(v, float) for r in results for v in r["bbox"] + [r["score"]])


def test_empty_results_give_zeros_and_unknown_images_are_refused(tmp_path):
    coco = _coco(tmp_path)
    assert evaluate_bbox(coco, []) == dict.fromkeys(METRICS, 0.0)
    stray = {"image_id": 99, "category_id": 3, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.9}
    with pytest.raises(ValueError, match="99"):
        evaluate_bbox(coco, [stray])


def test_write_eval_files(tmp_path):
    results = [{"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    metrics = dict(zip(METRICS, [40.0, 60.0, 45.0, 20.0, 41.0, 50.0]))
    write_eval(tmp_path, 500, dict.fromkeys(METRICS, 1.0), [])
    latest = write_eval(tmp_path, 1000, metrics, results)
    assert latest == tmp_path / "eval" / "latest.json"
    assert json.loads(latest.read_text()) == {"iteration": 1000, "bbox": metrics}
    assert json.loads((tmp_path / "eval" / "metrics_0000500.json").read_text())["iteration"] == 500
    assert json.loads((tmp_path / "eval" / "detections_0001000.json").read_text()) == results
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "detections_0000500.json", "detections_0001000.json", "latest.json",
        "metrics_0000500.json", "metrics_0001000.json"]
