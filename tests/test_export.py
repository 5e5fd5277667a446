"""hvd_megdet.export: the TorchScript file runs in a process without hvd_megdet and detects what predict does."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torchvision  # also registers torchvision's NMS op, which the exported code calls

from hvd_megdet import export, predict
from hvd_megdet.config import inference_min_size, load_config
from hvd_megdet.data import build_transforms
from hvd_megdet.data.coco import read_rgb
from tests.drawings import CONFIG, make_files

NO_BOXES = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}

# Run in a fresh interpreter: only torch, torchvision and Pillow; importing hvd_megdet (or OpenCV, albumentations,
# Horovod) fails. Prints the detections of each image file argument as JSON.
CONSUMER = """
import json, sys
for name in ("hvd_megdet", "cv2", "albumentations", "horovod"):
    sys.modules[name] = None
import PIL.Image, torch, torchvision
from torchvision.transforms.functional import pil_to_tensor
detector = torch.jit.load(sys.argv[1]).eval()
found = []
with torch.no_grad():
    for path in sys.argv[2:]:
        out = detector([pil_to_tensor(PIL.Image.open(path).convert("RGB"))])[0]
        found.append({"boxes": out["boxes"].tolist(), "scores": out["scores"].tolist(),
                      "ids": [detector.category_ids[i] for i in out["labels"].tolist()],
                      "names": [detector.category_names[i] for i in out["labels"].tolist()]})
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The random-weights demo detector (norm: cgbn in the config), its export, and its overrides."""
    root = tmp_path_factory.mktemp("export")
    overrides = make_files(root)
    export.main(["--config", str(CONFIG), *overrides, "--output", str(root / "detector.pt")])
    return root, overrides


def test_export_runs_without_hvd_megdet_and_detects_what_predict_does(exported, tmp_path):
    root, overrides = exported
    cfg = load_config(CONFIG, overrides)
    # The validation images brought to the test size by the data pipeline, as PNG: the export and predict
    # then read the same pixels and neither resizes them, so their detections must be the same.
    resize = build_transforms(False, [inference_min_size(cfg.input)], cfg.input.max_size)
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((root / "shapes/val").iterdir()):
        resized, _ = resize(read_rgb(path), NO_BOXES)
        cv2.imwrite(str(images / f"{path.stem}.png"), cv2.cvtColor(resized, cv2.COLOR_RGB2BGR))
    predict.main(["--config", str(CONFIG), *overrides, "--input", str(images), "--output", str(tmp_path / "out")])
    predicted = json.loads((tmp_path / "out/predictions.json").read_text())
    files = sorted(images.iterdir())
    proc = subprocess.run([sys.executable, "-c", CONSUMER, root / "detector.pt", *files], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {c["id"]: c["name"] for c in torch.load(root / "model.pth", weights_only=True)["categories"]}
    for path, found in zip(files, json.loads(proc.stdout), strict=True):
        mine = [r for r in predicted if r["file_name"] == str(path)]
        assert len(found["scores"]) == len(mine) > 0
        xywh = torchvision.ops.box_convert(torch.tensor(found["boxes"]).reshape(-1, 4), "xyxy", "xywh")
        assert torch.allclose(xywh, torch.tensor([r["bbox"] for r in mine]), atol=1e-3)
        assert np.allclose(found["scores"], [r["score"] for r in mine], atol=1e-6)
        assert found["ids"] == [r["category_id"] for r in mine]
        assert found["names"] == [names[r["category_id"]] for r in mine]


def test_export_resizes_like_the_data_pipeline(exported):
    """Images that are not at the test size: the export's resize (torch) gives the data pipeline's sizes and
    pixels within one grey level of its OpenCV resize, shrinking or enlarging."""
    root, overrides = exported
    cfg = load_config(CONFIG, overrides)
    resize = build_transforms(False, [inference_min_size(cfg.input)], cfg.input.max_size)
    detector = torch.jit.load(root / "detector.pt")
    for path in sorted((root / "shapes/val").iterdir()):
        for image in (read_rgb(path), cv2.resize(read_rgb(path), None, fx=0.4, fy=0.4)):
            expected, _ = resize(image, NO_BOXES)
            got, _ = detector.detector.transform.resize(torch.from_numpy(image).permute(2, 0, 1).float(), None)
            assert got.shape[1:] == expected.shape[:2]
            assert (got - torch.from_numpy(expected).permute(2, 0, 1)).abs().max() < 1.0


def test_export_holds_torchvision_modules_only(exported):
    root, _ = exported
    detector = torch.jit.load(root / "detector.pt")
    classes = {m.original_name for m in detector.modules()}
    ours = {"ExportedDetector", "ShortestSideResizeTransform"}
    assert classes & {"SyncBatchNorm", "BasicBlockSharingCollectives", "FPNSharingCollectives",
                      "PreResizedTransform", "Float32RPNHead", "Float32FastRCNNPredictor"} == set()
    assert {"BasicBlock", "FeaturePyramidNetwork", "BatchNorm2d", "BackboneWithFPN", "FasterRCNN"} <= classes
    assert ours <= classes
    saved = torch.load(root / "model.pth", weights_only=True)["model"]
    state = {k.removeprefix("detector."): v for k, v in detector.state_dict().items()}
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_export_without_weights_or_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="^error: export needs model.weights=CHECKPOINT$"):
        export.main(["--config", str(CONFIG), "--output", str(tmp_path / "d.pt")])
    with pytest.raises(SystemExit, match=r"^error: checkpoint \S+nope.pth: no such file$"):
        export.main(["--config", str(CONFIG), f"model.weights={tmp_path / 'nope.pth'}", "--output",
                     str(tmp_path / "d.pt")])
    assert not (tmp_path / "d.pt").exists()
