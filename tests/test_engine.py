"""engine: to_device (the one place where images become float); on real ranks, gradient accumulation and PreciseBN."""
import pytest
import torch

from hvd_megdet.engine import to_device
from tests.harness import run_ranks

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


# ----------------------------------------------------------------------------------------------------------
# On real Horovod ranks


class _ToyDetector(torch.nn.Module):
    """A stand-in for the detector's train-mode interface: model(images, targets) -> {name: loss}, with a
    BatchNorm (and optionally a SyncBatchNorm over all ranks) whose statistics come from the images."""

    def __init__(self, with_bn=True, with_cgbn=False):
        super().__init__()
        from hvd_megdet.sync_bn import SyncBatchNorm

        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4) if with_bn else torch.nn.Identity()
        self.cgbn = SyncBatchNorm(4) if with_cgbn else torch.nn.Identity()
        self.head = torch.nn.Linear(4, 1)

    def forward(self, images, targets):
        features = self.cgbn(self.bn(self.conv(torch.stack(images))))
        predictions = self.head(features.mean((2, 3))).squeeze(1)
        wanted = torch.stack([t["value"] for t in targets])
        return {"loss_mse": ((predictions - wanted) ** 2).mean()}


def _toy_batch(generator, n):
    images = tuple(torch.rand(3, 5, 6, generator=generator) * 4 + 1 for _ in range(n))
    targets = tuple({"value": torch.rand((), generator=generator)} for _ in range(n))
    return images, targets


def _accumulation_rank():
    import horovod.torch as hvd

    from hvd_megdet.engine import train_step

    hvd.init()
    generator = torch.Generator().manual_seed(100 + hvd.rank())
    steps = [_toy_batch(generator, 4) for _ in range(2)]  # 2 steps of 4 images on this rank
    params = {}
    for passes in (1, 2):
        torch.manual_seed(0)
        model = _ToyDetector(with_bn=False)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        # Horovod: prefixed names, so the two optimizers' allreduces never share a name.
        optimizer = hvd.DistributedOptimizer(sgd, named_parameters=[(f"k{passes}.{n}", p) for n, p in
                                                                    model.named_parameters()],
                                             backward_passes_per_step=passes)
        for images, targets in steps:
            size = len(images) // passes
            batches = [(images[i:i + size], targets[i:i + size]) for i in range(0, len(images), size)]
            result = train_step(model, optimizer, batches)
            assert not result.skipped
        params[passes] = [p.detach().clone() for p in model.parameters()]
    return params


@pytest.mark.multirank
def test_two_backward_passes_of_two_images_step_like_one_pass_of_four():
    for params in run_ranks(_accumulation_rank, np=2, timeout=120):
        for accumulated, whole in zip(params[2], params[1]):
            torch.testing.assert_close(accumulated, whole, rtol=1e-6, atol=1e-7)


def _precise_bn_rank(num_iters):
    import horovod.torch as hvd

    from hvd_megdet.engine import precise_bn

    hvd.init()
    torch.manual_seed(0)
    model = _ToyDetector(with_cgbn=True)
    model.bn.momentum = 0.3
    model.bn.running_mean.fill_(7.0)  # EMA values that PreciseBN must forget
    generator = torch.Generator().manual_seed(hvd.rank())
    batches = [_toy_batch(generator, 3) for _ in range(num_iters)]
    # The truth, rank by rank: each batch's mean and unbiased variance of bn's input and of cgbn's input
    # (cgbn over the batches of both ranks: gathered below).
    with torch.no_grad():
        conv_out = [model.conv(torch.stack(images)) for images, _ in batches]
        local = [(x.mean((0, 2, 3)), x.var((0, 2, 3))) for x in conv_out]  # running_var is unbiased
        bn_out = [torch.nn.functional.batch_norm(x, None, None, model.bn.weight, model.bn.bias, True, 0.0,
                                                 model.bn.eps) for x in conv_out]
    tracked = model.bn.num_batches_tracked.clone()
    precise_bn(model, iter(batches), num_iters)
    return {"bn": (model.bn.running_mean, model.bn.running_var),
            "cgbn": (model.cgbn.running_mean, model.cgbn.running_var),
            "local": local, "bn_out": bn_out, "momentum": model.bn.momentum,
            "tracked": torch.equal(tracked, model.bn.num_batches_tracked), "training": model.training}


@pytest.mark.multirank
def test_precise_bn_is_the_true_average_over_batches_and_ranks():
    num_iters = 3
    ranks = run_ranks(_precise_bn_rank, np=2, args=(num_iters,), timeout=120)
    # bn: per-batch statistics averaged over the batches, then over the ranks.
    mean = torch.stack([m for r in ranks for m, _ in r["local"]]).mean(0)
    var = torch.stack([v for r in ranks for _, v in r["local"]]).mean(0)
    # cgbn: statistics of each global batch (both ranks' i-th batches), averaged over the batches.
    global_batches = [torch.cat([r["bn_out"][i] for r in ranks]) for i in range(num_iters)]
    cgbn_mean = torch.stack([x.mean((0, 2, 3)) for x in global_batches]).mean(0)
    cgbn_var = torch.stack([x.var((0, 2, 3)) for x in global_batches]).mean(0)
    for r in ranks:
        torch.testing.assert_close(r["bn"][0], mean)
        torch.testing.assert_close(r["bn"][1], var)
        torch.testing.assert_close(r["cgbn"][0], cgbn_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["cgbn"][1], cgbn_var, rtol=1e-5, atol=1e-6)
        assert r["momentum"] == 0.3 and r["tracked"] and r["training"]
