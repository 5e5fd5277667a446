"""Shared by the tests of predict, export and browse: a small shapes dataset, a checkpoint of the demo config's
detector with random weights (the tests check mechanics, not accuracy), and reading the pixels drawn."""
from pathlib import Path

import cv2
import torch

from hvd_megdet.config import load_config
from hvd_megdet.data import CocoDetection
from hvd_megdet.data.synthetic import make_dataset
from hvd_megdet.model import detector_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_shapes.yaml"


def data_overrides(root):
    """The overrides that point the demo config at the dataset under `root`."""
    return [f"data.train.images={root / 'train'}",
            f"data.train.annotations={root / 'annotations' / 'instances_train.json'}",
            f"data.val.images={root / 'val'}", f"data.val.annotations={root / 'annotations' / 'instances_val.json'}",
            "data.num_workers=0"]


def make_files(root, categories=True):
    """A dataset of 4 + 4 images under root/shapes and root/model.pth, a checkpoint of the demo detector with
    random weights (with the dataset's categories unless `categories` is false, as checkpoints were before);
    returns the config overrides that name both."""
    root = Path(root)
    make_dataset(str(root / "shapes"), num_train=4, num_val=4, seed=1)
    overrides = data_overrides(root / "shapes")
    cfg = load_config(CONFIG, overrides)
    val = CocoDetection(cfg.data.val.images, cfg.data.val.annotations, keep_empty=True)
    torch.manual_seed(0)
    model = detector_from_config(cfg.model, len(val.label_to_cat_id), norm="bn")
    state = {"model": model.state_dict(), "iteration": 0}
    if categories:
        state["categories"] = val.categories
    torch.save(state, root / "model.pth")
    return overrides + [f"model.weights={root / 'model.pth'}"]


def read_image(path):
    """An image file as uint8 [3, H, W] RGB."""
    return torch.from_numpy(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def bottom_edge(image, box):
    """The pixels [3, n] of the bottom side of xyxy `box` as draw_bounding_boxes draws it (integer coordinates)."""
    x0, _, x1, y1 = (int(v) for v in box)
    return image[:, y1, x0:x1 + 1]


def share_of(pixels, colour):
    """The fraction of `pixels` [3, n] that are exactly RGB `colour`."""
    return (pixels == torch.tensor(colour, dtype=torch.uint8)[:, None]).all(0).float().mean().item()
