"""engine.to_device: the one place where images become float."""
import torch

from hvd_megdet.engine import to_device

CPU = torch.device("cpu")


def test_uint8_images_become_float_in_unit_range():
    image = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 4).contiguous()
    (out,), _ = to_device([image], [], CPU)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 4)
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert image.dtype == torch.uint8 and image[2, 0, 0] == 255  # the loader's tensor is left alone


def test_float_images_are_taken_as_unit_range_and_targets_move():
    image = torch.rand(3, 5, 6)
    target = {"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64), "image_id": 7}
    (out,), (moved,) = to_device([image], [target], CPU)
    assert torch.equal(out, image)
    assert moved["image_id"] == 7 and torch.equal(moved["labels"], target["labels"])
