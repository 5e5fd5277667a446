"""Loading a batch, one training step, and the distributed evaluation loop.

`next_batch` loads this rank's batch and agrees with the other ranks that every rank has one, so an error
that only one rank sees (an unreadable image in its shard) stops all ranks together instead of leaving them
waiting in a collective. `train_step` is the whole iteration after the batch is loaded: forward and backward
(Horovod averages the gradients during it), one agreement across ranks on the losses and their finiteness,
then the optimizer step, or a skipped step that leaves the model as it was. `evaluate` runs inference on
this rank's exact shard of the validation set, gathers the detections on rank 0, scores them with COCOeval
and shares the metrics with every rank.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from hvd_megdet import dist
from hvd_megdet.checkpoint import first_nonfinite
from hvd_megdet.data import DatasetError
from hvd_megdet.evaluation import evaluate_bbox, to_coco_results, write_eval
from hvd_megdet.sync_bn import average_running_stats


def to_device(images, targets, device):
    """Move a batch (tuple of CHW image tensors, tuple of target dicts) to `device`. Images become float32 in
    [0, 1] there: uint8 ones (what the datasets return) are scaled by 1/255 on the device, after the copy of
    4x fewer bytes; float ones are taken as already in [0, 1]."""
    images = [_to_unit_float(img.to(device, non_blocking=True)) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _to_unit_float(image):
    unit = image.to(torch.float32)
    return unit.div_(255) if image.dtype == torch.uint8 else unit


def _one_line(error):
    """The message of `error` on one line; a DataLoader worker's error carries the worker's traceback and
    ends with the original "package.Error: message" line, whose message is taken."""
    lines = str(error).strip().splitlines() or [error.__class__.__name__]
    prefix = f"{error.__class__.__module__}.{error.__class__.__name__}: "
    return lines[-1][len(prefix):] if lines[-1].startswith(prefix) else lines[-1]


def next_batch(data_iter):
    """The next batch of `data_iter` on every rank, or the same exception raised on every rank.

    One flag per iteration, reduced over the ranks, says whether any rank failed to load its batch; then
    every rank raises DatasetError (when the first failing rank's error was one: an unreadable or
    inconsistent image, named in the message) or RuntimeError, with "rank R: message" of the first failing
    rank. Without it the failing rank would exit and the others wait in the step's collectives.
    """
    try:
        batch, error = next(data_iter), None
    except Exception as e:  # re-raised below, on every rank
        batch, error = None, e
    # Horovod: every rank learns whether every rank has a batch, before any rank enters the step's collectives.
    if not dist.any_rank(error is not None, name="batch_loaded"):
        return batch
    # Horovod: the failing ranks' messages, to every rank (a rare path: only when some rank failed).
    failures = dist.gather_object(None if error is None else (error.__class__.__name__, _one_line(error)),
                                  name="batch_errors")
    rank, (kind, message) = next((r, f) for r, f in enumerate(failures) if f is not None)
    if kind == DatasetError.__name__:
        raise DatasetError(f"rank {rank}: {message}") from error
    raise RuntimeError(f"rank {rank}: loading its batch failed: {kind}: {message}") from error


def autocast(device, amp):
    """The autocast context for `amp` ('off' | 'bf16' | 'fp16') on `device` (CUDA or CPU)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device, amp):
    """A GradScaler for fp16 (loss scaling keeps small gradients from flushing to zero), else None."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def _running_stats(model):
    """The BatchNorm buffers that a forward pass in train mode updates (statistics and their counter)."""
    return [buf for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]


@dataclass
class StepResult:
    """One training step, the same on every rank.

    losses: each loss averaged over the ranks and backward passes, and "loss", their sum.
    nonfinite: None when the step was taken; when some rank's loss or (without loss scaling) the averaged
        gradient was not finite, no rank stepped and it is every rank's report [{"rank", "losses" (that
        rank's own), "loss_finite", "grads_finite"}, ...], for the caller to count or stop on.
    overflow: fp16 loss scaling overflowed (finite losses, non-finite scaled gradients): the scaler skipped
        the step and lowered its scale. Routine, not a divergence.
    """
    losses: dict
    nonfinite: list | None = None
    overflow: bool = False

    @property
    def skipped(self):
        return self.nonfinite is not None


def _forward_backward(model, images, targets, amp, scaler, passes):
    """The detector's losses on one batch, back-propagated with weight 1 / `passes` (the gradient is the mean
    over the step's backward passes) and scaled when a GradScaler is given; returns {name: loss as a Python
    float}. Horovod's DistributedOptimizer starts the gradient allreduces during the last pass."""
    with autocast(images[0].device, amp):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values()) / passes
    (scaler.scale(loss) if scaler else loss).backward()
    values = torch.stack([v.detach().float() for v in loss_dict.values()]).tolist()  # one host sync
    return dict(zip(loss_dict, values))


def _parameters(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _agree(local_losses, loss_finite, grads_finite):
    """(losses averaged over the ranks, with their sum "loss"; whether every rank's losses are finite; whether
    every rank's gradients are) from one small allreduce, so every rank takes the same decision."""
    names = sorted(local_losses)
    stats = torch.tensor([local_losses[k] for k in names] + [float(not loss_finite), float(not grads_finite)],
                         dtype=torch.float64)
    # Horovod: one small allreduce gives every rank the mean losses and whether any rank saw a non-finite value.
    totals = dist.allreduce_sum(stats, name="train_step_stats")
    losses = {k: v / dist.size() for k, v in zip(names, totals[:-2].tolist())}
    losses["loss"] = sum(losses.values())
    return losses, totals[-2].item() == 0, totals[-1].item() == 0


def _nonfinite_report(local_losses, loss_finite, grads_finite):
    """Every rank's own view of a skipped step, so that the log names the rank(s) whose loss was not finite."""
    # Horovod: gathered from every rank (a rare path: only when a step is skipped).
    return dist.gather_object({"rank": dist.rank(), "losses": dict(sorted(local_losses.items())),
                               "loss_finite": loss_finite, "grads_finite": grads_finite}, name="nonfinite")


def train_step(model, optimizer, batches, *, amp="off", scaler=None, clip_grad_norm=0.0):
    """One SGD step on this rank's `batches` [(images, targets), ...]; returns a StepResult, the same on
    every rank.

    `optimizer` is an hvd.DistributedOptimizer built with backward_passes_per_step=len(batches): one
    forward/backward pass per batch accumulates the gradient (each loss weighted 1 / len(batches)), and
    Horovod averages it over the ranks once, during the last backward pass. Then one small allreduce decides
    on every rank together: when any rank's loss is not finite, or the averaged gradient is not finite
    without loss scaling, no rank steps and the forward passes' updates of the BatchNorm running statistics
    are undone (they would stay NaN for good). With loss scaling (`scaler`, fp16), non-finite gradients and
    finite losses are an overflow: the scaler skips the step and lowers its scale. Else the gradients are
    clipped to `clip_grad_norm` (0 = off) and the optimizer steps.
    """
    stats_before = [buf.clone() for buf in _running_stats(model)]
    optimizer.zero_grad()
    per_pass = [_forward_backward(model, images, targets, amp, scaler, len(batches)) for images, targets in batches]
    local_losses = {k: sum(p[k] for p in per_pass) / len(per_pass) for k in per_pass[0]}
    # Horovod: wait for the gradient allreduces started during the last backward pass.
    optimizer.synchronize()
    if scaler:
        scaler.unscale_(optimizer)
    params = _parameters(optimizer)
    loss_finite = all(math.isfinite(v) for p in per_pass for v in p.values())
    grads_finite = first_nonfinite([p.grad for p in params if p.grad is not None]) is None
    losses, all_losses_finite, all_grads_finite = _agree(local_losses, loss_finite, grads_finite)
    overflow = scaler is not None and all_losses_finite and not all_grads_finite
    if not all_losses_finite or not (all_grads_finite or overflow):
        optimizer.zero_grad()
        for buf, before in zip(_running_stats(model), stats_before):
            buf.copy_(before)
        if scaler:  # let the scaler lower its scale, as it would on an overflow
            scaler.update()
        return StepResult(losses, _nonfinite_report(local_losses, loss_finite, grads_finite))
    if clip_grad_norm > 0 and not overflow:
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    # Horovod: gradients are already averaged; step without a second synchronize.
    with optimizer.skip_synchronize():
        if scaler:
            scaler.step(optimizer)  # skips the step when the unscaled gradients are not finite
            scaler.update()
        else:
            optimizer.step()
    return StepResult(losses, overflow=overflow)


@torch.no_grad()
def precise_bn(model, batches, num_iters, amp="off"):
    """PreciseBN (Wu & Johnson, "Rethinking Batch in BatchNorm", 2021; detectron2's TEST.PRECISE_BN): set the
    running statistics of every BatchNorm of `model` to their true average over `num_iters` batches of
    `batches` (an iterator of training batches, moved to the model's device here), then average them over the
    ranks (sync_bn.average_running_stats). The EMA of training keeps estimates from weights that have since
    changed; this one comes from the current weights only. CGBN layers compute each batch's statistics over
    their group, so every rank must call this with the same `num_iters`. Frozen BatchNorms are left alone;
    momentum and num_batches_tracked are restored, and the model's train/eval mode too.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    sums = [(torch.zeros_like(m.running_mean), torch.zeros_like(m.running_var)) for m in layers]
    for m in layers:
        m.momentum = 1.0  # after each forward pass, the running statistics are that batch's
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for _ in range(num_iters):
        images, targets = to_device(*next_batch(batches), device)
        with autocast(device, amp):
            model(images, targets)
        for m, (mean_sum, var_sum) in zip(layers, sums):
            mean_sum += m.running_mean
            var_sum += m.running_var
    for m, (momentum, count), (mean_sum, var_sum) in zip(layers, saved, sums):
        m.running_mean.copy_(mean_sum / num_iters)
        m.running_var.copy_(var_sum / num_iters)
        m.momentum = momentum
        m.num_batches_tracked.copy_(count)
    model.train(was_training)
    average_running_stats(model)


@torch.no_grad()
def inference(model, loader, device, label_to_cat_id, amp="off"):
    """Detections of this rank's shard in COCO results format (original image coordinates), and None, or the
    detections so far and the exception that stopped loading the shard (an unreadable image)."""
    model.eval()
    results, batches = [], iter(loader)
    while True:
        try:
            images, targets = next(batches)
        except StopIteration:
            return results, None
        except Exception as e:  # the caller raises it on every rank, after the collective that shares it
            return results, e
        images, _ = to_device(images, (), device)
        with autocast(device, amp):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        results.extend(to_coco_results(outputs, targets, label_to_cat_id))


def evaluate(model, loader, coco_gt, label_to_cat_id, device, output_dir, iteration, amp="off"):
    """Distributed COCO bbox evaluation; returns the metrics dict (AP, AP50, ... in percent) on every rank.

    Each rank infers its exact shard (no padding, so no image is counted twice); detections are gathered on
    rank 0, which scores them and writes `<output_dir>/eval/latest.json`. Leaves the model in train mode.
    An image that cannot be loaded stops the evaluation on every rank with a DatasetError naming the file.
    """
    was_training = model.training
    results, error = inference(model, loader, device, label_to_cat_id, amp)
    # Horovod: every rank's detections to rank 0, with this rank's loading error if any (an empty shard still
    # takes part), so a rank that fails does not leave the others waiting.
    gathered = dist.gather_object((results, None if error is None else (error.__class__.__name__, _one_line(error))),
                                  name=f"eval_{iteration}")
    failed = [(rank, failure) for rank, (_, failure) in enumerate(gathered) if failure is not None]
    if failed:
        rank, (kind, message) = failed[0]
        raise DatasetError(f"rank {rank}: evaluation: {message}" if kind == DatasetError.__name__ else
                           f"rank {rank}: evaluation: loading an image failed: {kind}: {message}") from error
    metrics = None
    if dist.is_main():
        merged = [r for part, _ in gathered for r in part]
        metrics = evaluate_bbox(coco_gt, merged)
        write_eval(output_dir, iteration, metrics, merged)
    # Horovod: share rank 0's metrics so every rank can log or act on them.
    metrics = dist.broadcast_object(metrics, name=f"eval_metrics_{iteration}")
    model.train(was_training)
    return metrics
