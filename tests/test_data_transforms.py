import numpy as np
import pytest
import torch

from hvd_megdet.data.transforms import build_transforms, image_to_tensor, resize_scale


def target(boxes, labels):
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "labels": np.array(labels, dtype=np.int64)}


@pytest.mark.parametrize("h, w, min_size, max_size, expected", [
    (480, 640, 800, 1333, 800 / 480),      # short side rules: 1.667 < 1333 / 640 = 2.083
    (640, 480, 800, 1333, 800 / 480),      # portrait: same scale
    (200, 1000, 800, 1333, 1.333),         # 800 / 200 = 4 would make the long side 4000: capped at 1333 / 1000
    (1000, 2000, 600, 1000, 0.5),          # downscale, capped: min(0.6, 0.5)
    (800, 1200, 800, 1333, 1.0),           # already at size
])
def test_resize_scale_hand_computed(h, w, min_size, max_size, expected):
    assert resize_scale(h, w, min_size, max_size) == pytest.approx(expected)


def test_test_transform_resizes_image_and_boxes_per_axis():
    image = np.zeros((480, 640, 3), np.uint8)
    out, tgt = build_transforms(False, (600, 800), 1333)(image, target([[64, 48, 320, 240]], [3]))
    # max(min_sizes) = 800: scale 5/3, 640 * 5/3 = 1066.67 -> 1067 columns.
    assert out.shape == (800, 1067, 3) and out.dtype == np.uint8
    sx, sy = 1067 / 640, 800 / 480
    np.testing.assert_allclose(tgt["boxes"], [[64 * sx, 48 * sy, 320 * sx, 240 * sy]], rtol=1e-5)
    assert tgt["boxes"].dtype == np.float32 and tgt["labels"].tolist() == [3]


def test_flip_and_resize_keep_box_on_the_square():
    image = np.zeros((60, 100, 3), np.uint8)
    image[20:40, 10:30] = 255  # a bright square, pixel-edge box [10, 20, 30, 40]
    out, tgt = build_transforms(True, (120,), 1000, flip_prob=1.0)(image, target([[10, 20, 30, 40]], [1]))
    assert out.shape[:2] == (120, 200)
    np.testing.assert_allclose(tgt["boxes"], [[140, 40, 180, 80]], atol=1e-3)  # x -> 200 - 2x
    ys, xs = np.nonzero(out[..., 0] > 127)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], tgt["boxes"][0], atol=1)


def test_multi_scale_draws_each_size_and_reseed_is_deterministic():
    tf = build_transforms(True, (50, 70), 1000, flip_prob=0.5)
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :5] = 255  # left edge bright: tells whether the image was flipped
    seen = set()
    for seed in range(40):
        tf.reseed(seed)
        out, _ = tf(image, target([[0, 0, 10, 10]], [1]))
        seen.add((out.shape[0], bool(out[0, -1, 0] > 127)))
    assert seen == {(50, False), (50, True), (70, False), (70, True)}  # sizes and flips vary independently
    tf.reseed(7)
    a = tf(image, target([[0, 0, 10, 10]], [1]))
    tf.reseed(7)
    b = tf(image, target([[0, 0, 10, 10]], [1]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1]["boxes"], b[1]["boxes"])


def test_boxes_degenerate_after_resize_are_dropped_with_their_labels():
    image = np.zeros((100, 1000, 3), np.uint8)
    # scale min(10 / 100, 100 / 1000) = 0.1: the 5-px-wide box becomes 0.5 px wide and is dropped.
    out, tgt = build_transforms(False, (10,), 100)(image, target([[0, 0, 5, 50], [100, 0, 200, 50]], [1, 2]))
    assert out.shape[:2] == (10, 100)
    assert tgt["labels"].tolist() == [2]
    np.testing.assert_allclose(tgt["boxes"], [[10, 0, 20, 5]], atol=1e-4)


def test_empty_target_and_extra_keys_pass_through():
    tgt = target([], [])
    tgt["image_id"] = 42
    out, tgt = build_transforms(True, (32,), 64)(np.zeros((16, 24, 3), np.uint8), tgt)
    assert out.shape == (32, 48, 3)
    assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,) and tgt["image_id"] == 42


@pytest.mark.parametrize("kwargs", [dict(min_sizes=()), dict(min_sizes=(0,)), dict(min_sizes=(800.5,)),
                                    dict(max_size=0), dict(flip_prob=1.5)])
def test_bad_arguments_name_the_argument(kwargs):
    args = dict(train=True, min_sizes=(800,), max_size=1333)
    args.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_transforms(**args)


def test_image_to_tensor_is_contiguous_chw_uint8():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255
    image[..., 2] = 51
    t = image_to_tensor(image)
    assert t.dtype == torch.uint8 and t.shape == (3, 2, 3) and t.is_contiguous()
    assert (t[0] == 255).all() and (t[2] == 51).all() and not t[1].any()
