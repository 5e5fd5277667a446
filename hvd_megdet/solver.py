"""The paper's recipe as pure functions of the iteration: linear scaling rule, linear warmup, step/cosine decay.

MegDet (Peng et al., CVPR 2018, Sec. 3.3-3.4): the learning rate grows linearly with the mini-batch,
lr = base_lr x global_batch / base_batch, which keeps the variance of the gradient step comparable; a large
lr is unstable at the start, so it warms up linearly from a small value over the first iterations.
"""
import bisect
import math

import torch
from torch import nn


def scaled_lr(base_lr, base_batch, global_batch):
    """Linear scaling rule: the lr for `global_batch` images given `base_lr` at `base_batch` images."""
    return base_lr * global_batch / base_batch


def warmup_multiplier(iteration, warmup_iters, warmup_factor):
    """Linear warmup: warmup_factor at iteration 0, rising linearly to 1 at warmup_iters, then 1."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


def decay_multiplier(iteration, solver):
    """Schedule after scaling: x gamma at each of `solver.steps`, or a cosine from 1 to 0 at max_iter."""
    if solver.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(iteration, solver.max_iter) / solver.max_iter))
    return solver.gamma ** bisect.bisect_right(solver.steps, iteration)


def due(iteration, period, max_iter):
    """True after every `period`-th iteration (period 0: never) and after the last one: when a loop evaluates,
    checkpoints or commits."""
    return iteration == max_iter or (period > 0 and iteration % period == 0)


def global_batch(solver, world_size):
    """Images per optimizer step: `ims_per_gpu` per backward pass, `backward_passes_per_step` passes (gradient
    accumulation), on each of `world_size` ranks."""
    return solver.ims_per_gpu * solver.backward_passes_per_step * world_size


def describe_scaling(solver, world_size, iters_per_epoch):
    """One line saying what the linear scaling rule and the warmup set for `world_size` ranks."""
    batch = global_batch(solver, world_size)
    lr = scaled_lr(solver.base_lr, solver.base_batch, batch)
    passes = solver.backward_passes_per_step
    return (f"world size {world_size} x {solver.ims_per_gpu} images"
            + (f" x {passes} backward passes" if passes > 1 else "") + f" = global batch {batch}; "
            f"lr {solver.base_lr} x {batch}/{solver.base_batch} = {lr:g} (linear scaling rule); "
            f"warmup from {solver.warmup_factor:g} x lr over {solver.warmup_iters} iterations; "
            f"{iters_per_epoch} iterations per epoch")


def lr_at(iteration, solver, world_size):
    """The learning rate used for `iteration` (0-based) with `world_size` ranks (see `global_batch`)."""
    lr = scaled_lr(solver.base_lr, solver.base_batch, global_batch(solver, world_size))
    return lr * decay_multiplier(iteration, solver) * warmup_multiplier(
        iteration, solver.warmup_iters, solver.warmup_factor)


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model, solver):
    """SGD parameter groups as detectron2 makes them: `weight_decay_norm` on the weights and biases of norm
    layers, `weight_decay` on every other parameter, biases of convolutions and linear layers included."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, norm = [], []
    for p in model.parameters():
        if p.requires_grad:
            (norm if id(p) in norm_params else decay).append(p)
    return [{"params": decay, "weight_decay": solver.weight_decay},
            {"params": norm, "weight_decay": solver.weight_decay_norm}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (LARS; You, Gitman & Ginsburg, "Large Batch
    Training of Convolutional Networks", 2017), for the batches where the linear scaling rule alone stops
    working: each parameter tensor of a group with `trust` gets its own lr factor, the trust ratio
    eta x ||w|| / ||g + weight_decay x w||, so that its step is eta x lr times its own norm whatever the size
    of its gradient. Groups without `trust` (norm layers and biases, as in the paper and its successors) are
    plain SGD. Per tensor, with d = g + weight_decay x w:

        d <- trust_ratio x d   (trust groups; the ratio is 1 where ||w|| or ||d|| is 0)
        buf <- momentum x buf + d;   w <- w - lr x buf

    the momentum and lr placement of torch.optim.SGD, whose "momentum_buffer" state it keeps (checkpoints,
    `init_optimizer_state`). Under hvd.DistributedOptimizer `step` runs on the averaged gradient, so every rank
    computes the same ratio; after GradScaler.unscale_ and gradient clipping, like SGD's step.
    """

    def __init__(self, params, lr=0.001, momentum=0.9, weight_decay=0.0, eta=0.001, trust=True):
        # Defaults for every argument: hvd.DistributedOptimizer rebuilds the optimizer from its param groups alone.
        if not eta > 0:
            raise ValueError(f"LARS eta must be positive, got {eta!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if group["trust"]:
                    d.mul_(trust_ratio(p, d, group["eta"]))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def trust_ratio(weight, update, eta):
    """LARS's layer-wise factor eta x ||weight|| / ||update|| (update: the gradient plus weight decay), as a
    0-dim tensor; 1 where either norm is 0 (a zero-initialised layer, a zero gradient)."""
    w_norm, d_norm = torch.linalg.vector_norm(weight), torch.linalg.vector_norm(update)
    return torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm))


def build_optimizer(model, solver, lr):
    """The optimizer of solver.optimizer over `param_groups`, starting at `lr`: SGD with momentum, or LARS
    with trust coefficient solver.lars_eta, the trust ratio on the weights of convolutions and linear layers
    only (their biases and the norm layers' parameters are plain SGD)."""
    groups = param_groups(model, solver)
    if solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=solver.momentum)
    decay, norm = groups
    weights = [p for p in decay["params"] if p.ndim > 1]
    biases = [p for p in decay["params"] if p.ndim <= 1]
    return LARS([{"params": weights, "weight_decay": solver.weight_decay, "trust": True},
                 {"params": biases, "weight_decay": solver.weight_decay, "trust": False},
                 {**norm, "trust": False}], lr=lr, momentum=solver.momentum, eta=solver.lars_eta)


def init_optimizer_state(optimizer):
    """Create SGD's momentum buffers as zeros now, which is exactly what SGD's first step does lazily.

    Why: hvd.broadcast_optimizer_state initializes an empty optimizer state by an SGD step with zero
    gradients, which still applies weight decay to the parameters. On a resume only ranks other than 0 have
    an empty state, so only they would take that step, after the parameters were broadcast, and the ranks
    would no longer hold the same weights (the same happens to a worker joining an elastic job).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))


def set_lr(optimizer, lr):
    """Set the lr of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
