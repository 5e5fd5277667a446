"""Cross-GPU Batch Normalization (CGBN, MegDet, Peng et al. 2018, arXiv 1711.07240) over Horovod.

Standalone: imports torch and horovod.torch only, so other Horovod jobs can use it on its own.

    hvd.init()
    model = convert_sync_batchnorm(model)            # every nn.BatchNorm*d -> SyncBatchNorm
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

In training, each SyncBatchNorm normalizes with the mean and variance of the concatenation of the batches of
all ranks in its process set (the paper's "BN size"), weighting every element equally: a rank with 2 images
counts twice as much as a rank with 1, and a rank with 0 images counts for nothing but still takes part in
every collective. The result equals `nn.BatchNorm*d` applied to the concatenated batch: outputs, input
gradients, running statistics and, summed over ranks, weight and bias gradients (weight and bias gradients
stay local; `hvd.DistributedOptimizer` averages them like any other gradient).

Collectives per layer and training iteration (Horovod allreduce, op=Sum, of one concatenated tensor each):
  two_phase=True (the paper's algorithm, default): forward 2 ([sum x, count], then sum (x - mean)^2),
      backward 1 ([sum dy, sum dy * (x - mean)]).
  two_phase=False: forward 1 ([count, sum (x - s), sum (x - s)^2] in float64, s a per-channel shift equal on
      all ranks), backward 1. One round trip fewer per layer for the same local work, so it is the faster
      of the two (docs/performance.md); it needs running statistics equal on all ranks (see `SyncBatchNorm`).
Local work per layer is that of BatchNorm: a sum and a sum of squared deviations from the local mean, combined
across ranks exactly (Chan et al.'s parallel variance), then torch's fused normalization. Each allreduce is
started before the local work that does not depend on it (the deviations in phase 1, dy * scale backward).
`SyncBatchNorm.forward_together(layers, inputs)` runs independent layers (an FPN's levels) with fused
statistics: one set of these collectives for all of them. Evaluation with running statistics, a world of 1, a
process set of size 1 and `LOCAL` issue no collective.

Contract, as for any Horovod collective: every rank of a process set runs the same SyncBatchNorm layers in the
same order, forward and backward, including ranks whose batch is empty. Collectives are named after the
layer's creation index, so all ranks must also construct SyncBatchNorm layers in the same order (build the
same model the same way everywhere); stable names let Horovod's response cache skip negotiation.
"""
import itertools
import time

import horovod.torch as hvd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

# `process_set` value for BN groups of one rank (BN size 1): plain per-rank BatchNorm, no collectives.
LOCAL = "local"
_POLL_SECONDS = 20e-6

_layer_ids = itertools.count()  # creation order -> collective names, equal on all ranks (see module docstring)
_BATCHNORM_DIMS = ((nn.BatchNorm1d, 3), (nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))  # class, input dims it takes
_BATCHNORM_BY_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _allreduce_start(tensor, name, process_set):
    """Horovod: start summing per-channel statistics over the ranks of the BN group, in place; the stable
    name keys Horovod's response cache, so a layer's collective is negotiated once and never mixed with
    another's. Returns the handle for `_allreduce_wait`; the caller does local work in between."""
    return hvd.allreduce_async_(tensor, op=hvd.Sum, name=name, process_set=process_set)


def _allreduce_wait(handle):
    # hvd.synchronize() busy-waits (sched_yield) for Horovod's background thread; where ranks share CPU cores
    # that spinning takes the core the background thread needs. Sleeping between polls costs at most
    # ~_POLL_SECONDS of latency and measured several times faster per small allreduce at 2 ranks on 2 cores.
    while _POLL_SECONDS and not hvd.poll(handle):  # _POLL_SECONDS = 0: Horovod's own spinning wait
        time.sleep(_POLL_SECONDS)
    return hvd.synchronize(handle)


def _layout(x):
    """The dims reduced per channel of an (N, C, *) tensor, and the shape that broadcasts a (C,) vector."""
    return [0, *range(2, x.dim())], [1, x.shape[1]] + [1] * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN of local batches with statistics of the whole process set (see the module docstring),
    for one layer or several independent ones at once: their statistics travel in the same allreduces.

    apply(layers, process_set, name, two_phase, *xs, *weights, *biases): `layers` holds one (running_mean,
    running_var, factor, eps) per x, updated in place when the running statistics are given. Each x is
    (N, C, *) with N possibly 0, all xs of one float dtype. Statistics are float32 (float64 for float64
    input); each output has its x's dtype and memory format. Returns the tuple of outputs.
    """

    @staticmethod
    def forward(ctx, layers, process_set, name, two_phase, *tensors):
        n = len(layers)
        xs, weights, biases = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        stat_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
        channels = [x.shape[1] for x in xs]
        local_counts = [x.numel() // c for x, c in zip(xs, channels)]

        # Local per-channel sum and sum of squared deviations from the local mean (two passes over x, as
        # BatchNorm's own statistics). Rank statistics then combine exactly (Chan et al.'s parallel variance):
        # sum (x - c)^2 over a rank = m2 + n * (local_mean - c)^2 for any per-channel c.
        xss = [x.to(stat_dtype) for x in xs]
        sums = [xs_.sum(_layout(xs_)[0]) for xs_ in xss]
        local_means = [s_ / max(k, 1) for s_, k in zip(sums, local_counts)]

        def local_m2():
            return [(xs_ - m.view(_layout(xs_)[1])).square_().sum(_layout(xs_)[0]) for xs_, m in zip(xss, local_means)]

        if two_phase:
            # Phase 1 (global means) is in flight while the local deviations are summed.
            handle = _allreduce_start(torch.cat([*sums, sums[0].new_tensor(local_counts)]), f"{name}.sum",
                                      process_set)
            m2 = local_m2()
            stats = _allreduce_wait(handle)
            counts = _global_counts(stats[-n:], name)
            means = [s_ / max(k, 1) for s_, k in zip(stats[:-n].split(channels), counts)]
            # Phase 2: per layer, the sum over the group of the squared deviations from the global mean.
            sqdev = torch.cat([q + k * (lm - m).square() for q, k, lm, m in zip(m2, local_counts, local_means, means)])
            sqdev = _allreduce_wait(_allreduce_start(sqdev, f"{name}.sqdev", process_set))
            variances = [q / max(k, 1) for q, k in zip(sqdev.split(channels), counts)]
        else:
            m2 = local_m2()
            # One allreduce of float64 moments around a shift s equal on all ranks: the cancellation in
            # E[(x-s)^2] - E[x-s]^2 is then harmless unless |mean - s| exceeds the std by ~1e6.
            shifts = [(rm if rm is not None else x.new_zeros(c)).to(torch.float64)
                      for (rm, _, _, _), x, c in zip(layers, xs, channels)]
            ds = [lm.to(torch.float64) - s_ for lm, s_ in zip(local_means, shifts)]
            moments = torch.cat([shifts[0].new_tensor(local_counts), *(k * d for k, d in zip(local_counts, ds)),
                                 *(q + k * d * d for q, k, d in zip(m2, local_counts, ds))])
            moments = _allreduce_wait(_allreduce_start(moments, f"{name}.moments", process_set))
            counts = _global_counts(moments[:n], name)
            first, second = moments[n:].split([sum(channels)] * 2)
            means, variances = [], []
            for s_, k, mean_d, sq in zip(shifts, counts, first.split(channels), second.split(channels)):
                mean_d, sq = mean_d / max(k, 1), sq / max(k, 1)
                variances.append((sq - mean_d * mean_d).clamp_(min=0).to(stat_dtype))
                means.append((s_ + mean_d).to(stat_dtype))

        with torch.no_grad():
            for (running_mean, running_var, factor, _), mean, var, k in zip(layers, means, variances, counts):
                if running_mean is not None and k > 0:
                    running_mean.lerp_(mean.to(running_mean.dtype), factor)
                    running_var.lerp_((var * (k / (k - 1))).to(running_var.dtype), factor)

        ctx.save_for_backward(*xs, *weights, *means, *variances)
        ctx.layers = n
        ctx.counts = [max(k, 1) for k in counts]
        ctx.eps = [eps for _, _, _, eps in layers]
        ctx.process_set, ctx.name = process_set, name
        # Normalizing with the global statistics is BN in eval mode: torch's fused kernel, which keeps x's
        # dtype and memory format and takes float32 statistics and parameters for float16/bfloat16 x.
        return tuple(F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
                     for x, w, b, mean, var, eps in zip(xs, weights, biases, means, variances, ctx.eps))

    @staticmethod
    def backward(ctx, *grad_outs):
        n = ctx.layers
        saved = ctx.saved_tensors
        xs, weights, means, variances = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
        stat_dtype = means[0].dtype
        invstds = [torch.rsqrt(var + eps) for var, eps in zip(variances, ctx.eps)]
        gys = [g.to(stat_dtype) for g in grad_outs]
        xcs = [x.to(stat_dtype) - m.view(_layout(x)[1]) for x, m in zip(xs, means)]
        sum_dy = [gy.sum(_layout(gy)[0]) for gy in gys]
        sum_dy_xc = [(gy * xc).sum(_layout(gy)[0]) for gy, xc in zip(gys, xcs)]  # = sum dy * xhat / invstd

        grad_xs = [None] * n
        if any(ctx.needs_input_grad[4:4 + n]):
            # x-hat depends on every rank's x through mean and var: one allreduce of [sum dy, sum dy*xhat] of
            # all layers, in flight while the local terms of dx are computed.
            channels = [m.numel() for m in means]
            handle = _allreduce_start(torch.cat([*sum_dy, *sum_dy_xc]), f"{ctx.name}.grad", ctx.process_set)
            scales = [inv if w is None else inv * w.to(stat_dtype) for inv, w in zip(invstds, weights)]
            dy_scaled = [gy * sc.view(_layout(gy)[1]) for gy, sc in zip(gys, scales)]
            g_dy, g_dy_xc = _allreduce_wait(handle).split([sum(channels)] * 2)
            for i, (k, dy, dy_xc) in enumerate(zip(ctx.counts, g_dy.split(channels), g_dy_xc.split(channels))):
                if ctx.needs_input_grad[4 + i]:
                    # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), as per-channel coefficients of
                    # xc and dy; starting from xc gives grad_x the memory format of x.
                    shape = _layout(xs[i])[1]
                    c_xc, c_1 = -scales[i] * invstds[i] * invstds[i] * dy_xc / k, -scales[i] * dy / k
                    grad_xs[i] = xcs[i].mul_(c_xc.view(shape)).add_(c_1.view(shape)).add_(dy_scaled[i]).to(xs[i].dtype)

        # Weight and bias gradients stay local: the optimizer's allreduce combines them like any gradient.
        grad_ws = [(sdx * inv).to(w.dtype) if ctx.needs_input_grad[4 + n + i] else None
                   for i, (sdx, inv, w) in enumerate(zip(sum_dy_xc, invstds, weights))]
        grad_bs = [sdy.to(w.dtype) if ctx.needs_input_grad[4 + 2 * n + i] else None  # affine: weight and bias
                   for i, (sdy, w) in enumerate(zip(sum_dy, weights))]
        return (None, None, None, None, *grad_xs, *grad_ws, *grad_bs)


def _global_counts(counts, name):
    """The allreduced element counts per channel, one per layer, as Python numbers. They travel with the
    statistics, in float32 for all but float64 inputs: exact up to 2**24, then rounded by at most 6e-8
    relative, below float32's own precision. 0 (every batch empty) is allowed: statistics are then divided
    by 1 instead of 0, so outputs and gradients are empty or zero, as in torch."""
    counts = counts.tolist()
    # Same counts on every rank, so every rank raises here together (no rank is left in a collective).
    if 1 in counts:
        raise ValueError(f"SyncBatchNorm {name}: expected more than 1 value per channel when training, "
                         f"got 1 over the whole process set")
    return counts


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

    Semantics follow `nn.BatchNorm*d`: training (or track_running_stats=False, in any mode) uses batch
    statistics of the whole process set, synchronized; eval with running statistics is local, no collective.
    momentum=None is a cumulative moving average over `num_batches_tracked`; running_var is updated with the
    unbiased variance (count - 1) of the global batch. A global batch of 0 elements returns empty outputs and
    leaves the running statistics unchanged, as torch does; 1 element per channel raises ValueError, as torch
    does. float16/bfloat16 inputs use float32 statistics and parameters, and the output keeps the input dtype
    and memory format (channels_last stays channels_last).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_set=None, two_phase=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if not (process_set is None or process_set == LOCAL or isinstance(process_set, hvd.ProcessSet)):
            raise ValueError(f"SyncBatchNorm: process_set must be None, LOCAL or a hvd.ProcessSet, "
                             f"got {process_set!r}")
        self.process_set = process_set
        self.two_phase = two_phase
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
        return self.forward_together([self], [input])[0]

    @staticmethod
    def forward_together(layers, inputs):
        """`[layer(x) for layer, x in zip(layers, inputs)]` for SyncBatchNorm layers whose inputs do not depend
        on each other's outputs (the levels of an FPN), with fused statistics: the layers that synchronize
        over the same process set, with the same algorithm and input dtype, share each collective, so k layers
        cost the round trips of one. Every rank must call it with the same layers in the same order."""
        outputs, fused = [None] * len(layers), {}
        for i, (layer, x) in enumerate(zip(layers, inputs)):
            use_batch_stats, running_mean, running_var, factor = layer._start_batch(x)
            if not use_batch_stats or layer._group_size() == 1:
                outputs[i] = F.batch_norm(x, running_mean, running_var, layer.weight, layer.bias, use_batch_stats,
                                          factor, layer.eps)
                continue
            process_set = hvd.global_process_set if layer.process_set is None else layer.process_set
            fused.setdefault((id(process_set), layer.two_phase, x.dtype), (process_set, []))[1].append(
                (i, (running_mean, running_var, factor, layer.eps)))
        for (_, two_phase, _), (process_set, members) in fused.items():
            index = [i for i, _ in members]
            name = "+".join([layers[index[0]]._name] + [layers[i]._name.rsplit(".", 1)[1] for i in index[1:]])
            results = _SyncBatchNormFunction.apply(
                tuple(spec for _, spec in members), process_set, name, two_phase, *(inputs[i] for i in index),
                *(layers[i].weight for i in index), *(layers[i].bias for i in index))
            for i, out in zip(index, results):
                outputs[i] = out
        return outputs

    def _start_batch(self, input):
        """Check `input` and count the batch as torch's _BatchNorm.forward does; returns (use batch
        statistics, running_mean, running_var, momentum factor) for F.batch_norm."""
        self._check_input_dim(input)
        self.input_dim = input.dim()
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        return use_batch_stats, running_mean, running_var, factor

    def extra_repr(self):
        return f"{super().extra_repr()}, two_phase={self.two_phase}"


def _swap(module, new):
    """Give `new` the parameters (same objects, so requires_grad and optimizer references carry over),
    buffers and training flag of the batch-norm layer `module`."""
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def convert_sync_batchnorm(module, process_set=None, two_phase=True):
    """Return `module` with every nn.BatchNorm1d/2d/3d replaced by a SyncBatchNorm sharing its parameters and
    buffers (FrozenBatchNorm2d and other norms are left alone). Call it on every rank in the same order (it
    assigns the collective names). A bare batch-norm module is returned converted."""
    input_dim = next((dim for cls, dim in _BATCHNORM_DIMS if isinstance(module, cls)), None)
    if input_dim is not None:
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_set=process_set, two_phase=two_phase)
        new.input_dim = input_dim
        return _swap(module, new)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_set, two_phase))
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
