"""hvd_megdet.data.browse: the images the model is given, drawn with their boxes and names."""
import itertools

import pytest
import torch

from hvd_megdet.config import load_config
from hvd_megdet.data import build_train_loader, train_dataset
from hvd_megdet.data.browse import main
from hvd_megdet.data.synthetic import make_dataset
from hvd_megdet.visualize import TRUTH_COLOUR
from tests.drawings import CONFIG, bottom_edge, data_overrides, read_image, share_of


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("browse")
    make_dataset(str(root), num_train=8, num_val=3, seed=2)
    return data_overrides(root)


def test_train_images_are_drawn_as_the_loader_gives_them(overrides, tmp_path, capsys):
    argv = [*overrides, "input.min_size=[96, 128]", "input.flip_prob=0.5"]
    main(["--config", str(CONFIG), *argv, "--output", str(tmp_path), "-n", "5"])
    out = capsys.readouterr().out
    assert out.startswith("5 train images as the model sees them (short side 96 or 128, long side <= 176, "
                          "flipped with p=0.5) in ")
    # The same stream as the trainer's rank 0 in a world of one: same images, sizes, flips and boxes.
    cfg = load_config(CONFIG, argv)
    dataset = train_dataset(cfg)
    loader = build_train_loader(dataset, cfg.solver.ims_per_gpu, 0, 1, cfg.seed, num_workers=0)
    pairs = itertools.islice((p for images, targets in loader for p in zip(images, targets)), 5)
    counts = dict.fromkeys(dataset.class_names[1:], 0)
    for k, (image, target) in enumerate(pairs):
        drawn = read_image(tmp_path / f"train_{k:03d}_{target['image_id']}.png")
        assert drawn.shape == image.shape
        changed = (drawn != image).any(0)
        outline = torch.zeros_like(changed)
        for (x0, y0, x1, y1), label in zip(target["boxes"].int().tolist(), target["labels"].tolist()):
            counts[dataset.class_names[label]] += 1
            if y1 < image.shape[1]:  # the bottom side, drawn in the ground truth's colour
                assert share_of(bottom_edge(drawn, (x0, y0, x1, y1)), TRUTH_COLOUR) > 0.8
            outline[max(y0 - 1, 0):y1 + 2, max(x0 - 1, 0):x1 + 2] = True
            # The name tag starts inside the top-left corner and may stick out of a small box.
            tag_w, tag_h = 7 * len(dataset.class_names[label]) + 6, 16
            outline[max(y0 - 1, 0):y0 + tag_h, max(x0 - 1, 0):x0 + tag_w] = True
        assert changed.any() == bool(len(target["boxes"]))
        assert not (changed & ~outline).any()  # nothing is drawn away from the boxes and their names
    assert out.rstrip().endswith("boxes drawn: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    assert len(list(tmp_path.iterdir())) == 5


def test_val_images_at_the_test_size_in_order(overrides, tmp_path, capsys):
    main(["--config", str(CONFIG), *overrides, "--split", "val", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("3 val images as the model sees them (short side 128, long side <= 176)")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["val_000_100001.png", "val_001_100002.png", "val_002_100003.png"]
    for name in names:
        h, w = read_image(tmp_path / name).shape[1:]
        assert min(h, w) == 128 or max(h, w) == 176


def test_missing_annotations_is_one_line_error(overrides, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: \S+nope.json: annotation file not found$"):
        main(["--config", str(CONFIG), *overrides, f"data.train.annotations={tmp_path / 'nope.json'}",
              "--output", str(tmp_path)])
