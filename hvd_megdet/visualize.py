"""Drawing boxes with their names on images, for `hvd_megdet.predict` and `hvd_megdet.data.browse`.

Images are uint8 [3, H, W] RGB tensors; boxes float [N, 4] xyxy in that image's pixels. Drawing is
torchvision's `draw_bounding_boxes`; predictions and ground truth have one colour each, so the two panels of
`side_by_side` read at a glance.
"""
from pathlib import Path

import cv2
import torch
from torchvision.utils import draw_bounding_boxes

PREDICTION_COLOUR = (255, 64, 32)
TRUTH_COLOUR = (40, 220, 90)


def draw_boxes(image, boxes, names, colour):
    """`image` with `boxes` outlined in `colour` (RGB tuple), each labelled by its entry of `names` on a filled
    tag; returns a new uint8 image (the same one when there are no boxes). Lines are 1 px per 320 px of the
    image's longer side, at least 1."""
    if len(boxes) == 0:
        return image
    width = max(1, round(max(image.shape[-2:]) / 320))
    return draw_bounding_boxes(image, boxes.float(), labels=list(names), colors=colour, width=width,
                               fill_labels=True, label_colors=(0, 0, 0))


def side_by_side(*images, gap=4):
    """The images next to each other, left to right, `gap` white pixels apart (heights are padded with white
    to the tallest)."""
    height = max(image.shape[1] for image in images)
    padded = []
    for i, image in enumerate(images):
        if i:
            padded.append(torch.full((3, height, gap), 255, dtype=torch.uint8))
        padded.append(torch.nn.functional.pad(image, (0, 0, 0, height - image.shape[1]), value=255))
    return torch.cat(padded, dim=2)


def save_png(image, path):
    """Write uint8 [3, H, W] RGB `image` as a PNG file (lossless: the drawn lines stay exactly their colour)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write the image")
