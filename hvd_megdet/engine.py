"""One training step and the distributed evaluation loop.

`train_step` is the whole iteration after the batch is loaded: forward, backward (Horovod averages the
gradients during it), one consistency check across ranks, optional clipping, and the optimizer step.
`evaluate` runs inference on this rank's exact shard of the validation set, gathers the detections on
rank 0, scores them with COCOeval and shares the metrics with every rank.
"""
import contextlib
import math

import torch

from hvd_megdet import dist
from hvd_megdet.evaluation import evaluate_bbox, to_coco_results, write_eval


def to_device(images, targets, device, channels_last=False):
    """Move a batch (tuple of CHW tensors, tuple of target dicts) to `device`."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = [img.to(device, non_blocking=True).contiguous(memory_format=memory_format) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def autocast(device, amp):
    """The autocast context for `amp` ('off' | 'bf16' | 'fp16'); AMP runs on CUDA only."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grads_finite(parameters):
    """True when every gradient is finite (one fused reduction, no host sync per tensor)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def train_step(model, optimizer, images, targets, *, amp="off", scaler=None, clip_grad_norm=0.0):
    """One SGD iteration on this rank's batch; returns (losses averaged over ranks, stepped: bool).

    `optimizer` is an hvd.DistributedOptimizer. The losses of all ranks and a non-finite flag travel in one
    allreduce, so every rank takes the same decision: when any rank's loss or the averaged gradient is not
    finite, no rank steps (and the caller counts or stops).
    """
    device = images[0].device
    with autocast(device, amp):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    optimizer.zero_grad()
    (scaler.scale(loss) if scaler else loss).backward()
    # Horovod: wait for the gradient allreduces started during backward, so the check and clipping see them.
    optimizer.synchronize()
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local_bad = not math.isfinite(loss.item()) or not grads_finite(params)
    names = sorted(loss_dict)
    stats = torch.tensor([loss_dict[k].item() for k in names] + [float(local_bad)], dtype=torch.float64)
    # Horovod: one small allreduce gives every rank the mean losses and whether any rank saw a non-finite value.
    stats = dist.allreduce_sum(stats, name="train_step_stats")
    bad = stats[-1].item() > 0
    losses = {k: v / dist.size() for k, v in zip(names, stats[:-1].tolist())}
    losses["loss"] = sum(losses.values())
    if bad:
        optimizer.zero_grad()
        if scaler:  # let the scaler lower its scale, as it would on an overflow
            scaler.update()
        return losses, False
    if clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    # Horovod: gradients are already averaged; step without a second synchronize.
    with optimizer.skip_synchronize():
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return losses, True


@torch.no_grad()
def inference(model, loader, device, label_to_cat_id, amp="off", channels_last=False):
    """Detections of this rank's shard in COCO results format (original image coordinates)."""
    model.eval()
    results = []
    for images, targets in loader:
        images, _ = to_device(images, (), device, channels_last)
        with autocast(device, amp):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        results.extend(to_coco_results(outputs, targets, label_to_cat_id))
    return results


def evaluate(model, loader, coco_gt, label_to_cat_id, device, output_dir, iteration, amp="off",
             channels_last=False):
    """Distributed COCO bbox evaluation; returns the metrics dict (AP, AP50, ... in percent) on every rank.

    Each rank infers its exact shard (no padding, so no image is counted twice); detections are gathered on
    rank 0, which scores them and writes `<output_dir>/eval/latest.json`. Leaves the model in train mode.
    """
    was_training = model.training
    results = inference(model, loader, device, label_to_cat_id, amp, channels_last)
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
