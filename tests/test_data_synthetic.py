import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from hvd_megdet.data.coco import CocoDetection
from hvd_megdet.data.synthetic import CATEGORIES, MAX_OBJECT, MIN_OBJECT, _draw, main, make_dataset, make_image


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_bytes(tmp_path):
    make_dataset(str(tmp_path / "a"), num_train=5, num_val=3, seed=0)
    make_dataset(str(tmp_path / "b"), num_train=5, num_val=3, seed=0)
    make_dataset(str(tmp_path / "c"), num_train=5, num_val=3, seed=1)
    a, b, c = (files(tmp_path / d) for d in "abc")
    assert len(a) == 5 + 3 + 2 and a == b
    assert a.keys() == c.keys() and a != c


def test_output_is_coco_that_matches_the_images(tmp_path):
    splits = make_dataset(str(tmp_path), num_train=30, num_val=4, seed=0)
    coco = json.loads(Path(splits["train"][1]).read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == list(CATEGORIES)
    assert [c["id"] for c in coco["categories"]] != list(range(1, len(CATEGORIES) + 1))  # non-contiguous
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for im in coco["images"]:
        h, w = cv2.imread(f"{splits['train'][0]}/{im['file_name']}").shape[:2]
        assert (w, h) == (im["width"], im["height"]) and 160 <= max(w, h) <= 200
    assert len({w >= h for w, h in sizes.values()}) == 2  # landscape and portrait
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for a in coco["annotations"]:
        x, y, bw, bh = a["bbox"]
        w, h = sizes[a["image_id"]]
        assert a["iscrowd"] == 0 and 0 < a["area"] <= (bw + 0.01) * (bh + 0.01)
        assert 0 <= x and 0 <= y and x + bw <= w + 0.01 and y + bh <= h + 0.01
        assert MIN_OBJECT - 0.01 <= max(bw, bh) <= MAX_OBJECT + 0.01
    val = CocoDetection(*splits["val"], keep_empty=True)
    assert val.image_ids.tolist() == [100001, 100002, 100003, 100004]


def test_some_images_are_empty_and_others_hold_one_to_five_objects():
    counts = [len(make_image(np.random.default_rng([0, i]))[1]) for i in range(200)]
    assert 0 in counts and min(counts) == 0 and max(counts) == 5
    assert 0.01 < counts.count(0) / len(counts) < 0.15


@pytest.mark.parametrize("x0, y0, x1, y1, covered", [
    (2.0, 3.0, 10.0, 8.0, (2, 3, 10, 8)),   # integer edges: exactly those pixels
    (2.3, 3.7, 10.2, 8.3, (2, 4, 10, 8)),   # pixels more than half covered: column 2 (0.7), not row 3 (0.3)
])
def test_draw_covers_the_pixels_of_a_pixel_edge_polygon(x0, y0, x1, y1, covered):
    image = np.zeros((12, 14, 3), np.uint8)
    _draw(image, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), (255, 255, 255))
    ys, xs = np.nonzero(image[..., 0] > 127)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == covered
    assert image[..., 0].sum() / 255 == pytest.approx((x1 - x0) * (y1 - y0), abs=0.25)  # area kept


def test_cli_writes_the_dataset(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--seed", "4"])
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == ["instances_train.json",
                                                                           "instances_val.json"]
    assert len(list((tmp_path / "train").iterdir())) == 2 and "done in" in capsys.readouterr().out


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        make_dataset(str(tmp_path), num_train=2, num_val=0)
