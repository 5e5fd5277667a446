"""Pretraining the backbone on object crops: the crops' geometry and labels, then real pretraining runs whose
weights file the detector loads the way it loads torchvision's ImageNet file."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from hvd_megdet.config import load_config
from hvd_megdet.data.crops import BACKGROUND_MAX_OVERLAP, CropTransform, ObjectCrops, background_box
from hvd_megdet.model import detector_from_config
from tests.harness import REPO, horovodrun

CONFIG = REPO / "configs" / "pretrain_shapes.yaml"


def test_a_crop_centres_the_object_with_its_context_and_keeps_its_aspect():
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 50:90] = 255  # a 40 x 20 box
    crop = CropTransform(crop_size=64, context=0.5, train=False)(image, (50, 40, 90, 60))
    assert crop.shape == (64, 64, 3)
    ys, xs = np.nonzero(crop[..., 0] > 127)
    # the square's side is 2 x the box's longer side (context 0.5 on each side): the box spans half the crop
    # across, a quarter down, centred
    assert (xs.min(), xs.max() + 1) == (16, 48) and (ys.min(), ys.max() + 1) == (24, 40)


def test_training_crops_are_a_pure_function_of_the_seed_and_vary_with_it():
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    transform = CropTransform(crop_size=32, context=0.25, train=True)
    crops = []
    for seed in (3, 3, 4):
        transform.reseed(seed)
        crops.append(transform(image, (40, 30, 90, 80)))
    assert np.array_equal(crops[0], crops[1]) and not np.array_equal(crops[0], crops[2])


def test_background_squares_barely_touch_the_objects():
    rng = np.random.default_rng(0)
    boxes = np.array([[10, 10, 60, 60], [100, 20, 150, 90]], np.float32)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    found = 0
    for _ in range(50):
        box = background_box(rng, 200, 120, boxes, 16, 50)
        if box is None:
            continue
        ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
        iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
        side = box[2] - box[0]
        assert (ix * iy / np.minimum(areas, side * side)).max() <= BACKGROUND_MAX_OVERLAP
        assert 16 <= side <= 50 and 0 <= box[0] and box[2] <= 200 and box[3] <= 120
        found += 1
    assert found > 25
    # inside a large object is not background either
    assert background_box(rng, 200, 120, np.array([[0, 0, 200, 120]], np.float32), 16, 50) is None


def test_every_object_is_a_sample_labelled_by_its_category(shapes):
    ann = shapes / "annotations" / "instances_train.json"
    crops = ObjectCrops(str(shapes / "train"), str(ann), crop_size=48)
    objects = sum(len(crops.detection.annotation(i)["labels"]) for i in range(len(crops.detection)))
    assert crops.num_classes == 5 and crops.class_names[0] == "__background__"
    assert sum(n for name, n in crops.counts.items() if name != "__background__") == objects
    assert 0 < crops.counts["__background__"] <= len(crops.detection)
    image, target = crops[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.uint8 and target["labels"].shape == (1,)


def _pretrain_args(shapes, out, **extra):
    items = {"data.train.images": shapes / "train",
             "data.train.annotations": shapes / "annotations" / "instances_train.json",
             "data.val.images": shapes / "val", "data.val.annotations": shapes / "annotations" / "instances_val.json",
             "data.num_workers": 0, "solver.ims_per_gpu": 8, "solver.max_iter": 4, "solver.warmup_iters": 1,
             "pretrain.crop_size": 32, "eval_period": 2, "log_period": 1, "output_dir": out}
    items.update(extra)
    return ["-m", "hvd_megdet.pretrain", "--config", CONFIG, *(f"{k}={v}" for k, v in items.items())]


def _loads_into_the_detector(weights):
    """The detector built with model.weights=weights holds the file's backbone tensors (fc dropped)."""
    state = torch.load(weights, weights_only=True)
    assert "fc.weight" in state and "conv1.weight" in state and "layer4.0.bn2.running_var" in state
    cfg = load_config(REPO / "configs" / "demo_shapes.yaml", [f"model.weights={weights}"])
    body = detector_from_config(cfg.model, num_classes=5).backbone.body
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer4[0].bn2.running_var, state["layer4.0.bn2.running_var"])


def test_one_process_pretrains_and_the_detector_loads_the_weights(shapes, tmp_path):
    done = subprocess.run([sys.executable, *map(str, _pretrain_args(shapes, tmp_path / "pt", **{"model.norm": "bn"}))],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iter 4: top-1" in done.stdout and (tmp_path / "pt" / "log.txt").exists()
    _loads_into_the_detector(tmp_path / "pt" / "backbone.pth")


def test_pretraining_refuses_frozen_norms_in_one_line(shapes, tmp_path):
    done = subprocess.run([sys.executable, *map(str, _pretrain_args(shapes, tmp_path / "pt", **{"model.norm": "frozen"}))],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: model.norm=frozen: pretraining from scratch needs bn or cgbn"]
    assert not (tmp_path / "pt").exists()


@pytest.mark.multirank
def test_two_ranks_pretrain_with_cgbn_and_the_detector_loads_the_weights(shapes, tmp_path):
    done = horovodrun(2, [sys.executable, *_pretrain_args(shapes, tmp_path / "pt", **{"model.norm": "cgbn"})],
                      timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "world size 2 x 8 images = global batch 16" in done.stdout and "iter 4: top-1" in done.stdout
    _loads_into_the_detector(tmp_path / "pt" / "backbone.pth")


def test_a_diverging_pretraining_stops_in_one_line_and_writes_no_weights(shapes, tmp_path):
    args = _pretrain_args(shapes, tmp_path / "pt", **{"model.norm": "bn", "solver.base_lr": 1e12,
                                                      "solver.warmup_iters": 0, "solver.nonfinite": "stop"})
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: FloatingPointError: iteration ")
    assert not (tmp_path / "pt" / "backbone.pth").exists()
