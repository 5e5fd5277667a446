import importlib.util
import random
from unittest import mock

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d

from hvd_megdet.config import load_config
from hvd_megdet.model import BACKBONES, build_model, detector_from_config, load_weights, use_channels_last

LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
TINY = dict(backbone="resnet_tiny", anchor_sizes=(16, 32, 64, 128, 256))
HAS_SYNC_BN = importlib.util.find_spec("horovod") is not None and \
    importlib.util.find_spec("hvd_megdet.sync_bn") is not None


def _batch():
    """Two images of different sizes (already 'resized' by the data pipeline) and their targets."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 192, 160, generator=g), torch.rand(3, 128, 192, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0], [90.0, 100.0, 150.0, 180.0]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 40.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def _norm_types(module):
    return {type(m) for m in module.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d))}


def _build(norm, **kwargs):
    if norm == "cgbn" and not HAS_SYNC_BN:
        pytest.skip("hvd_megdet.sync_bn / horovod not importable")
    # Without hvd.init(), sync_bn's SyncBatchNorm is a world of 1: plain BatchNorm maths, no collective.
    return build_model(4, norm=norm, **kwargs)


# CGBN conversion does not depend on the backbone: checked on two.
@pytest.mark.parametrize("backbone, norm", [(b, n) for b in sorted(BACKBONES) for n in ("frozen", "bn")]
                         + [("resnet_tiny", "cgbn"), ("resnet50", "cgbn")])
def test_norm_layers_of_backbone_fpn_and_head(backbone, norm):
    model = _build(norm, backbone=backbone)
    body, fpn, head = model.backbone.body, model.backbone.fpn, model.roi_heads.box_head
    if norm == "frozen":
        assert _norm_types(body) == {FrozenBatchNorm2d}
        assert _norm_types(fpn) == set() and _norm_types(head) == set()
    else:
        expected = nn.BatchNorm2d
        if norm == "cgbn":
            from hvd_megdet import sync_bn

            expected = sync_bn.SyncBatchNorm
        for part in (body, fpn, head):
            assert _norm_types(part) == {expected}, part.__class__.__name__
    # Random init: nothing frozen by default; the predictor sized for the 4 classes.
    assert all(p.requires_grad for p in model.parameters())
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="'resnet152'.*resnet_tiny"):
        build_model(3, backbone="resnet152")
    with pytest.raises(ValueError, match="'gn'.*cgbn"):
        build_model(3, norm="gn")
    with pytest.raises(ValueError, match="min_size"):
        build_model(3, min_size=800, **TINY)


@pytest.mark.parametrize("norm", ["frozen", "bn", "cgbn"])
def test_train_step_gives_finite_losses_and_gradients(norm):
    torch.manual_seed(0)
    model = _build(norm, **TINY)
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0


def test_channels_last_activations_with_contiguous_parameters_and_gradients():
    """Horovod refuses non-contiguous tensors: only the activations may be channels_last."""
    torch.manual_seed(0)
    reference = build_model(4, norm="bn", **TINY)
    model = use_channels_last(build_model(4, norm="bn", **TINY))
    model.load_state_dict(reference.state_dict())
    seen = []
    model.backbone.body.layer1.register_forward_hook(lambda m, args, out: seen.append(out))
    images, targets = _batch()
    torch.manual_seed(1)  # the same proposal sampling in both
    losses = model(images, targets)
    torch.manual_seed(1)
    expected = reference(images, targets)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    for k in expected:
        torch.testing.assert_close(losses[k], expected[k], rtol=1e-2, atol=1e-3)  # conv sums reassociate
    sum(losses.values()).backward()
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("norm_layer", [None, nn.BatchNorm2d])
def test_fpn_matches_torchvisions_in_keys_initialisation_and_outputs(norm_layer):
    from torchvision.models.detection.backbone_utils import BackboneWithFPN as TorchvisionBackboneWithFPN

    from hvd_megdet.model import BackboneWithFPN, _tiny_resnet

    body = _tiny_resnet(nn.BatchNorm2d)
    args = (body, {f"layer{i + 1}": str(i) for i in range(4)}, [16, 32, 64, 128], 64)
    torch.manual_seed(0)
    ours = BackboneWithFPN(*args, norm_layer=norm_layer)
    torch.manual_seed(0)
    theirs = TorchvisionBackboneWithFPN(*args, norm_layer=norm_layer)
    expected_state = theirs.state_dict()
    assert list(ours.state_dict()) == list(expected_state)
    assert all(torch.equal(v, expected_state[k]) for k, v in ours.state_dict().items())
    x = torch.randn(2, 3, 96, 160)
    out, expected = ours(x), theirs(x)  # train mode: BatchNorm statistics updated alike
    assert list(out) == list(expected) == ["0", "1", "2", "3", "pool"]
    for k in out:
        torch.testing.assert_close(out[k], expected[k])
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs.state_dict()[k])


@pytest.mark.parametrize("name, reference", [("resnet18", resnet18), ("resnet50", resnet50)])
def test_resnets_match_torchvisions_in_keys_initialisation_and_outputs(name, reference):
    torch.manual_seed(0)
    ours = BACKBONES[name][0](norm_layer=nn.BatchNorm2d)
    torch.manual_seed(0)
    theirs = reference(weights=None, norm_layer=nn.BatchNorm2d)
    expected_state = theirs.state_dict()
    assert list(ours.state_dict()) == list(expected_state)
    assert all(torch.equal(v, expected_state[k]) for k, v in ours.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))  # train mode: BatchNorm statistics updated alike
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs.state_dict()[k])


@pytest.mark.skipif(not HAS_SYNC_BN, reason="hvd_megdet.sync_bn / horovod not importable")
def test_cgbn_norms_share_collectives_where_inputs_are_independent():
    """FPN: the 4 lateral norms, then the 4 output norms; each downsampling block: bn1 with the shortcut's."""
    from hvd_megdet.sync_bn import SyncBatchNorm

    model = _build("cgbn", **TINY)
    with mock.patch.object(SyncBatchNorm, "forward_sharing_collectives",
                           wraps=SyncBatchNorm.forward_sharing_collectives) as together:
        model.backbone(torch.randn(2, 3, 96, 128))
    fused = [c.args[0] for c in together.call_args_list if len(c.args[0]) > 1]
    body, fpn = model.backbone.body, model.backbone.fpn
    blocks = [body[f"layer{i}"][0] for i in (2, 3, 4)]
    assert fused == [[block.bn1, block.downsample[1]] for block in blocks] + [
        [block[1] for block in fpn.inner_blocks], [block[1] for block in fpn.layer_blocks]]
    assert len(together.call_args_list) == 20 - 9  # the backbone's 20 CGBN layers synchronize 11 times


def test_frozen_stages_keep_weights_and_bn_statistics():
    torch.manual_seed(0)
    model = build_model(4, norm="bn", trainable_backbone_layers=3, **TINY)
    body = model.backbone.body
    for frozen in (body.bn1, body.layer1[0].bn1, body.layer1[0].bn2):
        assert isinstance(frozen, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    # Make frozen statistics non-trivial so an update would show.
    body.layer1[0].bn1.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    images, targets = _batch()
    sum(model(images, targets).values()).backward()
    after = body.state_dict()
    for k in before:
        if k.startswith(("conv1.", "bn1.", "layer1.")):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    assert body.layer1[0].conv1.weight.grad is None


def test_default_trainable_layers_depend_on_norm_and_weights(tmp_path):
    assert build_model(4, norm="frozen", **TINY).backbone.body.conv1.weight.requires_grad
    for norm in ("frozen", "bn"):
        path = tmp_path / f"{norm}.pth"
        torch.save(build_model(4, norm=norm, **TINY).state_dict(), path)
        body = build_model(4, norm=norm, weights=path, **TINY).backbone.body
        assert body.layer2[0].conv1.weight.requires_grad
        assert body.layer1[0].conv1.weight.requires_grad == (norm == "bn")


@pytest.mark.parametrize("norm, override, frozen_stem", [("frozen", -1, True), ("frozen", 5, False),
                                                         ("bn", -1, False), ("frozen", 1, True)])
def test_config_freezes_like_detectron_unless_told(tmp_path, norm, override, frozen_stem):
    """model.trainable_backbone_layers: -1 (the default) follows the recipe, frozen BN from weights trains
    layer2-4 only (Detectron's FREEZE_AT=2); a number overrides it."""
    path = tmp_path / "weights.pth"
    torch.save(build_model(4, norm=norm, **TINY).state_dict(), path)
    cfg = load_config(None, [f"model.norm={norm}", "model.backbone=resnet_tiny", f"model.weights={path}",
                             "model.anchor_sizes=[16, 32, 64, 128, 256]",
                             f"model.trainable_backbone_layers={override}"])
    body = detector_from_config(cfg.model, 4).backbone.body
    assert body.conv1.weight.requires_grad != frozen_stem
    assert body.layer1[0].conv1.weight.requires_grad != frozen_stem
    assert body.layer2[0].conv1.weight.requires_grad == (override != 1)
    assert body.layer4[0].conv1.weight.requires_grad


@pytest.mark.parametrize("wait, cuda_kernels", [("auto", False), ("horovod", True)])
def test_cgbn_layers_are_built_with_the_configs_wait_and_kernels(wait, cuda_kernels):
    from hvd_megdet.sync_bn import SyncBatchNorm

    cfg = load_config(None, ["model.norm=cgbn", "model.backbone=resnet_tiny", f"model.cgbn_wait={wait}",
                             f"model.cgbn_cuda_kernels={str(cuda_kernels).lower()}"])
    layers = [m for m in detector_from_config(cfg.model, 4).modules() if isinstance(m, SyncBatchNorm)]
    assert layers and {(m.wait, m.cuda_kernels) for m in layers} == {(wait, cuda_kernels)}


def _outputs_of(module, store):
    module.register_forward_hook(lambda m, args, out: store.append(out))


def test_bf16_autocast_decodes_boxes_in_float32_at_800x1333():
    """Under bfloat16 autocast (CPU), RPN proposals and final detections at 800x1333 are the float32 decoding of
    the heads' outputs, within 0.1 px: anchors, proposals and decoding stay in float32."""
    torch.manual_seed(0)
    model = build_model(4, norm="bn", box_score_thresh=0.0, **TINY).eval()
    image = torch.rand(3, 800, 1333)
    heads, proposals, predictions = [], [], []
    _outputs_of(model.rpn.head, heads)
    _outputs_of(model.rpn, proposals)
    _outputs_of(model.roi_heads.box_predictor, predictions)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (detections,) = model([image])
        images, _ = model.transform([image])
        features = list(model.backbone(images.tensors).values())
    with torch.no_grad():  # the same head outputs, decoded in float32 outside autocast
        objectness, deltas = heads[0]
        assert all(t.dtype == torch.float32 for t in objectness + deltas)
        anchors = model.rpn.anchor_generator(images, [f.float() for f in features])
        assert all(a.dtype == torch.float32 for a in anchors)
        num_per_level = [o[0].numel() for o in objectness]
        from torchvision.models.detection.rpn import concat_box_prediction_layers
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        decoded = model.rpn.box_coder.decode(flat_deltas, anchors).view(1, -1, 4)
        expected, _ = model.rpn.filter_proposals(decoded, flat_objectness, images.image_sizes, num_per_level)
        assert proposals[0][0][0].dtype == torch.float32
        assert (proposals[0][0][0] - expected[0]).abs().max() < 0.1
        class_logits, box_regression = predictions[0]
        boxes, scores, labels = model.roi_heads.postprocess_detections(class_logits, box_regression, expected,
                                                                       images.image_sizes)
    assert detections["boxes"].dtype == torch.float32 and len(boxes[0]) > 0
    assert (detections["boxes"] - boxes[0]).abs().max() < 0.1
    assert torch.equal(detections["labels"], labels[0])


@pytest.mark.parametrize("norm", ["frozen", "bn", "cgbn"])
@pytest.mark.parametrize("box_head", ["mlp", "conv"])
def test_box_head_is_chosen_apart_from_the_norm(norm, box_head):
    """One head architecture for every norm, so norms are compared on one detector: mlp = 2 fc, no norm;
    conv = 4 conv + fc, with the norm's BatchNorm after each conv (none with frozen)."""
    head = _build(norm, box_head=box_head, **TINY).roi_heads.box_head
    if box_head == "mlp":
        assert isinstance(head, TwoMLPHead) and _norm_types(head) == set()
    else:
        assert isinstance(head, FastRCNNConvFCHead)
        assert len([m for m in head.modules() if isinstance(m, nn.Conv2d)]) == 4
        assert len(_norm_types(head)) == (0 if norm == "frozen" else 1)


def test_transform_normalizes_and_pads_without_resizing():
    model = build_model(4, **TINY)
    images, _ = _batch()
    batch, _ = model.transform(images)
    assert batch.image_sizes == [(192, 160), (128, 192)]
    assert batch.tensors.shape == (2, 3, 192, 192)  # padded to a multiple of 32
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(batch.tensors[1, :, :128, :192], (images[1] - mean) / std)
    assert (batch.tensors[1, :, 128:] == 0).all()


def test_eval_boxes_lie_inside_each_input_image():
    torch.manual_seed(0)
    model = build_model(4, box_score_thresh=0.0, **TINY).eval()
    images, _ = _batch()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        h, w = image.shape[-2:]
        assert len(out["boxes"]) > 0
        assert (out["boxes"] >= 0).all()
        assert (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all()
        assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()


@pytest.mark.parametrize("trained_norm", ["bn", "cgbn"])  # evaluate.py loads CGBN checkpoints as "bn"
def test_checkpoint_round_trip(tmp_path, trained_norm):
    torch.manual_seed(0)
    source = _build(trained_norm, **TINY)
    images, targets = _batch()
    source(images, targets)  # move BN running statistics away from their initial values
    path = tmp_path / "model_0000010.pth"
    torch.save({"model": source.state_dict(), "iteration": 10, "config": {"seed": 1},
                "rng": [{"torch": torch.get_rng_state(), "python": random.getstate()}]}, path)
    torch.manual_seed(1)
    loaded = build_model(4, norm="bn", weights=path, **TINY)
    expected = source.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_imagenet_resnet_state_dict_loads_into_backbone(tmp_path):
    from torchvision.models import resnet18

    imagenet = resnet18(weights=None)
    imagenet.bn1.running_mean.uniform_()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    for norm in ("frozen", "bn"):  # FrozenBatchNorm2d has no num_batches_tracked; BatchNorm2d has
        model = build_model(4, backbone="resnet18", norm=norm, weights=path)
        body = model.backbone.body
        assert torch.equal(body.conv1.weight, imagenet.conv1.weight)
        assert torch.equal(body.bn1.running_mean, imagenet.bn1.running_mean)
        assert torch.equal(body.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


def test_mismatched_weights_name_file_and_keys(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_model(4, **TINY).state_dict(), path)
    with pytest.raises(ValueError, match=r"tiny\.pth.*cls_score\.weight \(4, 256\) vs \(6, 256\)"):
        build_model(6, weights=path, **TINY)
    other_backbone = r"tiny\.pth.*missing.*layer1\.1\.conv1.*shape.*conv1\.weight \(16, 3, 7, 7\) vs \(64, 3, 7, 7\)"
    with pytest.raises(ValueError, match=other_backbone):
        build_model(4, backbone="resnet18", weights=path)
    not_resnet = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, not_resnet)
    with pytest.raises(ValueError, match=r"other\.pth.*ImageNet.*missing.*conv1\.weight.*unexpected.*encoder"):
        build_model(4, weights=not_resnet, **TINY)


class NotWeights:
    """A custom object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_unsafe_or_missing_files_are_refused(tmp_path):
    model = build_model(4, **TINY)
    path = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "extra": NotWeights()}, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*weights_only"):
        load_weights(model, path)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        load_weights(model, tmp_path / "absent.pth")
