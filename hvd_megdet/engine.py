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
    """The autocast context for `amp` ('off' | 'bf16' | 'fp16'); AMP runs on CUDA only."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _running_stats(model):
    """The BatchNorm buffers that a forward pass in train mode updates (statistics and their counter)."""
    return [buf for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]


@dataclass
class StepResult:
    """One training step, the same on every rank. `losses`: each loss averaged over the ranks, and "loss",
    their sum. `nonfinite`: None when the step was taken; when some rank's loss or the averaged gradient was
    not finite, no rank stepped and it is every rank's report [{"rank", "losses" (that rank's own),
    "loss_finite", "grads_finite"}, ...], for the caller to count or stop on."""
    losses: dict
    nonfinite: list | None = None

    @property
    def skipped(self):
        return self.nonfinite is not None


def _forward_backward(model, images, targets, amp, scaler):
    """The detector's losses on this rank's batch, back-propagated (scaled when a GradScaler is given);
    returns {name: loss as a Python float}. Horovod's DistributedOptimizer starts the gradient allreduces
    meanwhile."""
    with autocast(images[0].device, amp):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    (scaler.scale(loss) if scaler else loss).backward()
    values = torch.stack([v.detach().float() for v in loss_dict.values()]).tolist()  # one host sync
    return dict(zip(loss_dict, values))


def _parameters(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _agree(local_losses, finite):
    """(losses averaged over the ranks, with their sum "loss"; whether every rank is `finite`) from one small
    allreduce of this rank's {name: loss} and flag, so every rank takes the same decision."""
    names = sorted(local_losses)
    stats = torch.tensor([local_losses[k] for k in names] + [float(not finite)], dtype=torch.float64)
    # Horovod: one small allreduce gives every rank the mean losses and whether any rank saw a non-finite value.
    totals = dist.allreduce_sum(stats, name="train_step_stats")
    losses = {k: v / dist.size() for k, v in zip(names, totals[:-1].tolist())}
    losses["loss"] = sum(losses.values())
    return losses, totals[-1].item() == 0


def _nonfinite_report(local_losses, loss_finite, grads_finite):
    """Every rank's own view of a skipped step, so that the log names the rank(s) whose loss was not finite."""
    # Horovod: gathered from every rank (a rare path: only when a step is skipped).
    return dist.gather_object({"rank": dist.rank(), "losses": dict(sorted(local_losses.items())),
                               "loss_finite": loss_finite, "grads_finite": grads_finite}, name="nonfinite")


def train_step(model, optimizer, images, targets, *, amp="off", scaler=None, clip_grad_norm=0.0):
    """One SGD iteration on this rank's batch; returns a StepResult, the same on every rank.

    `optimizer` is an hvd.DistributedOptimizer: the gradients are averaged over the ranks during backward.
    When any rank's loss or the averaged gradient is not finite, no rank steps, and the forward's update of
    the BatchNorm running statistics is undone (they would stay NaN for good). Else the gradients are
    clipped to `clip_grad_norm` (0 = off) and the optimizer steps (through `scaler` when given).
    """
    stats_before = [buf.clone() for buf in _running_stats(model)]
    optimizer.zero_grad()
    local_losses = _forward_backward(model, images, targets, amp, scaler)
    # Horovod: wait for the gradient allreduces started during backward, so the check and clipping see them.
    optimizer.synchronize()
    if scaler:
        scaler.unscale_(optimizer)
    params = _parameters(optimizer)
    loss_finite = all(map(math.isfinite, local_losses.values()))
    grads_finite = first_nonfinite([p.grad for p in params if p.grad is not None]) is None
    losses, all_finite = _agree(local_losses, loss_finite and grads_finite)
    if not all_finite:
        optimizer.zero_grad()
        for buf, before in zip(_running_stats(model), stats_before):
            buf.copy_(before)
        if scaler:  # let the scaler lower its scale, as it would on an overflow
            scaler.update()
        return StepResult(losses, _nonfinite_report(local_losses, loss_finite, grads_finite))
    if clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    # Horovod: gradients are already averaged; step without a second synchronize.
    with optimizer.skip_synchronize():
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return StepResult(losses)


@torch.no_grad()
def inference(model, loader, device, label_to_cat_id, amp="off"):
    """Detections of this rank's shard in COCO results format (original image coordinates)."""
    model.eval()
    results = []
    for images, targets in loader:
        images, _ = to_device(images, (), device)
        with autocast(device, amp):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        results.extend(to_coco_results(outputs, targets, label_to_cat_id))
    return results


def evaluate(model, loader, coco_gt, label_to_cat_id, device, output_dir, iteration, amp="off"):
    """Distributed COCO bbox evaluation; returns the metrics dict (AP, AP50, ... in percent) on every rank.

    Each rank infers its exact shard (no padding, so no image is counted twice); detections are gathered on
    rank 0, which scores them and writes `<output_dir>/eval/latest.json`. Leaves the model in train mode.
    """
    was_training = model.training
    results = inference(model, loader, device, label_to_cat_id, amp)
    # Horovod: every rank's detections to rank 0 (an empty shard still takes part).
    gathered = dist.gather_object(results, name=f"eval_{iteration}")
    metrics = None
    if dist.is_main():
        merged = [r for part in gathered for r in part]
        metrics = evaluate_bbox(coco_gt, merged)
        write_eval(output_dir, iteration, metrics, merged)
    # Horovod: share rank 0's metrics so every rank can log or act on them.
    metrics = dist.broadcast_object(metrics, name=f"eval_metrics_{iteration}")
    model.train(was_training)
    return metrics
