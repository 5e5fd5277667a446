"""The detector: torchvision Faster R-CNN with a ResNet + FPN backbone whose norm layers we choose.

MegDet (Peng et al. 2018) is Faster R-CNN R50-FPN trained with Cross-GPU BatchNorm (CGBN). `build_model`
assembles the same network from torchvision parts instead of `fasterrcnn_resnet50_fpn`, which hard-codes
FrozenBatchNorm, so that one argument sets the norm of backbone, FPN and box head:

    norm="frozen"  FrozenBatchNorm2d in the ResNet; FPN without norm. torchvision's default detector and the
                   paper's fixed-BN baseline.
    norm="bn"      nn.BatchNorm2d in ResNet, FPN and a conv box head; statistics of each process's own images.
    norm="cgbn"    as "bn", then every BatchNorm2d becomes hvd_megdet.sync_bn's cross-GPU BatchNorm.

The box head is a second, separate choice: box_head="mlp" (two fc layers, torchvision's default and the
paper's head, no norm) or "conv" (4 conv + 1 fc as fasterrcnn_resnet50_fpn_v2, with the norm's BatchNorm
after each conv for bn/cgbn). The default follows the norm (mlp for frozen, conv otherwise); hold it fixed to
compare norms on one architecture.

With CGBN, norm layers whose inputs do not depend on each other (the FPN's levels; bn1 and the shortcut's norm
of a downsampling ResNet block) share their statistics' collectives
(`SyncBatchNorm.forward_sharing_collectives`): the network is torchvision's, computed in an order that allows it.

Images reach the model already resized by the data pipeline (shortest side / max size, in loader workers),
so the model's transform only normalizes (ImageNet mean/std) and pads to a multiple of 32; detections come
out in the coordinates of the network input (`evaluation.to_coco_results` maps them back to the image).

Weights are randomly initialised unless `weights` names a local file; nothing is ever downloaded.
"""
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from hvd_megdet.checkpoint import CheckpointError, mismatched_keys

NORMS = ("frozen", "bn", "cgbn")
BOX_HEADS = ("mlp", "conv")
# The stages of a ResNet from the input on; `trainable_backbone_layers=k` trains the last k of them.
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def _norm_sharing_collectives(norms, inputs):
    """`[norm(x) for ...]` for norm layers whose inputs do not depend on each other's outputs. Layers of a
    class with `forward_sharing_collectives` (CGBN's SyncBatchNorm) run through it: their statistics share each
    collective, one synchronization instead of len(norms)."""
    sharing = getattr(type(norms[0]), "forward_sharing_collectives", None)
    if sharing is not None and all(type(norm) is type(norms[0]) for norm in norms):
        return sharing(norms, inputs)
    return [norm(x) for norm, x in zip(norms, inputs)]


def _first_norm_and_shortcut(block, x):
    """(bn1(conv1(x)), shortcut(x)) of a torchvision ResNet block: both read the block's input, so a
    downsampling shortcut's norm shares bn1's collectives."""
    out = block.conv1(x)
    if block.downsample is None:
        return block.bn1(out), x
    conv, norm = block.downsample  # torchvision's Sequential(conv1x1, norm_layer)
    out, shortcut = _norm_sharing_collectives([block.bn1, norm], [out, conv(x)])
    return out, shortcut


class BasicBlockSharingCollectives(BasicBlock):
    """torchvision's BasicBlock, its shortcut's norm sharing bn1's collectives (same outputs and parameters)."""

    def forward(self, x):
        out, identity = _first_norm_and_shortcut(self, x)
        out = self.bn2(self.conv2(self.relu(out)))
        return self.relu(out + identity)


class BottleneckSharingCollectives(Bottleneck):
    """torchvision's Bottleneck, its shortcut's norm sharing bn1's collectives (same outputs and parameters)."""

    def forward(self, x):
        out, identity = _first_norm_and_shortcut(self, x)
        out = self.relu(self.bn2(self.conv2(self.relu(out))))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _tiny_resnet(norm_layer, widths=(16, 32, 64, 128)):
    """A ResNet-10 of BasicBlocks with narrow widths for CPU demos: one block per stage, same strides
    (4, 8, 16, 32) and module names (conv1, bn1, layer1..layer4) as torchvision's ResNets."""
    layers = OrderedDict(
        conv1=nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
        bn1=norm_layer(widths[0]),
        relu=nn.ReLU(inplace=True),
        maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))
        layers[f"layer{i + 1}"] = nn.Sequential(
            BasicBlockSharingCollectives(in_ch, out_ch, stride, downsample, norm_layer=norm_layer))
        in_ch = out_ch
    body = nn.Sequential(layers)
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return body


# name -> (ResNet constructor taking norm_layer, output channels of layer1..layer4, FPN channels,
#          box head representation size). torchvision's resnet18..101 are these ResNet(block, layers) calls.
BACKBONES = {
    "resnet_tiny": (_tiny_resnet, (16, 32, 64, 128), 64, 256),
    "resnet18": (partial(ResNet, BasicBlockSharingCollectives, [2, 2, 2, 2]), (64, 128, 256, 512), 256, 1024),
    "resnet34": (partial(ResNet, BasicBlockSharingCollectives, [3, 4, 6, 3]), (64, 128, 256, 512), 256, 1024),
    "resnet50": (partial(ResNet, BottleneckSharingCollectives, [3, 4, 6, 3]), (256, 512, 1024, 2048), 256, 1024),
    "resnet101": (partial(ResNet, BottleneckSharingCollectives, [3, 4, 23, 3]), (256, 512, 1024, 2048), 256, 1024),
}


def _conv_norm(blocks, inputs):
    """Each block (Sequential: conv, then optionally a norm) on its input, the norms of all blocks sharing
    their collectives (`_norm_sharing_collectives`)."""
    outputs = [block[0](x) for block, x in zip(blocks, inputs)]
    norms = [block[1] for block in blocks if len(block) > 1]
    return _norm_sharing_collectives(norms, outputs) if norms else outputs


class FPNSharingCollectives(FeaturePyramidNetwork):
    """torchvision's FeaturePyramidNetwork computed in an order that lets the levels' norms share collectives:
    every lateral conv, their norms; the top-down sums; every output conv, their norms. Same outputs; with
    CGBN the levels share each collective, so an FPN of 4 levels synchronizes 2 times instead of 8."""

    def forward(self, x):
        names, features = list(x.keys()), list(x.values())
        laterals = _conv_norm(self.inner_blocks, features)
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest"))
        results = _conv_norm(self.layer_blocks, merged)
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))


class BackboneWithFPN(nn.Module):
    """torchvision's BackboneWithFPN (the same submodules, state-dict keys and initialisation) on a
    `FPNSharingCollectives` with a max-pooled extra level (P6)."""

    def __init__(self, body, return_layers, in_channels_list, out_channels, norm_layer=None):
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        self.fpn = FPNSharingCollectives(in_channels_list, out_channels, extra_blocks=LastLevelMaxPool(),
                                     norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


class PreResizedTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform without the resize: normalizes with mean/std and pads the batch to a
    multiple of `size_divisible`. Image sizes, target boxes and detections stay in input coordinates
    (postprocess then rescales by a factor of 1)."""

    def __init__(self, image_mean, image_std, size_divisible=32):
        super().__init__(min_size=0, max_size=0, image_mean=image_mean, image_std=image_std,
                         size_divisible=size_divisible)

    def resize(self, image, target=None):
        return image, target

    def __repr__(self):
        return (f"{self.__class__.__name__}(Normalize(mean={self.image_mean}, std={self.image_std}), "
                f"size_divisible={self.size_divisible}, no resize)")


def _float32(outputs):
    """Floating-point tensors in nested lists/tuples cast to float32."""
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_float32(o) for o in outputs)
    return outputs.float() if torch.is_tensor(outputs) and outputs.is_floating_point() else outputs


# Mixed precision gives the boxes of float32. Under autocast the backbone, FPN and heads compute in float16 or
# bfloat16, but box decoding must not: torchvision's BoxCoder casts the anchors (or proposals) to the dtype of
# the head's output, and AnchorGenerator makes anchors in the features' dtype, so in bfloat16 a box at
# x ~ 1000 px lands 4-8 px off. These three classes keep anchors, head outputs, and with them decoding, NMS,
# post-processing and the losses, in float32 (same parameters and state-dict keys as torchvision's).
class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator, its anchors in float32 whatever the features' dtype."""

    def set_cell_anchors(self, dtype, device):
        super().set_cell_anchors(torch.float32, device)


class Float32RPNHead(RPNHead):
    """torchvision's RPNHead, its objectness logits and box deltas returned in float32."""

    def forward(self, x):
        return _float32(super().forward(x))


class Float32FastRCNNPredictor(FastRCNNPredictor):
    """torchvision's FastRCNNPredictor, its class logits and box deltas returned in float32."""

    def forward(self, x):
        return _float32(super().forward(x))


def default_trainable_layers(norm, has_weights):
    """The recipe's trainable ResNet stages: 3 (stem and layer1 frozen, Detectron's FREEZE_AT=2) for the
    frozen-BN baseline started from weights, else 5 (MegDet trains every stage with CGBN; freezing randomly
    initialised stages would leave random features)."""
    return 3 if norm == "frozen" and has_weights else 5


def _freeze(module):
    """Freeze `module` in place: parameters lose requires_grad, and every BatchNorm2d is replaced by a
    FrozenBatchNorm2d holding its current statistics, so train mode does not update running statistics
    of frozen stages either (requires_grad alone would let them drift). Returns the module."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _freeze(child))
    module.requires_grad_(False)
    return module


def build_model(num_classes, backbone="resnet50", norm="frozen", process_set=None, two_phase=True,
                anchor_sizes=(32, 64, 128, 256, 512), box_head=None, trainable_backbone_layers=None, weights=None,
                cgbn_wait="auto", cgbn_cuda_kernels=False, **detector_kwargs):
    """Build a Faster R-CNN ResNet-FPN detector (torchvision `FasterRCNN`).

    num_classes: number of classes including background (K + 1); labels 1..K, 0 is background.
    backbone: one of BACKBONES ("resnet_tiny" is a narrow ResNet-10 with a 64-channel FPN for CPU demos).
    norm: "frozen" | "bn" | "cgbn" (see the module docstring). For "cgbn", `process_set` (a Horovod
        process set: the group of ranks whose statistics are combined; None = all ranks), `two_phase`,
        `cgbn_wait` (its `wait`) and `cgbn_cuda_kernels` (its `cuda_kernels`) are passed to
        `hvd_megdet.sync_bn.convert_sync_batchnorm`.
    anchor_sizes: one anchor size per FPN level P2..P6 (5 values), aspect ratios 0.5, 1, 2 at every level.
    box_head: "mlp" | "conv" | None (the norm's default: mlp for frozen, conv for bn and cgbn).
    trainable_backbone_layers: how many ResNet stages, counted from layer4 down to the stem, are trained
        (0..5). The others are frozen: no gradients, and their BatchNorms become FrozenBatchNorm2d.
        Default: `default_trainable_layers(norm, weights is not None)`.
    weights: path of a local weights file, see `load_weights`; None = random initialisation.
    detector_kwargs: passed to `FasterRCNN` (e.g. rpn_batch_size_per_image, box_score_thresh,
        box_detections_per_img, image_mean, image_std). Resizing is the data pipeline's job, so
        min_size / max_size / fixed_size are refused.

    Images given to the model must already be resized; it normalizes and pads them, nothing more.
    Returns the FasterRCNN module (train mode).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts background too (K + 1), so it must be >= 2; got {num_classes}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choices: {sorted(BACKBONES)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choices: {list(NORMS)}")
    box_head = box_head or ("mlp" if norm == "frozen" else "conv")
    if box_head not in BOX_HEADS:
        raise ValueError(f"unknown box_head {box_head!r}; choices: {list(BOX_HEADS)}")
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per FPN level P2..P6 (5), got {tuple(anchor_sizes)}")
    resize_keys = sorted({"min_size", "max_size", "fixed_size"} & detector_kwargs.keys())
    if resize_keys:
        raise ValueError(f"build_model got {resize_keys}: images are resized by the data pipeline "
                         "(input.min_size / input.max_size), not by the model")
    if trainable_backbone_layers is None:
        trainable_backbone_layers = default_trainable_layers(norm, weights is not None)
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_backbone_layers}")

    make_resnet, stage_channels, fpn_channels, head_dim = BACKBONES[backbone]
    frozen = norm == "frozen"
    body = make_resnet(norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d)
    for stage in _STAGES[: 5 - trainable_backbone_layers]:
        for name in stage:
            setattr(body, name, _freeze(getattr(body, name)))
    fpn_backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=list(stage_channels),
        out_channels=fpn_channels,
        norm_layer=None if frozen else nn.BatchNorm2d,
    )
    if box_head == "mlp":
        box_head = TwoMLPHead(fpn_channels * 7 * 7, head_dim)
    else:
        box_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [head_dim],
                                      norm_layer=None if frozen else nn.BatchNorm2d)
    anchors = Float32AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    model = FasterRCNN(fpn_backbone, rpn_anchor_generator=anchors,
                       rpn_head=Float32RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
                       box_head=box_head, box_predictor=Float32FastRCNNPredictor(head_dim, num_classes),
                       **detector_kwargs)
    # FasterRCNN's own transform would resize again; keep its mean/std and padding only.
    model.transform = PreResizedTransform(model.transform.image_mean, model.transform.image_std,
                                          model.transform.size_divisible)

    if norm == "cgbn":
        from hvd_megdet.sync_bn import convert_sync_batchnorm  # needs Horovod: imported only for CGBN

        model = convert_sync_batchnorm(model, process_set=process_set, two_phase=two_phase, wait=cgbn_wait,
                                       cuda_kernels=cgbn_cuda_kernels)
    if weights is not None:
        load_weights(model, weights)
    return model


class BackboneClassifier(nn.Module):
    """A detector backbone's ResNet as an image classifier, for `hvd_megdet.pretrain`: the ResNet of
    `build_model` (same constructor, module names and initialisation), global average pooling and a linear
    layer `fc`. Its `resnet.state_dict()` has the keys of a torchvision ImageNet ResNet (conv1, bn1,
    layer1..4, fc), which `load_weights` loads into a detector's backbone; fc is dropped there.

    forward(images, targets=None): images, a list of same-sized CHW float tensors in [0, 1] (as
    engine.to_device gives), normalized here with the detector's ImageNet mean/std. In training, with
    targets [{"labels": int64 [1]}, ...], returns {"loss_cls": cross entropy}, the form engine.train_step
    takes; else the logits [N, num_classes].
    """

    IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the detector's (GeneralizedRCNNTransform)

    def __init__(self, backbone, num_classes, norm_layer=nn.BatchNorm2d):
        super().__init__()
        make_resnet, stage_channels, _, _ = BACKBONES[backbone]
        self.resnet = make_resnet(norm_layer=norm_layer)
        self.resnet.fc = nn.Linear(stage_channels[-1], num_classes)
        self.register_buffer("mean", torch.tensor(self.IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, targets=None):
        r = self.resnet
        x = (torch.stack(list(images)) - self.mean) / self.std
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        logits = r.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if targets is None:
            return logits
        return {"loss_cls": F.cross_entropy(logits, torch.cat([t["labels"] for t in targets]))}


def backbone_classifier(backbone, num_classes, norm="cgbn", process_set=None, two_phase=True, cgbn_wait="auto"):
    """A BackboneClassifier of `backbone` with `num_classes` outputs, its BatchNorms made CGBN for
    norm="cgbn" (over `process_set`, as `build_model`), kept per-rank for "bn". "frozen" is refused: a
    classifier trained from scratch needs trainable statistics."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choices: {sorted(BACKBONES)}")
    if norm not in ("bn", "cgbn"):
        raise ValueError(f"pretraining needs norm bn or cgbn, got {norm!r}")
    model = BackboneClassifier(backbone, num_classes)
    if norm == "cgbn":
        from hvd_megdet.sync_bn import convert_sync_batchnorm  # needs Horovod: imported only for CGBN

        model = convert_sync_batchnorm(model, process_set=process_set, two_phase=two_phase, wait=cgbn_wait)
    return model


def detector_from_config(m, num_classes, norm=None, process_set=None, channels_last=False):
    """The detector of model config `m` (config.ModelConfig), with `norm` overriding m.norm (evaluation uses
    plain BN for CGBN), computing in channels_last when asked (`use_channels_last`). A missing or unusable
    m.weights file raises CheckpointError naming it (and the mismatching keys)."""
    norm = norm or m.norm
    trainable = (m.trainable_backbone_layers if m.trainable_backbone_layers >= 0
                 else default_trainable_layers(m.norm, bool(m.weights)))
    model = build_model(num_classes, backbone=m.backbone, norm=norm, process_set=process_set,
                        two_phase=m.two_phase, cgbn_wait=m.cgbn_wait, cgbn_cuda_kernels=m.cgbn_cuda_kernels,
                        anchor_sizes=m.anchor_sizes, trainable_backbone_layers=trainable,
                        box_head=None if m.box_head == "auto" else m.box_head,
                        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
                        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
                        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
                        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
                        box_batch_size_per_image=m.box_batch_size_per_image,
                        box_detections_per_img=m.box_detections_per_img)
    if m.weights:
        try:
            load_weights(model, m.weights)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"model.weights: {e}") from None
    return use_channels_last(model) if channels_last else model


def use_channels_last(model):
    """Feed `model`'s backbone channels_last batches (returns the model): convolutions then keep activations
    channels_last (NHWC, faster with cuDNN and AMP), while parameters and gradients stay contiguous. Horovod
    refuses non-contiguous tensors, so `model.to(memory_format=torch.channels_last)` cannot be used: it
    makes the 4D weights, and with them their gradients, channels_last."""
    model.backbone.register_forward_pre_hook(
        lambda module, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    return model


def load_weights(model, path):
    """Load the local weights file `path` into `model` (a `build_model` detector), in place.

    Accepted contents (read with torch.load(weights_only=True), so a pickle of arbitrary objects is refused):
      - our training checkpoint: a dict with a "model" state dict (other entries ignored);
      - a full detector state dict (keys "backbone.", "rpn.", "roi_heads." ...);
      - a torchvision ImageNet classification ResNet state dict (conv1.weight, layer1..., fc.*): it loads into
        model.backbone.body, the fc.* classifier is dropped; FPN and heads keep their random initialisation.
    BatchNorm `num_batches_tracked` counters are ignored both ways (FrozenBatchNorm2d has none).
    Any other missing, unexpected or shape-mismatched key raises ValueError naming the file and the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects other than tensors and containers
        reason = ("it holds objects other than tensors and plain containers" if "Weights only load failed" in str(e)
                  else (str(e).strip().splitlines() or [e.__class__.__name__])[0]
                  + " (truncated, or not written by torch.save?)")
        raise ValueError(f"{path}: not a weights file torch.load(weights_only=True) accepts: {reason}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a checkpoint with a 'model' entry)")

    target = model
    if not any(k.startswith("backbone.") for k in state):  # an ImageNet classification ResNet
        target = model.backbone.body
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = target.state_dict()
    problems = mismatched_keys(expected, state, ignore_counters=True)
    if problems:
        where = "the detector" if target is model else "the backbone ResNet (read as an ImageNet state dict)"
        raise ValueError(f"{path}: weights do not fit {where}; " + problems)
    target.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
