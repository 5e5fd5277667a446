"""Export a trained detector as one TorchScript file that runs with torch and torchvision alone.

    python -m hvd_megdet.export --config configs/demo_shapes.yaml model.weights=CKPT --output detector.pt

    # in any process, without hvd_megdet:
    import PIL.Image, torch, torchvision      # importing torchvision registers the NMS op the file calls
    detector = torch.jit.load("detector.pt").eval()
    image = torchvision.transforms.functional.pil_to_tensor(PIL.Image.open("photo.jpg").convert("RGB"))
    with torch.no_grad():
        found = detector([image])[0]        # "boxes" [N, 4] xyxy in the image's pixels, "labels" [N], "scores" [N]
    names = [detector.category_names[i] for i in found["labels"].tolist()]
    coco_ids = [detector.category_ids[i] for i in found["labels"].tolist()]

The module takes a list of RGB images [3, H, W] of any size, uint8 or float in [0, 1]. It resizes them like
the data pipeline's test transform (shortest side to the test size, longest side capped, sizes rounded the
same way) but with torch's bilinear interpolation instead of OpenCV's: resized pixels differ by less than one
grey level, so on an image that needs resizing the detections are close to, not equal to, those of
`hvd_megdet.predict`; on an image already at the test size they are the same.

Why TorchScript: `torch.jit.load` restores TorchScript code and tensors, never arbitrary Python objects, in a
process that has never imported hvd_megdet, and torchvision's Faster R-CNN is written to be scriptable.
`torch.export` fails on it (torchvision's batched NMS branches on the number of boxes, a data-dependent guard),
and a state dict for a torchvision builder would fit at most one of our models (resnet50 with frozen BN and
torchvision's anchors: fasterrcnn_resnet50_fpn; the _v2 builder has a two-conv RPN head), whose builder
resizes differently. TorchScript is deprecated in torch 2.x (a FutureWarning, silenced here; loading still
prints it) but scripts, saves and loads in torch 2.14.
"""
import dataclasses
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN as TorchvisionBackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from hvd_megdet import model as hvd_model
from hvd_megdet.categories import model_categories
from hvd_megdet.checkpoint import write_atomic
from hvd_megdet.cli import command_parser, exit_on_user_error
from hvd_megdet.config import ConfigError, inference_min_size, load_config
from hvd_megdet.data.transforms import resize_scale
from hvd_megdet.inference import inference_model


class ShortestSideResizeTransform(GeneralizedRCNNTransform):
    """torchvision's GeneralizedRCNNTransform resizing as the data pipeline's test transform does: the scale
    of `data.transforms.resize_scale`, output size round(h * scale) x round(w * scale), bilinear. Detections
    come back in the coordinates of the image given (torchvision's postprocess)."""

    def resize(self, image: Tensor,
               target: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        h, w = image.shape[-2], image.shape[-1]
        scale = resize_scale(h, w, self.min_size[-1], self.max_size)
        size = [max(1, int(round(h * scale))), max(1, int(round(w * scale)))]
        if size != [h, w]:
            image = nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return image, target


class ExportedDetector(nn.Module):
    """What the export file holds: the detector, and the names and COCO ids of its labels (index = label,
    0 = background). forward(images) -> one dict of "boxes", "labels", "scores" per image."""

    def __init__(self, detector, categories):
        super().__init__()
        self.detector = detector
        self.category_names = ["__background__"] + [str(c["name"]) for c in categories]
        self.category_ids = [-1] + [int(c["id"]) for c in categories]

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        images = [image.float() / 255 if image.dtype == torch.uint8 else image for image in images]
        if torch.jit.is_scripting():  # scripted, torchvision's detectors return (losses, detections)
            return self.detector(images)[1]
        return self.detector(images)


def _torchvision_class(cls):
    """The torchvision class that a module class of hvd_megdet computes the same as: its nearest base
    outside hvd_megdet (those subclasses only reorder the computation for CGBN's collectives, or cast to
    float32 under autocast), or torchvision's BackboneWithFPN for ours (same submodules, not a subclass)."""
    if cls is hvd_model.BackboneWithFPN:
        return TorchvisionBackboneWithFPN
    base = next(c for c in cls.__mro__ if not c.__module__.startswith("hvd_megdet"))
    if base is nn.Module:
        raise TypeError(f"export: {cls.__module__}.{cls.__qualname__} has no torchvision equivalent")
    return base


def exportable(cfg, categories):
    """The ExportedDetector of `cfg` with the weights of `cfg.model.weights`, on CPU, in eval mode: built as
    for evaluation (CGBN as plain BatchNorm), every hvd_megdet module class replaced by its torchvision
    equivalent (same parameters and buffers), and the test resize inside."""
    cfg = dataclasses.replace(cfg, channels_last=False)  # its forward pre-hook does not script
    detector = inference_model(cfg, len(categories) + 1, torch.device("cpu"))
    for module in detector.modules():
        if type(module).__module__.startswith("hvd_megdet"):
            module.__class__ = _torchvision_class(type(module))
    old = detector.transform
    detector.transform = ShortestSideResizeTransform(inference_min_size(cfg.input), cfg.input.max_size,
                                                     old.image_mean, old.image_std, old.size_divisible)
    detector._has_warned = True  # torchvision's "RCNN always returns a (Losses, Detections) tuple" warning
    return ExportedDetector(detector, categories).eval()


def export(cfg, output):
    """Write the TorchScript detector of `cfg` (module docstring) to `output`, atomically; returns the module."""
    if not cfg.model.weights:
        raise ConfigError("export needs model.weights=CHECKPOINT")
    module = exportable(cfg, model_categories(cfg))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        scripted = torch.jit.script(module)
        write_atomic(output, lambda f: torch.jit.save(scripted, f))
    return scripted


def parse_args(argv=None):
    parser = command_parser(__doc__, config_help="YAML config file (the one the model was trained with)",
                            overrides_example="model.weights=CKPT")
    parser.add_argument("--output", required=True, help="the TorchScript file to write (e.g. detector.pt)")
    return parser.parse_intermixed_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        scripted = export(load_config(args.config, args.overrides), args.output)
    print(f"exported to {args.output}: TorchScript, {len(scripted.category_names) - 1} categories; "
          "load it with torch.jit.load (no hvd_megdet needed)")


if __name__ == "__main__":
    main()
