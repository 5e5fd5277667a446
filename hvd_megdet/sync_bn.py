"""Cross-GPU Batch Normalization (CGBN, MegDet, Peng et al. 2018, arXiv 1711.07240) over Horovod.

Standalone: imports torch and horovod.torch only, so any Horovod job can use it.

    hvd.init()
    model = convert_sync_batchnorm(model)            # every nn.BatchNorm*d -> SyncBatchNorm
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

In training each SyncBatchNorm equals `nn.BatchNorm*d` applied to the concatenated batches of the ranks of its
process set (the paper's "BN size"): outputs, input gradients and running statistics; weight and bias
gradients stay local, and their sum over the ranks is BatchNorm's (`hvd.DistributedOptimizer` averages them
like any gradient). Every element weighs the same, so a rank with 2 images counts twice as much as a rank
with 1; a rank with 0 images counts for nothing but still takes part.

Contract, as for any Horovod collective: every rank of a process set runs the same SyncBatchNorm layers in
the same order, forward and backward, including ranks whose batch is empty. Collectives are named after the
order in which layers are created, so every rank builds the same model the same way.

How a layer waits for its allreduces and whether it uses torch's fused CUDA kernels are the layer's own
arguments (SyncBatchNorm's and convert_sync_batchnorm's `wait`, `poll_seconds`, `cuda_kernels`), nothing
process-wide. The algorithm, its collectives and their cost: README.md, "Cross-GPU Batch Normalization", and
docs/performance.md. `register_collective_hook` tells instrumentation (a watchdog, a benchmark) when each
collective starts, is waited for and ends, on the thread that runs it.
"""
import itertools
import time
from collections import OrderedDict
from typing import NamedTuple, Optional

import horovod.torch as hvd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

# `process_set` value for BN groups of one rank (BN size 1): plain per-rank BatchNorm, no collectives.
LOCAL = "local"
WAITS = ("auto", "sleep", "horovod")  # SyncBatchNorm's `wait` argument
_POLL_SECONDS = 20e-6  # SyncBatchNorm's default `poll_seconds`: at most ~20 us added to a sleeping wait
# RemovableHandle id -> hook (register_collective_hook); an OrderedDict, as the handle's weak reference needs
_collective_hooks = OrderedDict()

_layer_ids = itertools.count()  # creation order -> collective names, equal on all ranks (see module docstring)
_BATCHNORM_DIMS = ((nn.BatchNorm1d, 3), (nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))  # class, input dims it takes
_BATCHNORM_BY_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def register_collective_hook(hook):
    """Have `hook(name, event)` called around every collective of this module, for the whole process (like
    torch's global module hooks), on the thread that runs the collective: in a CUDA backward, one of
    autograd's device threads, not the main thread. `name` is the collective's Horovod name: "sync_bn.3.sum"
    and ".sqdev" (or ".moments") in layer 3's forward, "sync_bn.3.grad" in its backward, "sync_bn.3+4.grad"
    for layers sharing collectives, "sync_bn.average_running_stats". `event` is "start" (about to start it),
    "wait" (its caller, its local work done, starts waiting for the result) or "end" (the wait is over, also
    when it raised). For instrumentation: a watchdog that must see waits on any thread, a benchmark that
    counts or times collectives. An exception in `hook` reaches the collective's caller. With no hook
    registered, an event costs a loop over nothing.

    Returns a torch.utils.hooks.RemovableHandle: `handle.remove()` unregisters the hook."""
    handle = RemovableHandle(_collective_hooks)
    _collective_hooks[handle.id] = hook
    return handle


def _tell_hooks(name, event):
    for hook in tuple(_collective_hooks.values()):  # a copy: another thread may register or remove one
        hook(name, event)


class _Allreduce(NamedTuple):
    """An allreduce in flight: Horovod's handle and the collective's name."""
    handle: int
    name: str


def _allreduce_start(tensor, name, process_set):
    """Horovod: start summing per-channel statistics over the ranks of the BN group, in place; the stable
    name keys Horovod's response cache, so a layer's collective is negotiated once and never mixed with
    another's. Returns the `_Allreduce` for `_allreduce_wait`; the caller does local work in between."""
    _tell_hooks(name, "start")
    return _Allreduce(hvd.allreduce_async_(tensor, op=hvd.Sum, name=name, process_set=process_set), name)


def _poll_interval(wait, poll_seconds, on_gpu):
    """How `_allreduce_wait` waits, from a layer's `wait` and `poll_seconds` (see SyncBatchNorm) and whether its
    input is on a GPU: the seconds to sleep between hvd.poll calls, or None for hvd.synchronize."""
    return poll_seconds if wait == "sleep" or (wait == "auto" and not on_gpu) else None


def _fused(x, cuda_kernels):
    """Whether a layer built with `cuda_kernels` does its local work on x with torch's fused kernels."""
    return cuda_kernels and x.is_cuda and x.numel() > 0


def _memory_format(x):
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def _allreduce_wait(allreduce, poll):
    """The result of `_allreduce_start`'s allreduce: hvd.synchronize, Horovod's own wait, which spins, when
    `poll` is None; else hvd.poll every `poll` seconds, sleeping in between (see `_poll_interval`)."""
    _tell_hooks(allreduce.name, "wait")
    try:
        if poll is not None:
            while not hvd.poll(allreduce.handle):
                time.sleep(poll)
        return hvd.synchronize(allreduce.handle)
    finally:
        _tell_hooks(allreduce.name, "end")


def _layout(x):
    """The dims reduced per channel of an (N, C, *) tensor, and the shape that broadcasts a (C,) vector."""
    return [0, *range(2, x.dim())], [1, x.shape[1]] + [1] * (x.dim() - 2)


def _per_channel(vector, x):
    """A (C,) vector shaped to broadcast against the (N, C, *) tensor x."""
    return vector.view(_layout(x)[1])


def _split(sequence, n, parts):
    """[sequence[:n], sequence[n:2n], ...]: the per-layer groups of the autograd function's flat arguments."""
    return [sequence[i * n:(i + 1) * n] for i in range(parts)]


class _Layer(NamedTuple):
    """What the autograd function needs of one SyncBatchNorm besides its input, weight and bias."""
    running_mean: Optional[torch.Tensor]  # updated in place when given (None: no running statistics)
    running_var: Optional[torch.Tensor]
    momentum: float  # this batch's weight in the running statistics
    eps: float
    cuda_kernels: bool  # local work in torch's fused CUDA kernels (see SyncBatchNorm)


class _LocalMoments:
    """One rank's batch of one layer, per channel: element count (a Python int: it comes from the shape),
    sum and mean, and `m2()`, the sum of squared deviations from the local mean. These are BatchNorm's own
    two passes over x; ranks then combine exactly (Chan et al.'s parallel variance): over a rank,
    sum (x - c)^2 = m2 + count * (mean - c)^2 for any c."""

    def __init__(self, x, dtype):
        self.x = x.to(dtype)
        self.dims = _layout(x)[0]
        self.count = x.numel() // x.shape[1]
        self.sum = self.x.sum(self.dims)
        self.mean = self.sum / max(self.count, 1)

    def m2(self):
        return (self.x - _per_channel(self.mean, self.x)).square_().sum(self.dims)


class _FusedLocalMoments:
    """`_LocalMoments` from torch's fused CUDA kernel: batch_norm_stats gives the local mean and 1 / std in one
    (Welford) pass; m2 = count / invstd^2 (0 for a constant channel, whose invstd is inf)."""

    def __init__(self, x, dtype):
        self.count = x.numel() // x.shape[1]
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        self.mean = mean.to(dtype)
        self.sum = self.mean * self.count
        self._m2 = (self.count / invstd.square()).to(dtype)

    def m2(self):
        return self._m2


def _counts_tensor(local, like):
    """The layers' local element counts as a tensor on `like`'s device and dtype, made there (a fill per
    count: no copy from the host, which would wait for the device)."""
    return torch.stack([like.new_full((), moments.count) for moments in local])


def _two_phase_statistics(local, name, process_set, poll):
    """The paper's two phases: allreduce [sum x, count] -> global mean; allreduce sum (x - global mean)^2 ->
    global (biased) variance. Returns (means, variances, counts) per layer. The local m2 is summed while
    phase 1 is in flight; `poll`: how to wait (`_allreduce_wait`)."""
    channels = [moments.sum.numel() for moments in local]
    payload = torch.cat([*(moments.sum for moments in local), _counts_tensor(local, local[0].sum)])
    allreduce = _allreduce_start(payload, f"{name}.sum", process_set)
    m2 = [moments.m2() for moments in local]
    totals = _allreduce_wait(allreduce, poll)
    counts = _checked_counts(totals[-len(local):], local, name)
    means = [total / k.clamp(min=1) for total, k in zip(totals[:-len(local)].split(channels), counts)]
    # Each rank's sum of squared deviations from the global mean, from its local moments.
    sq_dev = torch.cat([q + moments.count * (moments.mean - mean).square()
                        for q, moments, mean in zip(m2, local, means)])
    sq_dev = _allreduce_wait(_allreduce_start(sq_dev, f"{name}.sqdev", process_set), poll)
    variances = [total / k.clamp(min=1) for total, k in zip(sq_dev.split(channels), counts)]
    return means, variances, counts


def _shifted_statistics(local, shifts, name, process_set, poll):
    """One allreduce of float64 [count, sum (x - s), sum (x - s)^2] around per-channel shifts s equal on all
    ranks, then mean = s + E[x - s] and variance = E[(x - s)^2] - E[x - s]^2: the cancellation is harmless in
    float64 unless |mean - s| exceeds the std by ~1e6. Returns (means, variances, counts) per layer."""
    channels = [moments.sum.numel() for moments in local]
    offsets = [moments.mean.to(torch.float64) - shift for moments, shift in zip(local, shifts)]
    payload = torch.cat([_counts_tensor(local, shifts[0]),
                         *(moments.count * offset for moments, offset in zip(local, offsets)),
                         *(moments.m2() + moments.count * offset.square() for moments, offset in zip(local, offsets))])
    totals = _allreduce_wait(_allreduce_start(payload, f"{name}.moments", process_set), poll)
    counts = _checked_counts(totals[:len(local)], local, name)
    sum_shifted, sum_sq_shifted = totals[len(local):].split([sum(channels)] * 2)
    dtype = local[0].sum.dtype
    means, variances = [], []
    for shift, k, first, second in zip(shifts, counts, sum_shifted.split(channels), sum_sq_shifted.split(channels)):
        mean_shifted, mean_sq_shifted = first / k.clamp(min=1), second / k.clamp(min=1)
        variances.append((mean_sq_shifted - mean_shifted.square()).clamp_(min=0).to(dtype))
        means.append((shift + mean_shifted).to(dtype))
    return means, variances, counts


def _checked_counts(counts, local, name):
    """The allreduced element counts per channel, one 0-d tensor per layer, left on the device: reading them
    on the host would make the CPU wait for the GPU at every layer. They travel with the statistics, in
    float32 for all but float64 inputs: exact up to 2**24, then rounded by at most 6e-8 relative, below
    float32's own precision. 0 (every batch empty) is allowed: statistics are then divided by 1 instead of 0,
    so outputs and gradients are empty or zero, as in torch. 1 raises ValueError, as torch does; only a rank
    whose own batch has at most 1 value per channel reads the counts to check, and when the group's count is
    1, every rank of the group is such a rank, so all raise together (none is left in a collective)."""
    if any(moments.count <= 1 for moments in local) and 1 in counts.tolist():
        raise ValueError(f"SyncBatchNorm {name}: expected more than 1 value per channel when training, "
                         f"got 1 over the whole process set")
    return list(counts.unbind())


@torch.no_grad()
def _update_running_stats(layers, means, variances, counts):
    """Move each layer's running statistics toward the group batch's mean and unbiased variance, as
    BatchNorm does; a group batch of 0 elements leaves them unchanged (its weight is 0)."""
    for layer, mean, var, k in zip(layers, means, variances, counts):
        if layer.running_mean is not None:
            weight = (k > 0).to(layer.running_mean.dtype) * layer.momentum
            unbiased = var * (k / (k - 1).clamp(min=1))
            layer.running_mean.lerp_(mean.to(layer.running_mean.dtype), weight)
            layer.running_var.lerp_(unbiased.to(layer.running_var.dtype), weight)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm of n independent layers at once, with statistics of the whole process set;
    their statistics travel in the same allreduces.

    apply(layers, process_set, name, two_phase, poll, *inputs, *weights, *biases): `layers` holds one `_Layer`
    per input; `poll` says how to wait for the allreduces (`_allreduce_wait`). Each input is (N, C, *) with N
    possibly 0, all of one float dtype. Statistics are float32 (float64 for float64 inputs); each output has
    its input's dtype and memory format. Returns the tuple of outputs.
    """

    @staticmethod
    def forward(ctx, layers, process_set, name, two_phase, poll, *tensors):
        n = len(layers)
        inputs, weights, biases = _split(tensors, n, 3)
        stat_dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
        local = [(_FusedLocalMoments if _fused(x, layer.cuda_kernels) else _LocalMoments)(x, stat_dtype)
                 for layer, x in zip(layers, inputs)]
        if two_phase:
            means, variances, counts = _two_phase_statistics(local, name, process_set, poll)
        else:
            # The shift: the running mean (equal on all ranks, see SyncBatchNorm), else zero.
            shifts = [(layer.running_mean if layer.running_mean is not None else x.new_zeros(x.shape[1]))
                      .to(torch.float64) for layer, x in zip(layers, inputs)]
            means, variances, counts = _shifted_statistics(local, shifts, name, process_set, poll)
        _update_running_stats(layers, means, variances, counts)

        ctx.save_for_backward(*inputs, *weights, *means, *variances)
        ctx.num_layers, ctx.counts = n, [k.clamp(min=1) for k in counts]
        ctx.eps, ctx.cuda_kernels = [layer.eps for layer in layers], [layer.cuda_kernels for layer in layers]
        ctx.process_set, ctx.name, ctx.poll = process_set, name, poll
        # Normalizing with the global statistics is BatchNorm in eval mode: torch's fused kernel, which keeps
        # the input's dtype and memory format and takes float32 statistics and parameters for half inputs.
        return tuple(F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
                     for x, w, b, mean, var, eps in zip(inputs, weights, biases, means, variances, ctx.eps))

    @staticmethod
    def backward(ctx, *grad_outputs):
        n = ctx.num_layers
        inputs, weights, means, variances = _split(ctx.saved_tensors, n, 4)
        needs_input, needs_weight, needs_bias = _split(ctx.needs_input_grad[5:], n, 3)
        invstds = [torch.rsqrt(var + eps) for var, eps in zip(variances, ctx.eps)]
        terms = [_LocalGradTerms(dy, x, mean, invstd, w, _fused(x, cuda_kernels))
                 for dy, x, mean, invstd, w, cuda_kernels in
                 zip(grad_outputs, inputs, means, invstds, weights, ctx.cuda_kernels)]

        grad_inputs = [None] * n
        if any(needs_input):
            # x-hat depends on every rank's x through mean and var, so dx needs the group's sums of dy and
            # dy * (x - mean): one allreduce for all layers, in flight while dy * scale is computed.
            channels = [mean.numel() for mean in means]
            payload = torch.cat([*(t.sum_dy for t in terms), *(t.sum_dy_centered for t in terms)])
            allreduce = _allreduce_start(payload, f"{ctx.name}.grad", ctx.process_set)
            for t in terms:
                t.prepare_grad_input()
            group_sum_dy, group_sum_dy_centered = _allreduce_wait(allreduce, ctx.poll).split([sum(channels)] * 2)
            grad_inputs = [t.grad_input(total_dy, total_dy_centered, k) if needed else None
                           for t, total_dy, total_dy_centered, k, needed in
                           zip(terms, group_sum_dy.split(channels), group_sum_dy_centered.split(channels),
                               ctx.counts, needs_input)]

        # Weight and bias gradients stay local: the optimizer's allreduce combines them like any gradient.
        grad_weights = [(t.sum_dy_centered * t.invstd).to(w.dtype) if needed else None
                        for t, w, needed in zip(terms, weights, needs_weight)]
        grad_biases = [t.sum_dy.to(w.dtype) if needed else None  # affine: weight and bias come together
                       for t, w, needed in zip(terms, weights, needs_bias)]
        return (None, None, None, None, None, *grad_inputs, *grad_weights, *grad_biases)


class _LocalGradTerms:
    """One layer's backward on this rank, given the group's mean and 1/std: the local sums that the ranks
    combine (sum dy and sum dy * (x - mean), per channel), then the input gradient from the group's sums,
        dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)),  scale = invstd * weight,
    with torch's fused CUDA kernels (batch_norm_backward_reduce / _elemt) when `fused`, else with torch ops."""

    def __init__(self, dy, x, mean, invstd, weight, fused):
        self.x, self.mean, self.invstd, self.weight, self.fused = x, mean, invstd, weight, fused
        if self.fused:
            self.dy = dy.contiguous(memory_format=_memory_format(x))
            self.sum_dy, self.sum_dy_centered, _, _ = torch.batch_norm_backward_reduce(
                self.dy, x, mean, invstd, None if weight is None else weight.to(mean.dtype), True, False, False)
            return
        self.dy = dy.to(mean.dtype)
        self.centered = x.to(mean.dtype) - _per_channel(mean, x)
        self.sum_dy = self.dy.sum(_layout(x)[0])
        self.sum_dy_centered = (self.dy * self.centered).sum(_layout(x)[0])  # = sum dy * xhat / invstd

    def prepare_grad_input(self):
        """The local part of dx, dy * scale, computed while the allreduce is in flight."""
        if not self.fused:
            self.scale = self.invstd if self.weight is None else self.invstd * self.weight.to(self.mean.dtype)
            self.dy_scaled = self.dy * _per_channel(self.scale, self.dy)

    def grad_input(self, total_dy, total_dy_centered, count):
        """dx from the group's sums and element count (a 0-d tensor, at least 1)."""
        if self.fused:
            weight = None if self.weight is None else self.weight.to(self.mean.dtype)
            return torch.batch_norm_backward_elemt(self.dy, self.x, self.mean, self.invstd, weight, total_dy,
                                                   total_dy_centered, count.view(1).to(torch.int32))
        # = dy * scale - scale * mean(dy) - (x - mean) * scale * invstd^2 * mean(dy * (x - mean)), built on
        # (x - mean) in place, which gives dx the memory format of x.
        coef_centered = -self.scale * self.invstd.square() * total_dy_centered / count
        coef_const = -self.scale * total_dy / count
        return (self.centered.mul_(_per_channel(coef_centered, self.x)).add_(_per_channel(coef_const, self.x))
                .add_(self.dy_scaled).to(self.x.dtype))


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the concatenated batches of a Horovod process set, for (N, C), (N, C, L), (N, C, H, W)
    and (N, C, D, H, W) inputs, N may differ between ranks and may be 0.

    Arguments are those of `nn.BatchNorm2d`, plus:
      process_set: None for all ranks (hvd.global_process_set), a registered `hvd.ProcessSet` (see
        `bn_group`), or `LOCAL` for per-rank BN. Without `hvd.init()`, None means a world of 1.
      two_phase: True for the paper's two forward allreduces (mean, then variance); False for one allreduce of
        float64 moments around a per-channel shift: the running mean when tracking running statistics (equal
        on all ranks when they start equal, e.g. after `hvd.broadcast_parameters(model.state_dict())`), else
        zero. Results agree within float tolerance.
      wait: how the layer waits for its allreduces, one of WAITS. "horovod" is hvd.synchronize, Horovod's own
        wait, which spins; "sleep" polls hvd.poll and sleeps `poll_seconds` in between, which leaves the cores
        to Horovod's background threads where ranks share them (CPU training: 1.3-1.7x faster per layer under
        load, docs/performance.md); "auto" sleeps for CPU inputs and uses Horovod's wait for GPU ones.
        Results are the same whichever it is.
      cuda_kernels: for CUDA inputs, do BatchNorm's local work with torch's fused SyncBatchNorm kernels
        (batch_norm_stats, batch_norm_backward_reduce, batch_norm_backward_elemt: one pass over x forward, two
        backward, instead of several torch ops). Off by default until `scripts/gpu_check.sh` has confirmed on
        a GPU that they match nn.BatchNorm2d (they have no CPU implementation, so no test here can run them).

    Semantics follow `nn.BatchNorm*d`: training (or track_running_stats=False, in any mode) uses batch
    statistics of the whole process set, synchronized; eval with running statistics is local, no collective.
    momentum=None is a cumulative moving average over `num_batches_tracked`; running_var is updated with the
    unbiased variance (count - 1) of the global batch. A global batch of 0 elements returns empty outputs and
    leaves the running statistics unchanged, as torch does; 1 element per channel raises ValueError, as torch
    does. float16/bfloat16 inputs use float32 statistics and parameters, and the output keeps the input dtype
    and memory format (channels_last stays channels_last).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_set=None, two_phase=True, *, wait="auto", poll_seconds=_POLL_SECONDS, cuda_kernels=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if not (process_set is None or process_set == LOCAL or isinstance(process_set, hvd.ProcessSet)):
            raise ValueError(f"SyncBatchNorm: process_set must be None, LOCAL or a hvd.ProcessSet, "
                             f"got {process_set!r}")
        if wait not in WAITS:
            raise ValueError(f"SyncBatchNorm: wait must be one of {', '.join(WAITS)}, got {wait!r}")
        if not poll_seconds >= 0:
            raise ValueError(f"SyncBatchNorm: poll_seconds must be >= 0, got {poll_seconds!r}")
        self.process_set = process_set
        self.two_phase = two_phase
        self.wait, self.poll_seconds, self.cuda_kernels = wait, poll_seconds, bool(cuda_kernels)
        self.input_dim = None  # dimensionality of the last input (or of the converted layer), for revert
        self._name = f"sync_bn.{next(_layer_ids)}"

    def _check_input_dim(self, input):
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"SyncBatchNorm: expected 2D to 5D input (N, C, ...), got {input.dim()}D")
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels, got input of shape "
                             f"{tuple(input.shape)}")

    def _group_size(self):
        if self.process_set == LOCAL:
            return 1
        if self.process_set is None:
            return hvd.size() if hvd.is_initialized() else 1
        size = self.process_set.size()
        if size is None:
            raise ValueError(f"SyncBatchNorm: process set {self.process_set} is not registered with Horovod "
                             f"(pass it to hvd.init(process_sets=...) or hvd.add_process_set)")
        return size

    def forward(self, input):
        return self.forward_sharing_collectives([self], [input])[0]

    @staticmethod
    def forward_sharing_collectives(layers, inputs):
        """`[layer(x) for layer, x in zip(layers, inputs)]` for SyncBatchNorm layers whose inputs do not depend
        on each other's outputs (the levels of an FPN): the layers that synchronize over the same process set,
        with the same algorithm, wait and input dtype, share each of their statistics' collectives, so k layers
        cost the round trips of one. Every rank must call it with the same layers in the same order."""
        outputs, groups = [None] * len(layers), {}
        for i, (layer, x) in enumerate(zip(layers, inputs)):
            use_batch_stats, running_mean, running_var, momentum = layer._start_batch(x)
            if not use_batch_stats or layer._group_size() == 1:
                outputs[i] = F.batch_norm(x, running_mean, running_var, layer.weight, layer.bias, use_batch_stats,
                                          momentum, layer.eps)
                continue
            process_set = hvd.global_process_set if layer.process_set is None else layer.process_set
            poll = _poll_interval(layer.wait, layer.poll_seconds, x.is_cuda)
            groups.setdefault((id(process_set), layer.two_phase, poll, x.dtype), (process_set, []))[1].append(
                (i, _Layer(running_mean, running_var, momentum, layer.eps, layer.cuda_kernels)))
        for (_, two_phase, poll, _), (process_set, members) in groups.items():
            index = [i for i, _ in members]
            name = "+".join([layers[index[0]]._name] + [layers[i]._name.rsplit(".", 1)[1] for i in index[1:]])
            results = _SyncBatchNormFunction.apply(
                tuple(layer for _, layer in members), process_set, name, two_phase, poll,
                *(inputs[i] for i in index), *(layers[i].weight for i in index), *(layers[i].bias for i in index))
            for i, out in zip(index, results):
                outputs[i] = out
        return outputs

    def _start_batch(self, input):
        """Check `input` and count the batch as torch's _BatchNorm.forward does; returns (use batch
        statistics, running_mean, running_var, this batch's momentum) for F.batch_norm."""
        self._check_input_dim(input)
        self.input_dim = input.dim()
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        return use_batch_stats, running_mean, running_var, momentum

    def extra_repr(self):
        return (f"{super().extra_repr()}, two_phase={self.two_phase}, wait={self.wait}, "
                f"cuda_kernels={self.cuda_kernels}")


def _swap(module, new):
    """Give `new` the parameters (same objects, so requires_grad and optimizer references carry over),
    buffers and training flag of the batch-norm layer `module`."""
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def convert_sync_batchnorm(module, process_set=None, two_phase=True, *, wait="auto", poll_seconds=_POLL_SECONDS,
                           cuda_kernels=False):
    """Return `module` with every nn.BatchNorm1d/2d/3d replaced by a SyncBatchNorm sharing its parameters and
    buffers (FrozenBatchNorm2d and other norms are left alone), built with the given process_set, two_phase,
    wait, poll_seconds and cuda_kernels (see SyncBatchNorm). Call it on every rank in the same order (it
    assigns the collective names). A bare batch-norm module is returned converted."""
    input_dim = next((dim for cls, dim in _BATCHNORM_DIMS if isinstance(module, cls)), None)
    if input_dim is not None:
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_set=process_set, two_phase=two_phase, wait=wait,
                            poll_seconds=poll_seconds, cuda_kernels=cuda_kernels)
        new.input_dim = input_dim
        return _swap(module, new)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_set, two_phase, wait=wait,
                                                       poll_seconds=poll_seconds, cuda_kernels=cuda_kernels))
    return module


def revert_sync_batchnorm(module):
    """Return `module` with every SyncBatchNorm replaced by the plain nn.BatchNorm1d/2d/3d matching the input
    dimensionality it last saw (or the layer it was converted from), sharing parameters and buffers; for
    single-process inference and export. Raises ValueError for a layer that was never run nor converted."""
    if isinstance(module, SyncBatchNorm):
        if module.input_dim is None:
            raise ValueError(f"revert_sync_batchnorm: {module._name} has seen no input, so its BatchNorm1d/2d/3d "
                             f"class is unknown; run it once or build it with convert_sync_batchnorm")
        cls = _BATCHNORM_BY_DIM[module.input_dim]
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        return _swap(module, new)
    for name, child in module.named_children():
        module.add_module(name, revert_sync_batchnorm(child))
    return module


def average_running_stats(module):
    """Replace the running mean and variance of every BatchNorm of `module` (nn.BatchNorm*d and SyncBatchNorm
    alike) by their average over all ranks, in place, with one allreduce; a world of 1 does nothing.

    Per-rank BN and BN groups smaller than the world leave each rank or group with its own running
    statistics. All of them estimate the same per-batch statistics, so their average is the estimate from
    every rank's batches: the one a single process would hold had it seen them all. Call it before evaluating
    or saving, so the model that is evaluated is the model that is saved. Statistics that are already equal
    on all ranks (CGBN over the whole world) come back bit for bit: their sum is exact in float64. A
    collective: every rank calls it at the same point, with the same model. It waits for its allreduce as
    the module's first SyncBatchNorm does (`wait`, `poll_seconds`), or as "auto" does when it has none.
    """
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if not layers or not hvd.is_initialized() or hvd.size() == 1:
        return
    stats = torch.cat([torch.cat([m.running_mean, m.running_var]).to(torch.float64) for m in layers])
    cgbn = next((m for m in module.modules() if isinstance(m, SyncBatchNorm)), None)
    poll = _poll_interval(*((cgbn.wait, cgbn.poll_seconds) if cgbn else ("auto", _POLL_SECONDS)), stats.is_cuda)
    # Horovod: the sum over all ranks of every layer's running statistics, in one tensor.
    stats = _allreduce_wait(_allreduce_start(stats, "sync_bn.average_running_stats", hvd.global_process_set),
                            poll) / hvd.size()
    with torch.no_grad():
        for m, layer_stats in zip(layers, stats.split([2 * m.num_features for m in layers])):
            mean, var = layer_stats.chunk(2)
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


def bn_process_sets(k, world_size):
    """The Horovod process sets for BN groups of `k` consecutive ranks: [[0..k-1], [k..2k-1], ...] as
    unregistered `hvd.ProcessSet`s, or [] when k is 1 or world_size (no set to register: see `bn_group`).

    Static registration, before hvd.init (under horovodrun, world_size = int(os.environ["HOROVOD_SIZE"])):
        sets = bn_process_sets(k, world_size); hvd.init(process_sets=sets); group = bn_group(k, sets)
    Raises ValueError unless 1 <= k <= world_size and world_size % k == 0.
    """
    if not (isinstance(k, int) and 1 <= k <= world_size and world_size % k == 0):
        raise ValueError(f"BN group size k={k!r} must divide the world size {world_size} "
                         f"(groups of k consecutive ranks)")
    if k in (1, world_size):
        return []
    return [hvd.ProcessSet(list(range(start, start + k))) for start in range(0, world_size, k)]


def bn_group(k, process_sets=None):
    """The `process_set` argument giving this rank BN over its group of k consecutive ranks (the paper's BN
    size); call after hvd.init() on every rank. Returns LOCAL for k == 1 (no collectives), None for
    k == hvd.size() (the global set), else this rank's `hvd.ProcessSet`:
      - static: `process_sets` is the list from `bn_process_sets(k, world_size)` already passed to
        `hvd.init(process_sets=...)`;
      - dynamic: `process_sets=None` registers every group with `hvd.add_process_set` (all ranks register all
        groups, in the same order, so call this once per job); needs `hvd.init(process_sets="dynamic")` or
        HOROVOD_DYNAMIC_PROCESS_SETS=1.
    Raises ValueError when hvd.size() is not a multiple of k, or `process_sets` does not match k.
    """
    wanted = bn_process_sets(k, hvd.size())
    if k == 1:
        return LOCAL
    if k == hvd.size():
        return None
    if process_sets is None:
        process_sets = [hvd.add_process_set(ps) for ps in wanted]
    elif [ps.ranks for ps in process_sets] != [ps.ranks for ps in wanted]:
        raise ValueError(f"bn_group: process_sets {[ps.ranks for ps in process_sets]} are not the BN groups of "
                         f"k={k} (expected {[ps.ranks for ps in wanted]})")
    return process_sets[hvd.rank() // k]
