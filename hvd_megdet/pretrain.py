"""Pretrain a detector backbone as a classifier of object crops, with Horovod and CGBN: the project's ImageNet.

    horovodrun -np 2 -H localhost:2 python -m hvd_megdet.pretrain --config configs/pretrain_shapes.yaml
    python -m hvd_megdet.train --config ... model.weights=output/pretrain_shapes/backbone.pth

MegDet, like its no-BN baseline, fine-tunes from an ImageNet-trained ResNet. Where no ImageNet weights can be
had (no download, or a backbone torchvision has no weights for), this trains one on what there is: the crops
of data.train's objects, labelled by category, and background squares (`hvd_megdet.data.crops`), at
pretrain.crop_size pixels. The classifier is model.backbone's ResNet with a linear layer
(`model.BackboneClassifier`); the training is the detector's: the same Horovod order (init, shard, linear
scaling rule, DistributedOptimizer, broadcast), CGBN over model.bn_group_size ranks (model.norm cgbn, or bn),
the solver's warmup and schedule, `engine.train_step`. Every eval_period iterations and at the end rank 0
logs the top-1 accuracy on the crops of data.val. Rank 0 writes `<output_dir>/backbone.pth`, a state dict
with the keys of a torchvision ImageNet ResNet, which model.weights loads into the detector's backbone by the
same code path as torchvision's own ImageNet file. No checkpoints: a pretraining is minutes to hours, rerun it.
"""
import random
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch

from hvd_megdet import dist
from hvd_megdet.checkpoint import write_atomic
from hvd_megdet.cli import command_parser, exit_on_user_error
from hvd_megdet.config import ConfigError, dump, load_config, save_config
from hvd_megdet.data import build_train_loader, build_val_loader, epoch_length
from hvd_megdet.data.crops import ObjectCrops
from hvd_megdet.engine import grad_scaler, next_batch, to_device, train_step
from hvd_megdet.logs import MetricsWriter, log, log_to_file
from hvd_megdet.model import backbone_classifier
from hvd_megdet.solver import describe_scaling, due, global_batch, init_optimizer_state, lr_at, set_lr
from hvd_megdet.sync_bn import average_running_stats


def crops(cfg, split, train):
    """The ObjectCrops of data.<split> at pretrain.crop_size; None when the split names no annotations."""
    paths = getattr(cfg.data, split)
    if not paths.annotations:
        return None
    return ObjectCrops(paths.images, paths.annotations, cfg.pretrain.crop_size, cfg.pretrain.context, train=train,
                       seed=cfg.seed)


@torch.no_grad()
def accuracy(model, loader, num_classes, device):
    """Top-1 accuracy in percent over every rank's shard of the loader's crops, overall and per class
    ({"top1": ..., "top1/<class index>": ...}), the same on every rank; the model is left in train mode."""
    model.eval()
    correct, total = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        predicted = model(images).argmax(1).cpu()
        labels = torch.cat([t["labels"] for t in targets]).cpu()
        total += torch.bincount(labels, minlength=num_classes)
        correct += torch.bincount(labels[predicted == labels], minlength=num_classes)
    # Horovod: every rank's counts summed, so every rank holds the accuracy of the whole validation set.
    counts = dist.allreduce_sum(torch.cat([correct, total]), name="pretrain_accuracy")
    correct, total = counts[:num_classes], counts[num_classes:]
    model.train()
    per_class = {f"top1/{k}": 100.0 * float(c / t) for k, (c, t) in enumerate(zip(correct, total)) if t > 0}
    return {"top1": 100.0 * float(correct.sum() / total.sum()), **per_class}


def pretrain(cfg):
    """Pretrain cfg.model.backbone on crops of cfg.data (see the module docstring) on the ranks of this Horovod
    job; returns (the classifier, the final validation metrics or None). Rank 0 writes backbone.pth."""
    if cfg.model.norm not in ("bn", "cgbn"):
        raise ConfigError(f"model.norm={cfg.model.norm}: pretraining from scratch needs bn or cgbn")
    # Horovod: initialize, with the process sets of the CGBN groups; pin the device.
    bn_groups = dist.init(stall_limit=cfg.stall_limit, bn_group_size=cfg.model.bn_group_size)
    device = dist.device_for(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(dist.torch_threads_per_rank())
    random.seed(cfg.seed + dist.rank())
    torch.manual_seed(cfg.seed + dist.rank())
    out, solver = Path(cfg.output_dir), cfg.solver

    train_set, val_set = crops(cfg, "train", train=True), crops(cfg, "val", train=False)
    log(f"{cfg.data.train.annotations}: {len(train_set)} crops of {cfg.pretrain.crop_size} px: "
        + ", ".join(f"{n} {name}" for name, n in train_set.counts.items()))
    model = backbone_classifier(cfg.model.backbone, train_set.num_classes, cfg.model.norm,
                                bn_groups.process_set(log), cfg.model.two_phase, cfg.model.cgbn_wait).to(device)
    # Horovod: lr by the linear scaling rule, gradients averaged by allreduce; every rank starts from rank 0's
    # parameters and optimizer state.
    optimizer = dist.distributed_optimizer(model, solver)
    init_optimizer_state(optimizer)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    scaler = grad_scaler(device, cfg.amp)

    world, passes = dist.size(), solver.backward_passes_per_step
    iters_per_epoch = epoch_length(len(train_set), global_batch(solver, world))
    # Horovod: each rank its shard of the training and validation crops.
    batches = iter(build_train_loader(train_set, solver.ims_per_gpu, dist.rank(), world, cfg.seed,
                                      cfg.data.num_workers))
    val_loader = (build_val_loader(val_set, dist.rank(), world, cfg.data.num_workers, batch_size=64)
                  if val_set is not None else None)
    writer = None
    if dist.is_main():  # only now: a run that fails on bad input writes nothing
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log_to_file(out / "log.txt")
        writer = MetricsWriter(out, 0, solver.max_iter, cfg.log_period)
    log(f"resolved config (also in {out / 'config.yaml'}):\n{dump(cfg).rstrip()}")
    log(describe_scaling(solver, world, iters_per_epoch))

    metrics, skipped, start = None, 0, time.perf_counter()
    for iteration in range(solver.max_iter):
        step_batches = [to_device(*next_batch(batches), device) for _ in range(passes)]
        data_time = time.perf_counter() - start
        lr = lr_at(iteration, solver, world)
        set_lr(optimizer, lr)
        step = train_step(model, optimizer, step_batches, amp=cfg.amp, scaler=scaler,
                          clip_grad_norm=solver.clip_grad_norm)
        if step.skipped:
            skipped += 1
            if solver.nonfinite == "stop":
                raise FloatingPointError(f"iteration {iteration}: non-finite loss or gradient; stopping "
                                         f"(solver.nonfinite=stop)")
            log(f"warning: iteration {iteration}: non-finite loss or gradient; step skipped ({skipped} so far)")
        step_time, done = time.perf_counter() - start, iteration + 1
        if val_loader is not None and due(done, cfg.eval_period, solver.max_iter):
            average_running_stats(model)
            metrics = accuracy(model, val_loader, train_set.num_classes, device)
            log(f"iter {done}: top-1 {metrics['top1']:.1f}% on {len(val_set)} validation crops; by class "
                + ", ".join(f"{train_set.class_names[int(k.split('/')[1])]} {v:.1f}"
                            for k, v in metrics.items() if "/" in k))
            if writer:
                writer.write_eval(done, metrics, group="pretrain")
        if writer:
            writer.write({"iteration": done, "epoch": done / iters_per_epoch, "lr": lr, **step.losses,
                          "skipped": skipped, "time": step_time,
                          "data_time": data_time}, global_batch(solver, world))
        start = time.perf_counter()
    if val_loader is None:  # else the last evaluation averaged them
        average_running_stats(model)
    if dist.is_main():
        weights = out / "backbone.pth"
        state = {k: v.detach().cpu() for k, v in model.resnet.state_dict().items()}
        write_atomic(weights, lambda f: torch.save(state, f))
        writer.close()
        log(f"done: {solver.max_iter} iterations; backbone weights in {weights} (model.weights={weights})")
    return model, metrics


def main(argv=None):
    args = command_parser(__doc__).parse_args(argv)
    with exit_on_user_error():
        try:
            pretrain(load_config(args.config, args.overrides))
        except FloatingPointError as e:
            sys.exit(f"error: FloatingPointError: {e}")


if __name__ == "__main__":
    main()
    dist.exit_skipping_native_teardown()
