"""hvd_megdet.evaluate on generated data: the checkpoint's categories, not the val file's, name the detections."""
import json
import subprocess
import sys

import pytest
import torch

from hvd_megdet import evaluate
from tests.drawings import CONFIG, REPO, make_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return root, make_files(root)


def val_file_with(root, name, categories):
    """root/<name>.json: the val annotation file listing `categories` instead of its own."""
    coco = json.loads((root / "shapes/annotations/instances_val.json").read_text())
    coco["categories"] = categories
    (root / f"{name}.json").write_text(json.dumps(coco))
    return root / f"{name}.json"


def test_a_val_file_that_numbers_the_categories_otherwise_is_refused(files):
    root, overrides = files
    categories = torch.load(root / "model.pth", weights_only=True)["categories"]  # 1 disc, 3 rectangle, ...
    swap = {1: 3, 3: 1}
    val = val_file_with(root, "swapped", [{"id": swap.get(c["id"], c["id"]), "name": c["name"]} for c in categories])
    proc = subprocess.run([sys.executable, "-m", "hvd_megdet.evaluate", "--config", str(CONFIG), *overrides,
                           f"data.val.annotations={val}", f"output_dir={root / 'refused'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(val) in errors[0], proc.stderr
    assert "id 1: 'rectangle' vs 'disc', id 3: 'disc' vs 'rectangle'" in errors[0]
    assert not (root / "refused" / "eval").exists()


def detections(root, overrides, name, checkpoint_categories, val_categories):
    """Evaluate a copy of the checkpoint listing `checkpoint_categories` on a val file listing `val_categories`;
    the detections written."""
    state = torch.load(root / "model.pth", weights_only=True)
    torch.save({**state, "categories": checkpoint_categories}, root / f"{name}.pth")
    out = root / name
    evaluate.main(["--config", str(CONFIG), *overrides, f"model.weights={root / f'{name}.pth'}",
                   f"data.val.annotations={val_file_with(root, name, val_categories)}", f"output_dir={out}"])
    return json.loads((out / "eval" / "detections_0000000.json").read_text())


def test_the_checkpoints_label_order_names_the_detections_whatever_the_val_files_order(files):
    """The same weights saved with their categories in two orders (label 1 is category 1 in one, category 12
    in the other) give the same detections, named by each checkpoint; the val file lists them in a third."""
    root, overrides = files
    categories = torch.load(root / "model.pth", weights_only=True)["categories"]
    reordered = categories[::-1]
    in_the_file = categories[1:] + categories[:1]
    as_saved = detections(root, overrides, "as_saved", categories, in_the_file)
    by_reordered = detections(root, overrides, "reordered", reordered, in_the_file)
    label_of = {c["id"]: label for label, c in enumerate(categories)}
    assert as_saved and len(by_reordered) == len(as_saved)
    for a, b in zip(as_saved, by_reordered):
        assert (a["image_id"], a["bbox"], a["score"]) == (b["image_id"], b["bbox"], b["score"])
        assert b["category_id"] == reordered[label_of[a["category_id"]]]["id"]
