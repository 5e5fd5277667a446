"""Tests for hvd_megdet.sync_bn.

Single-process unit tests first; then multi-rank checks on real Horovod ranks (tests.harness.run_ranks), where
every rank rebuilds the global batch from a shared seed, runs SyncBatchNorm on its own slice and compares with
nn.BatchNorm*d on the whole concatenated batch (the template of Horovod's test_horovod_sync_batch_norm). Each
launch runs many checks and returns {check: error}, so a handful of launches cover every semantic of the issue.
"""
import contextlib
import copy
import math
import os
from unittest import mock

import horovod.torch as hvd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hvd_megdet.sync_bn import (LOCAL, SyncBatchNorm, bn_group, bn_process_sets, convert_sync_batchnorm,
                                register_collective_hook, revert_sync_batchnorm)
from tests.harness import run_ranks

TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BATCHNORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _err(actual, expected):
    """Max abs difference relative to max(1, max |expected|), inf where either is NaN; shapes must match."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().nan_to_num(nan=math.inf)
    return (diff.max() / expected.double().abs().max().clamp(min=1)).item()


def _pair(dim, channels, dtype=torch.float64, seed=0, **bn_kwargs):
    """A SyncBatchNorm and an nn.BatchNorm*d with the same random affine parameters."""
    sbn_kwargs = {k: bn_kwargs.pop(k) for k in ("process_set", "two_phase") if k in bn_kwargs}
    sbn = SyncBatchNorm(channels, **bn_kwargs, **sbn_kwargs)
    ref = BATCHNORM[dim](channels, **bn_kwargs)
    if ref.affine:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in (ref.weight, ref.bias):
                p.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
    sbn.load_state_dict(ref.state_dict())
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return sbn.to(param_dtype), ref.to(param_dtype)


def _batch(sizes, channels, spatial, seed, shift=0.0):
    """Global input and upstream gradient (float64) for per-rank batch sizes; channel means 3 + c + shift, std 2."""
    gen = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), channels, *spatial)
    offset = torch.arange(channels, dtype=torch.float64).view(1, channels, *[1] * len(spatial))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3 + shift + offset
    return x, torch.randn(shape, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Single process (Horovod not initialized: a world of 1)


@pytest.mark.parametrize("dim", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_world_of_one_equals_batchnorm_without_collectives(dim, momentum):
    sbn, ref = _pair(dim, 3, momentum=momentum)
    spatial = (4, 3, 2)[: dim - 2]
    with mock.patch.object(hvd, "allreduce_async_", side_effect=AssertionError("collective in a world of 1")):
        for seed in range(3):
            x, g = _batch([5], 3, spatial, seed)
            xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            y, yr = sbn(xs), ref(xr)
            (y * g).sum().backward()
            (yr * g).sum().backward()
            assert _err(y, yr) < 1e-12 and _err(xs.grad, xr.grad) < 1e-12
        assert _err(sbn.weight.grad, ref.weight.grad) < 1e-12
        for name, buf in ref.named_buffers():
            assert torch.equal(getattr(sbn, name), buf), name
        sbn.eval(), ref.eval()
        assert _err(sbn(x), ref(x)) < 1e-12


def _net():
    from torchvision.ops import FrozenBatchNorm2d  # not at the top: every rank imports this file

    return nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.Flatten(), nn.Unflatten(1, (3, 2, 2)),
                         nn.BatchNorm2d(3, momentum=None), FrozenBatchNorm2d(3), nn.Unflatten(1, (3, 1)),
                         nn.BatchNorm3d(3, affine=False, track_running_stats=False))


def test_convert_revert_round_trip_keeps_parameters_buffers_and_flags():
    torch.manual_seed(0)
    net = _net().double()
    net[1].weight.requires_grad_(False)
    net[4].eval()
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    net(x)  # non-trivial running statistics
    expected = copy.deepcopy(net).eval()(x)
    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())

    frozen_bn = type(net[5])
    converted = convert_sync_batchnorm(net, two_phase=False, wait="horovod", poll_seconds=1e-4, cuda_kernels=True)
    assert [type(m) for m in converted] == [nn.Conv1d, SyncBatchNorm, nn.Flatten, nn.Unflatten, SyncBatchNorm,
                                            frozen_bn, nn.Unflatten, SyncBatchNorm]
    assert converted[1].two_phase is False and converted[4].momentum is None
    assert all((m.wait, m.poll_seconds, m.cuda_kernels) == ("horovod", 1e-4, True)
               for m in converted if isinstance(m, SyncBatchNorm))
    assert not converted[7].affine and not converted[7].track_running_stats
    assert [m.training for m in converted] == [True, True, True, True, False, True, True, True]
    for name, p in converted.named_parameters():
        assert p is params[name]
    assert not converted[1].weight.requires_grad and converted[1].bias.requires_grad
    for name, b in converted.named_buffers():
        assert b is buffers[name]
    assert set(dict(converted.named_parameters())) == set(params)
    assert set(dict(converted.named_buffers())) == set(buffers)

    reverted = revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted] == [type(m) for m in _net()]
    for name, p in reverted.named_parameters():
        assert p is params[name]
    assert not reverted[1].weight.requires_grad
    assert torch.equal(reverted.eval()(x), expected)


def test_revert_picks_the_class_of_the_last_input_dim():
    sbn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="seen no input"):
        revert_sync_batchnorm(sbn)
    sbn(torch.randn(2, 3, 4, 4, 4))
    assert type(revert_sync_batchnorm(sbn)) is nn.BatchNorm3d
    sbn(torch.randn(4, 3))
    assert type(revert_sync_batchnorm(sbn)) is nn.BatchNorm1d


def test_bad_inputs_and_arguments_raise():
    sbn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="2D to 5D"):
        sbn(torch.randn(2, 3, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="3 channels"):
        sbn(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="process_set"):
        SyncBatchNorm(3, process_set=[0, 1])
    with pytest.raises(ValueError, match="wait must be one of auto, sleep, horovod, got 'spin'"):
        SyncBatchNorm(3, wait="spin")
    with pytest.raises(ValueError, match="poll_seconds"):
        SyncBatchNorm(3, poll_seconds=-1)


def test_bn_process_sets_are_consecutive_ranks():
    assert [ps.ranks for ps in bn_process_sets(2, 8)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [ps.ranks for ps in bn_process_sets(4, 8)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert bn_process_sets(1, 8) == [] and bn_process_sets(8, 8) == []
    for k, world in [(3, 8), (0, 8), (16, 8), (2.0, 8)]:
        with pytest.raises(ValueError, match="must divide the world size"):
            bn_process_sets(k, world)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_world_of_one_matches_batchnorm_in_fp16_autocast():
    sbn, ref = _pair(4, 3, dtype=torch.float32)
    sbn, ref = sbn.cuda(), ref.cuda()
    x = torch.randn(4, 3, 5, 5, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y, yr = sbn(x.half()), ref(x.half())
    assert y.dtype == yr.dtype == torch.float16 and _err(y, yr) < TOL[torch.float16]


# ----------------------------------------------------------------------------------------------------------
# Multi-rank: rank-side functions (module level so cloudpickle ships them by reference)


def _sizes(kind, size):
    """Per-rank batch sizes: even, uneven, one empty rank (rank 0), or all empty."""
    return {"even": [2] * size, "uneven": [2, 1, 3][:size], "empty": [0, 3, 1][:size] if size > 1 else [3],
            "none": [0] * size}[kind]


# name: (input dims after N and C, per-rank batch sizes, extra BatchNorm kwargs)
CASES = {
    "2d": ((), "even", {}),
    "3d": ((5,), "even", {}),
    "4d": ((3, 4), "even", {}),
    "5d": ((2, 3, 2), "even", {}),
    "uneven": ((3, 4), "uneven", {}),
    "empty_rank": ((3, 4), "empty", {}),
    "empty_global": ((3, 4), "none", {}),
    "momentum_none": ((5,), "uneven", {"momentum": None}),
    "no_affine": ((2, 3, 2), "uneven", {"affine": False}),
    "no_running_stats": ((3, 4), "uneven", {"track_running_stats": False}),
}


def _check_case(errors, counts, key, sbn, ref, spatial, sizes, dtype, rank, memory_format=None, iters=2,
                device="cpu"):
    """Train `iters` steps then one eval step on this rank's slice; record errors vs `ref` on the full batch
    in `errors` and allreduces per forward and forward+backward in `counts`."""
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for it in range(iters + 1):
        mode = "eval" if it == iters else "train"
        if mode == "eval":
            sbn.eval(), ref.eval()
        x_full, g_full = (t.to(device, dtype) for t in _batch(sizes, sbn.num_features, spatial, seed=100 + it))
        x, g = x_full[lo:hi], g_full[lo:hi]
        if memory_format is not None:
            x, g = x.contiguous(memory_format=memory_format), g.contiguous(memory_format=memory_format)
        x.requires_grad_()
        xr = x_full.float() if dtype in (torch.float16, torch.bfloat16) else x_full.clone()
        xr.requires_grad_()
        with mock.patch.object(hvd, "allreduce_async_", wraps=hvd.allreduce_async_) as allreduce:
            y = sbn(x)
            counts[f"{key}/{mode}/forward"] = allreduce.call_count
            (y * g).sum().backward()
            counts[f"{key}/{mode}/backward"] = allreduce.call_count
        yr = ref(xr)
        (yr * g_full.to(yr.dtype)).sum().backward()
        errors[f"{key}/output"] = max(errors.get(f"{key}/output", 0), _err(y, yr[lo:hi]))
        errors[f"{key}/grad_input"] = max(errors.get(f"{key}/grad_input", 0), _err(x.grad, xr.grad[lo:hi]))
        assert y.dtype == dtype and x.grad.dtype == dtype
        if memory_format is not None:
            assert y.is_contiguous(memory_format=memory_format), f"{key}: output lost {memory_format}"
            assert x.grad.is_contiguous(memory_format=memory_format), f"{key}: grad lost {memory_format}"
        if sbn.affine:
            # Weight and bias gradients stay local: each rank's is its slice's share of nn.BatchNorm's
            # (sum dy * xhat, sum dy), so their sum over ranks is nn.BatchNorm's gradient.
            dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
            xhat = (yr.detach().double() - ref.bias.double().view(shape)) / ref.weight.double().view(shape)
            xhat = xhat[lo:hi]
            g_local = g_full[lo:hi].double()
            for name, expected in (("weight", (g_local * xhat).sum(dims)), ("bias", g_local.sum(dims))):
                local = getattr(sbn, name).grad
                assert local.dtype == getattr(ref, name).dtype
                errors[f"{key}/grad_{name}"] = max(errors.get(f"{key}/grad_{name}", 0), _err(local, expected))
            sbn.zero_grad()
        for name, buf in ref.named_buffers():
            assert getattr(sbn, name).dtype == buf.dtype
            errors[f"{key}/{name}"] = _err(getattr(sbn, name), buf)


def _init(**kwargs):
    torch.set_num_threads(1)  # ranks share the cores: idle intra-op threads would spin against the other ranks
    hvd.init(**kwargs)
    return hvd.rank(), hvd.size()


def _semantics():
    """Rank-side battery: every case, both algorithms, float64 and float32, plus half precision,
    channels_last, a global batch of one, gradcheck and SGD training. Returns (errors, counts, flags)."""
    rank, size = _init()
    errors, counts, flags = {}, {}, {}
    for two_phase in (True, False):
        for dtype in (torch.float64, torch.float32):
            for name, (spatial, sizes, kwargs) in CASES.items():
                sbn, ref = _pair(2 + len(spatial), 3, dtype, two_phase=two_phase, **kwargs)
                _check_case(errors, counts, f"{name}/{two_phase}/{dtype}", sbn, ref, spatial,
                            _sizes(sizes, size), dtype, rank)
        for dtype in (torch.float16, torch.bfloat16):
            sbn, ref = _pair(4, 3, dtype, two_phase=two_phase)
            _check_case(errors, counts, f"half/{two_phase}/{dtype}", sbn, ref, (3, 4), _sizes("uneven", size),
                        dtype, rank)
        for spatial, fmt in (((3, 4), torch.channels_last), ((2, 3, 2), torch.channels_last_3d)):
            for dtype in (torch.float32, torch.bfloat16):
                sbn, ref = _pair(2 + len(spatial), 3, dtype, two_phase=two_phase)
                _check_case(errors, counts, f"channels_last{len(spatial) + 2}d/{two_phase}/{dtype}", sbn, ref,
                            spatial, _sizes("uneven", size), dtype, rank, memory_format=fmt)
        flags[f"far_mean_within_4x_batchnorm/{two_phase}"] = _far_mean_error_ratio(rank, size, two_phase) < 4
        flags[f"count_one_raises/{two_phase}"] = _count_one_raises(rank, size, two_phase)
        flags[f"gradcheck/{two_phase}"] = _gradcheck(rank, size, two_phase)
        errors.update(_train_net(rank, size, two_phase))
    return errors, counts, flags


def _far_mean_error_ratio(rank, size, two_phase):
    """Output error (vs float64) of a float32 SyncBatchNorm on inputs whose means are 1000x their std, over
    nn.BatchNorm2d's own float32 error: statistics must not cancel (E[x^2] - E[x]^2 in float32 would be
    ~1e3x worse than BatchNorm)."""
    sizes = _sizes("uneven", size)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, _ = _batch(sizes, 3, (16, 16), seed=5, shift=2000.0)
    sbn, ref = _pair(4, 3, two_phase=two_phase)
    truth = ref(x)[lo:hi]
    ours = sbn.float()(x[lo:hi].float())
    theirs = copy.deepcopy(ref).float()(x.float())[lo:hi]
    return _err(ours, truth) / _err(theirs, truth)


def _count_one_raises(rank, size, two_phase):
    """A global batch of one value per channel raises ValueError on every rank, like torch, without hanging."""
    sbn = SyncBatchNorm(3, two_phase=two_phase)
    try:
        sbn(torch.randn(1 if rank == 0 else 0, 3))
    except ValueError as e:
        return "more than 1 value per channel" in str(e).lower()
    return False


class _SumGradsOverRanks(torch.autograd.Function):
    """Identity; the backward sums the gradient over ranks (for a tensor replicated on every rank)."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return hvd.allreduce(grad, op=hvd.Sum)


def _gradcheck(rank, size, two_phase):
    """gradcheck of X -> allgather(SyncBN(X[this rank's slice])) with X, weight, bias replicated on all ranks.

    Every rank perturbs X the same way in lockstep, so the numerical Jacobian is that of the global function;
    the analytical one sums each rank's contribution (_SumGradsOverRanks). fast_mode compares random
    projections of both Jacobians (equal random vectors on all ranks from the shared seed), which keeps the
    number of collectives small."""
    sizes = _sizes("uneven", size)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, _ = _batch(sizes, 2, (3,), seed=7)
    sbn, _ = _pair(3, 2, two_phase=two_phase)
    w, b = (p.detach().clone().requires_grad_() for p in (sbn.weight, sbn.bias))

    def fn(x, w, b):
        params = {"weight": _SumGradsOverRanks.apply(w), "bias": _SumGradsOverRanks.apply(b)}
        y = torch.func.functional_call(sbn, params, (_SumGradsOverRanks.apply(x)[lo:hi],))
        return hvd.allgather(y)

    torch.manual_seed(0)
    return torch.autograd.gradcheck(fn, (x.requires_grad_(), w, b), fast_mode=True, raise_exception=False)


def _small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()


def _train_net(rank, size, two_phase, steps=3):
    """SGD under hvd.DistributedOptimizer with SyncBatchNorm (2 images per rank) vs single-process SGD on the
    full batch with nn.BatchNorm2d: losses, parameters and buffers after each step."""
    torch.manual_seed(0)
    ref = _small_net()
    net = convert_sync_batchnorm(copy.deepcopy(ref), two_phase=two_phase)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                   named_parameters=[(f"{two_phase}.{n}", p) for n, p in net.named_parameters()])
    gen = torch.Generator().manual_seed(1)
    errors = {}
    for step in range(steps):
        x = torch.randn(2 * size, 3, 8, 8, generator=gen, dtype=torch.float64)
        t = torch.randn(2 * size, 2, generator=gen, dtype=torch.float64)
        ref_opt.zero_grad()
        ref_loss = F.mse_loss(ref(x), t)
        ref_loss.backward()
        ref_opt.step()
        opt.zero_grad()
        loss = F.mse_loss(net(x[2 * rank: 2 * rank + 2]), t[2 * rank: 2 * rank + 2])
        loss.backward()
        opt.step()
        mean_loss = hvd.allreduce(loss.detach(), op=hvd.Average, name=f"test.loss.{two_phase}.{step}")
        errors[f"train/{two_phase}/torch.float64/loss{step}"] = _err(mean_loss, ref_loss.detach())
    for (name, p), pr in zip(net.state_dict().items(), ref.state_dict().values()):
        errors[f"train/{two_phase}/torch.float64/{name}"] = _err(p, pr)
    return errors


def _bn_groups(registration):
    """Rank-side, np=4: BN groups {0,1}, {2,3} registered `registration` ("static": at init, "dynamic": after
    it), and BN size 1 (LOCAL); each group must match nn.BatchNorm on its own two slices only. One registration
    per job: a static Gloo job cannot re-initialize Horovod (a rank that re-initializes first may read a peer's
    address from the first init in the rendezvous store, and its connection is refused)."""
    sets = bn_process_sets(2, int(os.environ["HOROVOD_SIZE"])) if registration == "static" else None
    rank, _ = _init(process_sets=sets or "dynamic")
    sizes = [2, 1, 3, 2]
    group_sizes = sizes[rank // 2 * 2: rank // 2 * 2 + 2]
    errors, counts = {}, {}
    flags = {"bn_group(4) is global": bn_group(4) is None, "bn_group(1) is LOCAL": bn_group(1) == LOCAL}
    try:
        bn_group(3)
        flags["bn_group(3) raises"] = False
    except ValueError:
        flags["bn_group(3) raises"] = True
    group = bn_group(2, sets)
    flags[f"{registration} group ranks"] = group.ranks == [rank // 2 * 2, rank // 2 * 2 + 1]
    for two_phase in (True, False) if registration == "static" else (True,):
        sbn, ref = _pair(4, 3, two_phase=two_phase, process_set=group)
        _check_case(errors, counts, f"{registration}/{two_phase}/torch.float64", sbn, ref, (3, 4),
                    group_sizes, torch.float64, rank % 2)
    sbn, ref = _pair(4, 3, process_set=bn_group(1))
    _check_case(errors, counts, "local/True/torch.float64", sbn, ref, (3, 4), [sizes[rank]], torch.float64, 0)
    return errors, counts, flags


def _cuda_semantics():
    """Rank-side: CUDA tensors (ranks may share a GPU), float32 and float16 under autocast, both algorithms."""
    _init()
    device = torch.device("cuda", hvd.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    errors, counts = {}, {}
    for two_phase in (True, False):
        for dtype in (torch.float32, torch.float16):
            sbn, ref = _pair(4, 3, dtype, two_phase=two_phase)
            with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
                _check_case(errors, counts, f"cuda/{two_phase}/{dtype}", sbn.to(device), ref.to(device), (3, 4),
                            _sizes("uneven", hvd.size()), dtype, hvd.rank(), device=device)
    return errors, counts, {}


# Layers fused by forward_sharing_collectives: (input dims after N and C, channels, extra BatchNorm kwargs).
FUSED = [((3, 4), 3, {}), ((5,), 4, {"momentum": None}), ((2, 3), 2, {"affine": False}),
         ((), 5, {"track_running_stats": False})]


def _fused(rank, size, two_phase, iters=2):
    """forward_sharing_collectives on FUSED's four layers against nn.BatchNorm on each full batch: errors of outputs,
    input gradients, weight/bias gradients summed over ranks and buffers, and allreduces per call."""
    sizes = _sizes("uneven", size)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    pairs = [_pair(2 + len(spatial), c, seed=j, two_phase=two_phase, **kwargs)
             for j, (spatial, c, kwargs) in enumerate(FUSED)]
    errors, counts = {}, {}
    for it in range(iters + 1):
        mode = "eval" if it == iters else "train"
        batches = [_batch(sizes, c, spatial, seed=10 * it + j) for j, (spatial, c, _) in enumerate(FUSED)]
        xs = [x[lo:hi].clone().requires_grad_() for x, _ in batches]
        with mock.patch.object(hvd, "allreduce_async_", wraps=hvd.allreduce_async_) as allreduce:
            ys = SyncBatchNorm.forward_sharing_collectives([sbn.train(mode == "train") for sbn, _ in pairs], xs)
            counts[f"fused/{two_phase}/torch.float64/{mode}/forward"] = allreduce.call_count
            sum((y * g[lo:hi]).sum() for y, (_, g) in zip(ys, batches)).backward()
            counts[f"fused/{two_phase}/torch.float64/{mode}/backward"] = allreduce.call_count
        for j, ((sbn, ref), (x, g), y, x_local) in enumerate(zip(pairs, batches, ys, xs)):
            xr = x.clone().requires_grad_()
            yr = ref.train(mode == "train")(xr)
            (yr * g).sum().backward()
            key = f"fused/{two_phase}/torch.float64/layer{j}"
            errors[f"{key}/output"] = max(errors.get(f"{key}/output", 0), _err(y, yr[lo:hi]))
            errors[f"{key}/grad_input"] = max(errors.get(f"{key}/grad_input", 0), _err(x_local.grad, xr.grad[lo:hi]))
            for name in ("weight", "bias") if sbn.affine else ():
                total = hvd.allreduce(getattr(sbn, name).grad, op=hvd.Sum, name=f"fused.{key}.{name}.{it}")
                errors[f"{key}/grad_{name}"] = _err(total, getattr(ref, name).grad)
                getattr(sbn, name).grad, getattr(ref, name).grad = None, None
            for name, buf in ref.named_buffers():
                errors[f"{key}/{name}"] = _err(getattr(sbn, name), buf)
    return errors, counts


def _fused_battery():
    """Rank-side: forward_sharing_collectives with both algorithms, then layers of mixed algorithms in one call."""
    rank, size = _init()
    errors, counts, flags = {}, {}, {}
    for two_phase in (True, False):
        e, c = _fused(rank, size, two_phase)
        errors.update(e)
        counts.update(c)
    mixed = [SyncBatchNorm(3, two_phase=True), SyncBatchNorm(3, two_phase=False), SyncBatchNorm(3, two_phase=True)]
    with mock.patch.object(hvd, "allreduce_async_", wraps=hvd.allreduce_async_) as allreduce:
        SyncBatchNorm.forward_sharing_collectives(mixed, [torch.randn(2, 3, 4) for _ in mixed])
        flags["mixed algorithms: one fused set per algorithm"] = allreduce.call_count == 2 + 1
    return errors, counts, flags


def _world_of_one():
    """Rank-side, np=1: an initialized world of 1 is nn.BatchNorm and issues no collective."""
    _init()
    errors, counts = {}, {}
    for name in ("4d", "empty_global", "momentum_none", "no_running_stats"):
        spatial, sizes, kwargs = CASES[name]
        for two_phase in (True, False):
            sbn, ref = _pair(2 + len(spatial), 3, two_phase=two_phase, **kwargs)
            _check_case(errors, counts, f"{name}/{two_phase}/torch.float64", sbn, ref, spatial, _sizes(sizes, 1),
                        torch.float64, 0)
    return errors, counts, {}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"np{n}")
def semantics(request):
    """(np, per-rank (errors, counts, flags)) of one launch of `_semantics`."""
    return request.param, run_ranks(_semantics, np=request.param, timeout=240)


DTYPES = {str(d): d for d in TOL}


def _assert_errors(results, prefix):
    """Every error named `prefix`* (keys are case/two_phase/dtype/metric) is within the dtype's tolerance;
    half-precision inputs still get float32 tolerance on parameters' gradients and running statistics."""
    checked = 0
    for rank, (errors, _, _) in enumerate(results):
        for key, err in errors.items():
            if key.startswith(prefix):
                dtype, metric = DTYPES[key.split("/")[2]], key.split("/")[3]
                if metric not in ("output", "grad_input"):
                    dtype = torch.promote_types(dtype, torch.float32)
                assert err < TOL[dtype], f"rank {rank}: {key} error {err:.3g} >= {TOL[dtype]}"
                checked += 1
    assert checked, f"no check named {prefix}*"


def _assert_counts(results, group_size):
    """Allreduces per layer: training 2 forward + 1 backward (two_phase), 1 + 1 otherwise; eval with running
    statistics, a group of 1 and LOCAL none; eval without running statistics as training."""
    for rank, (_, counts, _) in enumerate(results):
        assert counts
        for key, n in counts.items():
            case, two_phase, _, mode, phase = key.split("/")
            forward = 2 if two_phase == "True" else 1
            synced = group_size > 1 and case != "local" and (mode == "train" or case == "no_running_stats")
            expected = (forward if phase == "forward" else forward + 1) if synced else 0
            assert n == expected, f"rank {rank}: {key}: {n} allreduces, expected {expected}"


def _assert_flags(results):
    for rank, (_, _, flags) in enumerate(results):
        assert flags and all(flags.values()), f"rank {rank}: {flags}"


@pytest.mark.multirank
@pytest.mark.parametrize("case", ["2d", "3d", "4d", "5d"])
def test_matches_batchnorm_on_concatenated_batch(semantics, case):
    _assert_errors(semantics[1], f"{case}/")


@pytest.mark.multirank
@pytest.mark.parametrize("case", ["uneven", "empty_rank", "empty_global"])
def test_uneven_and_empty_batches_are_exact(semantics, case):
    _assert_errors(semantics[1], f"{case}/")


@pytest.mark.multirank
@pytest.mark.parametrize("case", ["momentum_none", "no_affine", "no_running_stats"])
def test_batchnorm_options_follow_torch(semantics, case):
    _assert_errors(semantics[1], f"{case}/")


@pytest.mark.multirank
def test_half_precision_uses_float32_statistics(semantics):
    _assert_errors(semantics[1], "half/")


@pytest.mark.multirank
def test_float32_statistics_hold_for_means_far_from_zero(semantics):
    for rank, (_, _, flags) in enumerate(semantics[1]):
        checks = {k: v for k, v in flags.items() if k.startswith("far_mean")}
        assert len(checks) == 2 and all(checks.values()), f"rank {rank}: {checks}"


@pytest.mark.multirank
def test_channels_last_is_preserved(semantics):
    _assert_errors(semantics[1], "channels_last")


@pytest.mark.multirank
def test_training_follows_single_process_full_batch(semantics):
    _assert_errors(semantics[1], "train/")


@pytest.mark.multirank
def test_gradcheck_across_ranks_and_global_batch_of_one_raises(semantics):
    _assert_flags(semantics[1])


@pytest.mark.multirank
def test_collectives_per_layer(semantics):
    _assert_counts(semantics[1], group_size=semantics[0])


@pytest.mark.multirank
def test_fused_layers_match_batchnorm_with_the_collectives_of_one_layer():
    results = run_ranks(_fused_battery, np=2, timeout=180)
    _assert_errors(results, "fused/")
    _assert_flags(results)
    # Per call, what one layer issues, whatever the number of layers; in eval mode too, because the
    # layer without running statistics still normalizes with the group's batch statistics.
    for rank, (_, counts, _) in enumerate(results):
        for two_phase, forward in (("True", 2), ("False", 1)):
            for mode in ("train", "eval"):
                key = f"fused/{two_phase}/torch.float64/{mode}"
                assert (counts[f"{key}/forward"], counts[f"{key}/backward"]) == (forward, forward + 1), rank


@pytest.mark.multirank
def test_world_of_one_issues_no_collective():
    results = run_ranks(_world_of_one, np=1, timeout=120)
    _assert_errors(results, "")
    _assert_counts(results, group_size=1)


@pytest.mark.multirank
@pytest.mark.parametrize("registration", ["static", "dynamic"])
def test_bn_groups_of_two_on_four_ranks(registration):
    results = run_ranks(_bn_groups, np=4, args=(registration,), timeout=180)
    _assert_flags(results)
    for prefix in (f"{registration}/", "local/"):
        _assert_errors(results, prefix)
    _assert_counts(results, group_size=2)


@pytest.mark.multirank
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.skipif(torch.cuda.device_count() < 2 and bool(hvd.nccl_built()),
                    reason="one GPU: NCCL refuses two ranks on the same GPU")
def test_cuda_tensors_on_two_ranks():
    results = run_ranks(_cuda_semantics, np=2, timeout=180)
    _assert_errors(results, "cuda/")
    _assert_counts(results, group_size=2)


def _average_running_stats_rank():
    from hvd_megdet.sync_bn import average_running_stats

    hvd.init()
    model = nn.Sequential(nn.BatchNorm2d(3), convert_sync_batchnorm(nn.BatchNorm1d(2), process_set=LOCAL),
                          nn.BatchNorm2d(2))
    with torch.no_grad():
        for m in model[:2]:  # per-rank statistics: rank r holds r + channel index, variance 1 + 2r
            m.running_mean.copy_(torch.arange(m.num_features, dtype=torch.float32) + hvd.rank())
            m.running_var.fill_(1.0 + 2 * hvd.rank())
        model[2].running_mean.copy_(torch.tensor([0.1, 1 / 3]))  # equal on every rank
    same_before = model[2].running_mean.clone()
    events = []
    with register_collective_hook(lambda name, event: events.append(event)):
        average_running_stats(model)
    return {"stats": [(m.running_mean.tolist(), m.running_var.tolist()) for m in model],
            "equal_kept": torch.equal(model[2].running_mean, same_before), "allreduces": events.count("start")}


@pytest.mark.multirank
def test_average_running_stats_makes_one_model_from_per_rank_statistics():
    ranks = run_ranks(_average_running_stats_rank, np=3, timeout=120)
    assert ranks[0] == ranks[1] == ranks[2]  # one model
    stats = ranks[0]["stats"]
    assert stats[0] == ([1.0, 2.0, 3.0], [3.0, 3.0, 3.0])  # means of ranks 0, 1, 2; variances 1, 3, 5
    assert stats[1] == ([1.0, 2.0], [3.0, 3.0])
    assert ranks[0]["equal_kept"] and ranks[0]["allreduces"] == 1  # bit for bit; one collective in all


def _collective_hook_rank():
    _init()
    layer, events = SyncBatchNorm(3), []
    handle = register_collective_hook(lambda name, event: events.append((name, event)))
    for _ in range(2):  # the second step after handle.remove(): no event
        layer(torch.randn(2, 3, 4, requires_grad=True)).sum().backward()
        handle.remove()
    return events


@pytest.mark.multirank
def test_a_collective_hook_is_told_of_each_collective_until_removed():
    expected = [(f"sync_bn.0.{kind}", event) for kind in ("sum", "sqdev", "grad") for event in ("start", "wait", "end")]
    assert run_ranks(_collective_hook_rank, np=2, timeout=120) == [expected] * 2


def _wait_modes_rank():
    """Two layers in one process, one waiting with a sleeping poll, one with Horovod's own wait, on the same
    batch: how each waited (hvd.poll calls while it waited, per collective), and what it computed."""
    _init()
    layers = {wait: SyncBatchNorm(3, wait=wait) for wait in ("sleep", "horovod")}
    gen = torch.Generator().manual_seed(hvd.rank())
    x, dy = torch.randn(2 + hvd.rank(), 3, 4, generator=gen), torch.randn(2 + hvd.rank(), 3, 4, generator=gen)
    results = {}
    for wait, layer in layers.items():
        waits, polls = [], []

        def told(name, event):
            if event == "wait":
                waits.append(name)
                polls.append(0)

        def poll(handle, real=hvd.poll):
            polls[-1] += 1
            return real(handle)

        xi = x.clone().requires_grad_()
        with register_collective_hook(told), mock.patch.object(hvd, "poll", poll):
            y = layer(xi)
            y.backward(dy)
        results[wait] = {"polls": dict(zip(waits, polls)), "output": y.detach(), "grad_input": xi.grad,
                         "grad_weight": layer.weight.grad, "running_var": layer.running_var}
    return results


@pytest.mark.multirank
def test_layers_of_one_process_wait_each_as_built():
    """The wait is a layer's own (not the process's): the "sleep" layer polls in each of its three waits, the
    "horovod" layer never polls; both compute the same thing, bit for bit."""
    for ranks in run_ranks(_wait_modes_rank, np=2, timeout=120):
        sleeping, spinning = ranks["sleep"], ranks["horovod"]
        assert list(sleeping["polls"]) == ["sync_bn.0.sum", "sync_bn.0.sqdev", "sync_bn.0.grad"]
        assert all(n >= 1 for n in sleeping["polls"].values())
        assert spinning["polls"] == {"sync_bn.1.sum": 0, "sync_bn.1.sqdev": 0, "sync_bn.1.grad": 0}
        for key in ("output", "grad_input", "grad_weight", "running_var"):
            assert torch.equal(sleeping[key], spinning[key]), key


def _host_reads_rank():
    hvd.init()
    layers = [SyncBatchNorm(3, two_phase=two_phase) for two_phase in (True, False)]
    reads = []

    def recording(method):
        def read(self, *args, **kwargs):
            reads.append(method)
            return getattr(torch.Tensor, f"_original_{method}")(self, *args, **kwargs)
        return read

    methods = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__")
    for method in methods:
        setattr(torch.Tensor, f"_original_{method}", getattr(torch.Tensor, method))
    with mock.patch.multiple(torch.Tensor, **{m: recording(m) for m in methods}):
        for layer in layers:
            x = torch.randn(2 + hvd.rank(), 3, 4, 5, requires_grad=True)
            layer(x).square().sum().backward()
        fused_inputs = [torch.randn(2, 3, 4, requires_grad=True) for _ in layers]
        sum(y.sum() for y in SyncBatchNorm.forward_sharing_collectives(layers, fused_inputs)).backward()
    return reads


@pytest.mark.multirank
def test_training_reads_nothing_on_the_host():
    """Counts and statistics stay on the device: no tolist/item/bool of a tensor per layer, forward or backward
    (on a GPU each would make the CPU wait for the device at every layer)."""
    assert run_ranks(_host_reads_rank, np=2, timeout=120) == [[], []]


# torch's fused SyncBatchNorm kernels are CUDA-only: CPU stand-ins with their documented semantics let the
# plumbing around them (what goes in, what travels, what comes out) be tested here; scripts/gpu_check.sh
# checks the real kernels on a GPU.
def _reference_stats(x, eps):
    dims = [0, *range(2, x.dim())]
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return xf.mean(dims), (xf.var(dims, unbiased=False) + eps).rsqrt()


def _reference_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
    dyf, xc = dy.to(mean.dtype), x.to(mean.dtype) - mean.view(shape)
    sum_dy, sum_dy_xmu = dyf.sum(dims), (dyf * xc).sum(dims)
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd if weight_g else None, sum_dy if bias_g else None


def _reference_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    shape = [1, -1] + [1] * (x.dim() - 2)
    n = count.sum().to(mean.dtype)
    scale = invstd if weight is None else invstd * weight
    dx = (dy.to(mean.dtype) - (sum_dy / n).view(shape)
          - (x.to(mean.dtype) - mean.view(shape)) * (invstd.square() * sum_dy_xmu / n).view(shape)) * scale.view(shape)
    return dx.to(x.dtype)


def _fused_kernels_rank():
    from hvd_megdet import sync_bn

    hvd.init()
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        layers = [SyncBatchNorm(3, two_phase=t, affine=a, cuda_kernels=fused).double()
                  for t, a in ((True, True), (False, True), (True, False))]
        gen = torch.Generator().manual_seed(hvd.rank())
        xs = [torch.randn(2 + hvd.rank(), 3, 4, 5, generator=gen, dtype=torch.float64).requires_grad_()
              for _ in layers]
        with contextlib.ExitStack() as stack:
            # The layer's choice, with "on a GPU" left out: the CPU stand-ins below replace the kernels.
            stack.enter_context(mock.patch.object(sync_bn, "_fused", lambda x, cuda_kernels: cuda_kernels
                                                  and x.numel() > 0))
            if fused:
                kernels = {"batch_norm_stats": mock.Mock(wraps=_reference_stats),
                           "batch_norm_backward_reduce": mock.Mock(wraps=_reference_backward_reduce),
                           "batch_norm_backward_elemt": mock.Mock(wraps=_reference_backward_elemt)}
                stack.enter_context(mock.patch.multiple(torch, **kernels))
            outs = [layer(x) for layer, x in zip(layers, xs)]
            sum((y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).sum() for y in outs).backward()
        results[fused] = ([y.detach() for y in outs], [x.grad for x in xs],
                          [p.grad for layer in layers for p in layer.parameters()],
                          [b.clone() for layer in layers for b in layer.buffers()])
    results["kernel_calls"] = {name: kernel.call_count for name, kernel in kernels.items()}
    return results


@pytest.mark.multirank
def test_fused_cuda_kernel_path_equals_the_torch_ops_path():
    for results in run_ranks(_fused_kernels_rank, np=2, timeout=120):
        # cuda_kernels=True reached each layer's forward and backward: one call of each kernel per layer
        assert results["kernel_calls"] == {"batch_norm_stats": 3, "batch_norm_backward_reduce": 3,
                                           "batch_norm_backward_elemt": 3}
        for fused, plain in zip(results[True], results[False]):
            for a, b in zip(fused, plain):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
