import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from hvd_megdet.data.coco import CocoDetection
from hvd_megdet.data.transforms import build_transforms

# Categories listed out of order, with non-contiguous ids; id 2 has no annotation but still gets a label.
CATEGORIES = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]


def ann(ann_id, image_id, bbox, category_id=5, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id, "iscrowd": iscrowd,
            "area": bbox[2] * bbox[3]}


def write_coco(tmp_path, images, annotations, categories=CATEGORIES, colour=(255, 0, 0)):
    """Write a PNG of `colour` (RGB) for each image record and the JSON; returns (image_dir, ann_file)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    for im in images:
        pixels = np.zeros((im["height"], im["width"], 3), np.uint8)
        pixels[:] = colour[::-1]
        cv2.imwrite(str(image_dir / im["file_name"]), pixels)
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(image_dir), str(ann_file)


def image(image_id, w, h):
    return {"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h}


@pytest.fixture
def small(tmp_path):
    """Image 10 (40x30) with boxes of every kind, 20 (20x30) without annotations, 30 only a crowd box."""
    images = [image(30, 25, 25), image(10, 40, 30), image(20, 20, 30)]
    annotations = [
        ann(1, 10, [2, 3, 10, 5], category_id=5),        # kept: xyxy [2, 3, 12, 8], label 2
        ann(2, 10, [0, 0, 20, 20], iscrowd=1),           # crowd: dropped
        ann(3, 10, [30, 20, 20, 20], category_id=9),     # outside on the right/bottom: clipped to [30, 20, 40, 30]
        ann(4, 10, [-5, -4, 10, 10], category_id=2),     # outside on the left/top: clipped to [0, 0, 5, 6]
        ann(5, 10, [5, 5, 0, 4]),                        # zero width: dropped
        ann(6, 10, [5, 5, 4, -3]),                       # negative height: dropped
        ann(7, 10, [5, 5, 0.5, 4]),                      # narrower than 1 px: dropped
        ann(8, 10, [45, 5, 4, 4]),                       # entirely outside: dropped
        ann(9, 30, [1, 1, 5, 5], iscrowd=1),
    ]
    return write_coco(tmp_path, images, annotations)


def test_boxes_clipped_filtered_and_labels_contiguous(small):
    ds = CocoDetection(*small)
    assert len(ds) == 1  # keep_empty=False: 20 (no annotation) and 30 (crowd only) are dropped
    img, tgt = ds[0]
    assert tgt["image_id"] == 10 and tgt["orig_size"] == (30, 40) and tgt["size"] == (30, 40)
    assert tgt["boxes"].dtype == torch.float32 and tgt["labels"].dtype == torch.int64
    assert tgt["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30], [0, 0, 5, 6]]
    assert tgt["labels"].tolist() == [2, 3, 1]
    assert ds.label_to_cat_id[tgt["labels"]].tolist() == [5, 9, 2]


def test_category_mapping_both_ways(small):
    ds = CocoDetection(*small)
    assert ds.label_to_cat_id.tolist() == [-1, 2, 5, 9]
    assert ds.cat_id_to_label == {2: 1, 5: 2, 9: 3}
    assert all(ds.label_to_cat_id[label] == cat for cat, label in ds.cat_id_to_label.items())
    assert ds.class_names == ("__background__", "two", "five", "nine")


def test_keep_empty_keeps_images_without_boxes_in_id_order(small):
    ds = CocoDetection(*small, keep_empty=True)
    assert ds.image_ids.tolist() == [10, 20, 30]
    np.testing.assert_allclose(ds.aspect_ratios, [40 / 30, 20 / 30, 1.0])
    for i in (1, 2):
        img, tgt = ds[i]
        assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,)
        assert tuple(img.shape[1:]) == tgt["size"] == tgt["orig_size"]


def test_image_is_uint8_chw_rgb(small):
    img, _ = CocoDetection(*small)[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 30, 40)
    assert (img[0] == 255).all() and not img[1:].any()  # red, in RGB order


def test_transforms_apply_to_image_and_boxes(small):
    ds = CocoDetection(*small, transforms=build_transforms(False, (60,), 1000))
    img, tgt = ds[0]
    assert img.shape == (3, 60, 80) and tgt["size"] == (60, 80) and tgt["orig_size"] == (30, 40)
    np.testing.assert_allclose(tgt["boxes"], [[4, 6, 24, 16], [60, 40, 80, 60], [0, 0, 10, 12]], atol=1e-4)


def test_index_is_numpy_not_per_image_python_objects(small):
    ds = CocoDetection(*small, keep_empty=True)
    for name, value in vars(ds).items():
        if isinstance(value, (list, tuple, dict, set)):
            assert len(value) <= len(CATEGORIES) + 1, name  # only per-category containers


def test_pixel_formats_decode_to_rgb_uint8(tmp_path):
    images = [image(i, 8, 6) for i in (1, 2, 3)]
    image_dir, ann_file = write_coco(tmp_path, images, [ann(i, i, [1, 1, 4, 4]) for i in (1, 2, 3)])
    cv2.imwrite(f"{image_dir}/1.png", np.full((6, 8), 128, np.uint8))                         # grayscale
    cv2.imwrite(f"{image_dir}/2.png", np.full((6, 8, 4), (0, 0, 255, 7), np.uint8))           # BGRA
    cv2.imwrite(f"{image_dir}/3.png", np.full((6, 8, 3), (0, 65535, 0), np.uint16))           # 16-bit
    ds = CocoDetection(image_dir, ann_file)
    expected = [(128, 128, 128), (255, 0, 0), (0, 255, 0)]
    for i, rgb in enumerate(expected):
        img = ds[i][0]
        assert img.shape == (3, 6, 8)
        assert img[:, 0, 0].tolist() == list(rgb)


def test_exif_orientation_is_ignored_and_a_rotated_size_is_an_error(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [image(1, 8, 4)], [ann(1, 1, [0, 0, 2, 2])])
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, :4] = 255  # left half white in stored orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(f"{image_dir}/1.png", exif=exif)
    img, _ = CocoDetection(image_dir, ann_file)[0]
    assert img.shape == (3, 4, 8) and img[:, :, :4].min() == 255 and img[:, :, 4:].max() == 0
    # A JSON made from the EXIF-rotated image (8 high, 4 wide) does not match the stored pixels.
    image_dir, ann_file = write_coco(tmp_path, [image(1, 4, 8)], [ann(1, 1, [0, 0, 2, 2])])
    Image.fromarray(pixels).save(f"{image_dir}/1.png", exif=exif)
    with pytest.raises(ValueError, match=r"1\.png.*EXIF"):
        CocoDetection(image_dir, ann_file)[0]


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("{not json", "not a JSON file"),
    ("[1, 2]", "not a COCO instances file"),
    (json.dumps({"images": [], "annotations": []}), "not a COCO instances file"),
    (json.dumps({"images": [{"id": 1}], "annotations": [], "categories": CATEGORIES}), "file_name, width"),
    (json.dumps({"images": [image(1, 4, 4)], "annotations": [{"image_id": 1}], "categories": CATEGORIES}),
     "malformed COCO record"),
    (json.dumps({"images": [image(1, 4, 4)], "annotations": [ann(1, 1, [0, 0, 2, 2], category_id=7)],
                 "categories": CATEGORIES}), "category_id 7"),
    (json.dumps({"images": [image(1, 4, 4)], "annotations": [ann(1, 1, [0, 0, "a", 2])],
                 "categories": CATEGORIES}), "no valid bbox"),
    (json.dumps({"images": [image(1, 4, 4)], "annotations": [ann(1, 2, [0, 0, 2, 2])],
                 "categories": CATEGORIES}), "absent from 'images'"),
    (json.dumps({"images": [image(1, 4, 4)], "annotations": [], "categories": CATEGORIES}), "no images left"),
    (json.dumps({"images": [image(1, 4, 4), image(1, 5, 5)], "annotations": [], "categories": CATEGORIES}),
     "duplicate ids in 'images'"),
])
def test_bad_annotation_files_raise_naming_the_file(tmp_path, content, match):
    ann_file = tmp_path / "bad.json"
    if content is not None:
        ann_file.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        CocoDetection(str(tmp_path), str(ann_file))
    assert "bad.json" in str(err.value)


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.unlink(), "cannot read image"),
    (lambda p: p.write_bytes(b""), "not a decodable image"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20), "not a decodable image"),
    (lambda p: p.write_bytes(p.read_bytes()[:-20]), "not a decodable image"),  # truncated
    (lambda p: p.write_bytes(cv2.imencode(".jpg", np.zeros((6, 8, 3), np.uint8))[1].tobytes()[:-30]),
     "not a decodable image"),  # truncated JPEG
    (lambda p: cv2.imwrite(str(p), np.zeros((5, 8, 3), np.uint8)), "decoded size 8x5 differs"),
])
def test_bad_image_files_raise_naming_the_file(tmp_path, damage, match):
    image_dir, ann_file = write_coco(tmp_path, [image(1, 8, 6)], [ann(1, 1, [0, 0, 2, 2])])
    damage(tmp_path / "images" / "1.png")
    ds = CocoDetection(image_dir, ann_file)
    with pytest.raises(ValueError, match=match) as err:
        ds[0]
    assert "1.png" in str(err.value)
