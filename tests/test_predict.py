"""hvd_megdet.predict and hvd_megdet.visualize on generated data: real files, real drawings, bad inputs."""
import json
import shutil
import struct
import sys
import zlib

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from hvd_megdet import predict
from hvd_megdet.visualize import PREDICTION_COLOUR, TRUTH_COLOUR, draw_boxes, side_by_side
from tests.drawings import CONFIG, bottom_edge, make_files, read_image, share_of
from tests.harness import horovodrun


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return root, make_files(root)


def run(argv, capsys):
    """predict's command line in this process; returns (stdout, stderr)."""
    predict.main(["--config", str(CONFIG), *map(str, argv)])
    return capsys.readouterr()


@pytest.fixture(scope="module")
def coco_run(files, tmp_path_factory):
    """predict on the validation annotation file, every detection drawn (random weights score low)."""
    root, overrides = files
    out = tmp_path_factory.mktemp("coco_out")
    predict.main(["--config", str(CONFIG), *overrides, "--input", str(root / "shapes/annotations/instances_val.json"),
                  "--output", str(out), "--score-threshold", "0"])
    return out


def test_draw_boxes_outlines_exactly_the_boxes():
    image = torch.full((3, 60, 80), 100, dtype=torch.uint8)
    drawn = draw_boxes(image, torch.tensor([[10.0, 20.0, 50.0, 40.0]]), ["disc"], PREDICTION_COLOUR)
    changed = (drawn != image).any(0)
    assert share_of(bottom_edge(drawn, (10, 20, 50, 40)), PREDICTION_COLOUR) == 1.0
    assert changed[20:41, 10].all() and changed[20:41, 50].all()  # left and right sides
    assert not changed[:19].any() and not changed[42:].any() and not changed[:, 52:].any()  # nothing outside
    assert not changed[35:39, 12:48].any()  # the inside, below the name tag, is left as it was
    assert torch.equal(draw_boxes(image, torch.zeros(0, 4), [], PREDICTION_COLOUR), image)
    pair = side_by_side(image, drawn, gap=4)
    assert pair.shape == (3, 60, 164) and torch.equal(pair[:, :, 84:], drawn) and (pair[:, :, 80:84] == 255).all()


def test_coco_file_draws_predictions_beside_ground_truth(files, coco_run):
    root, _ = files
    gt = COCO(str(root / "shapes/annotations/instances_val.json"))
    results = json.loads((coco_run / "predictions.json").read_text())
    assert {r["image_id"] for r in results} == set(gt.getImgIds())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    assert gt.loadRes([dict(r) for r in results])  # valid COCO results
    for img in gt.loadImgs(gt.getImgIds()):
        original = read_image(root / "shapes/val" / img["file_name"])
        h, w = img["height"], img["width"]
        drawn = read_image(coco_run / img["file_name"].replace(".jpg", ".png"))
        assert drawn.shape == (3, h, 2 * w + 4)  # predictions | 4 px gap | ground truth
        left, right = drawn[:, :, :w], drawn[:, :, w + 4:]
        mine = sorted((r for r in results if r["image_id"] == img["id"]), key=lambda r: -r["score"])
        assert mine[0]["file_name"].endswith(img["file_name"])
        top = mine[0]["bbox"]
        x0, y0, x1, y1 = top[0], top[1], top[0] + top[2], top[1] + top[3]
        if int(y1) < h:
            edge = bottom_edge(left, (x0, y0, x1, y1))
            assert (edge != original[:, int(y1), int(x0):int(x1) + 1]).any(0).float().mean() > 0.9
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=img["id"])):
            x, y, bw, bh = ann["bbox"]
            if int(y + bh) < h:
                assert share_of(bottom_edge(right, (x, y, x + bw, y + bh)), TRUTH_COLOUR) > 0.8


def test_score_threshold_only_limits_what_is_drawn(files, coco_run, tmp_path, capsys):
    root, overrides = files
    out, _ = run([*overrides, "--input", root / "shapes/val/100001.jpg", "--output", tmp_path,
                  "--score-threshold", "1"], capsys)
    # Nothing scores 1, so nothing is drawn.
    assert torch.equal(read_image(tmp_path / "100001.png"), read_image(root / "shapes/val/100001.jpg"))
    alone = json.loads((tmp_path / "predictions.json").read_text())
    together = [r for r in json.loads((coco_run / "predictions.json").read_text()) if r["image_id"] == 100001]
    assert alone and [r["score"] for r in alone] == [r["score"] for r in together]  # every detection is kept
    assert "predictions of 1 of 1 images drawn" in out


def test_max_images_draws_only_the_first_inputs(files, tmp_path, capsys):
    root, overrides = files
    out, _ = run([*overrides, "--input", root / "shapes/annotations/instances_val.json", "--output", tmp_path,
                  "--max-images", "2"], capsys)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["100001.png", "100002.png"]
    assert {r["image_id"] for r in json.loads((tmp_path / "predictions.json").read_text())} <= {100001, 100002}
    assert "predictions of 2 of 2 images drawn" in out


def _png_header(width, height):
    """A PNG file whose header declares width x height RGB pixels, with a tiny body (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_files_and_folders_bad_inputs_are_warned_and_skipped(files, tmp_path, capsys):
    root, overrides = files
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(root / "shapes/val/100002.jpg", folder / "a.jpg")
    colour = cv2.imread(str(root / "shapes/val/100003.jpg"))
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2BGRA))
    (folder / "notes.txt").write_text("not an image, and not listed: its suffix is not an image's")
    (folder / "broken.jpg").write_text("not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "huge.png").write_bytes(_png_header(30000, 30000))
    out = tmp_path / "out"
    stdout, stderr = run([*overrides, "--input", folder, root / "shapes/val/100001.jpg", tmp_path / "missing.jpg",
                          "--output", out, "--score-threshold", "0.2"], capsys)
    warnings = stderr.strip().splitlines()
    assert len(warnings) == 4, stderr
    for name, why in (("broken.jpg", "not a decodable image"), ("empty.png", "not a decodable image"),
                      ("huge.png", "too large to decode safely"), ("missing.jpg", "cannot read image")):
        assert any(line.startswith("warning: ") and name in line and why in line and line.endswith("; skipped")
                   for line in warnings), (name, stderr)
    assert sorted(p.name for p in out.iterdir()) == ["100001.png", "a.png", "gray.png", "predictions.json",
                                                     "rgba.png"]
    assert read_image(out / "gray.png").shape == (3, *colour.shape[:2])  # gray and RGBA are read as RGB
    results = json.loads((out / "predictions.json").read_text())
    # Files are numbered in order: the folder's, sorted (a, broken, empty, gray, huge, rgba), then the others.
    ids = {r["file_name"].rsplit("/", 1)[-1]: r["image_id"] for r in results}
    assert ids == {"a.jpg": 1, "gray.png": 4, "rgba.png": 6, "100001.jpg": 7}
    assert "predictions of 4 of 8 images drawn" in stdout


def test_a_coco_file_of_another_dataset_needs_its_image_dir(files, tmp_path, capsys):
    root, overrides = files
    other = json.loads((root / "shapes/annotations/instances_val.json").read_text())
    other["images"] = other["images"][:1]
    other["annotations"] = [a for a in other["annotations"] if a["image_id"] == other["images"][0]["id"]]
    other["categories"][0]["name"] = "ball"  # a dataset that names category 1 otherwise
    ann = tmp_path / "other.json"
    ann.write_text(json.dumps(other))
    argv = [*overrides, "--input", ann, "--score-threshold", "0"]
    out, err = run([*argv, "--output", tmp_path / "without"], capsys)
    assert f"warning: {ann}: pass --image-dir" in err and "predictions of 0 of 0 images" in out
    out, err = run([*argv, "--output", tmp_path / "with", "--image-dir", root / "shapes/val"], capsys)
    assert err.strip() == f"warning: {ann}: its categories differ from the model's; ground truth and predictions " \
                          "are named by their own"
    assert sorted(p.name for p in (tmp_path / "with").iterdir()) == ["100001.png", "predictions.json"]


def test_missing_checkpoint_or_mismatched_config_is_one_line_error(files, tmp_path, capsys):
    root, overrides = files
    argv = ["--config", str(CONFIG), *overrides, "--input", str(root / "shapes/val"), "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as missing:
        predict.main(argv + [f"model.weights={tmp_path / 'nope.pth'}"])
    assert str(missing.value) == f"error: checkpoint {tmp_path / 'nope.pth'}: no such file"
    with pytest.raises(SystemExit) as mismatch:
        predict.main(argv + ["model.backbone=resnet18"])
    message = str(mismatch.value)
    assert message.startswith("error: model.weights: ") and "do not fit the detector" in message
    assert "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing written


def test_checkpoint_without_categories_takes_the_configs(tmp_path, capsys):
    overrides = make_files(tmp_path, categories=False)
    out, err = run([*overrides, "--input", tmp_path / "shapes/val/100001.jpg", "--output", tmp_path / "out",
                    "--score-threshold", "0"], capsys)
    assert f"warning: {tmp_path / 'model.pth'} holds no category names" in err
    assert "naming labels from " + str(tmp_path / "shapes/annotations/instances_val.json") in err
    results = json.loads((tmp_path / "out/predictions.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, 7, 12}


@pytest.mark.multirank
def test_two_ranks_each_draw_a_shard(files, coco_run, tmp_path):
    root, overrides = files
    out = tmp_path / "out"
    proc = horovodrun(2, [sys.executable, "-m", "hvd_megdet.predict", "--config", CONFIG, *overrides, "--input",
                          root / "shapes/annotations/instances_val.json", "--output", out, "--score-threshold", "0"],
                      timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in coco_run.iterdir())
    both = json.loads((out / "predictions.json").read_text())
    alone = json.loads((coco_run / "predictions.json").read_text())
    assert len(both) == len(alone)
    for a, b in zip(sorted(both, key=lambda r: (r["image_id"], -r["score"])),
                    sorted(alone, key=lambda r: (r["image_id"], -r["score"]))):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert np.allclose(a["bbox"], b["bbox"], atol=1e-3) and abs(a["score"] - b["score"]) < 1e-5
    assert proc.stdout.count("predictions of 4 of 4 images drawn") == 1  # rank 0 alone reports
