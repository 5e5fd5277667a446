"""Train a MegDet detector (Faster R-CNN + FPN, CGBN, linear scaling rule, warmup) with Horovod.

    horovodrun -np 64 -H host1:8,...,host8:8 python -m hvd_megdet.train \
        --config configs/megdet_r50_fpn_b256.yaml [key=value ...] [--resume]
    python -m hvd_megdet.train --config configs/demo_shapes.yaml     # one process: a world of 1

The order follows Horovod's ImageNet example: init, pin the device, shard the data, scale the lr by the
world size, wrap the optimizer, broadcast parameters and optimizer state; rank 0 alone writes.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch
from tqdm import tqdm

from hvd_megdet import checkpoint, dist
from hvd_megdet.config import ConfigError, load_config, save_config, to_dict
from hvd_megdet.data import CocoDetection, DatasetError, build_train_loader, build_transforms, build_val_loader, load_coco
from hvd_megdet.data.sampler import epoch_length
from hvd_megdet.engine import evaluate, to_device, train_step
from hvd_megdet.model import build_model
from hvd_megdet.solver import build_optimizer, lr_at, scaled_lr, set_lr
from hvd_megdet.sync_bn import bn_group


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. solver.max_iter=100")
    return parser.parse_args(argv)


def log(*args):
    """Print on rank 0 only."""
    if dist.is_main():
        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


def train_dataset(cfg):
    """The training set with the training transforms of `cfg.input`."""
    inp = cfg.input
    return CocoDetection(cfg.data.train.images, cfg.data.train.annotations,
                         transforms=build_transforms(True, inp.min_size, inp.max_size, inp.flip_prob),
                         keep_empty=cfg.data.keep_empty_train)


def val_dataset(cfg):
    """The validation set (every image, with or without annotations) at the test size, or None if unset."""
    if not cfg.data.val.annotations:
        return None
    inp = cfg.input
    test_size = inp.test_min_size or inp.min_size[-1]
    return CocoDetection(cfg.data.val.images, cfg.data.val.annotations,
                         transforms=build_transforms(False, [test_size], inp.max_size), keep_empty=True)


def model_from_config(m, num_classes, norm=None, process_set=None):
    """The detector of model config `m`, with `norm` overriding m.norm (evaluation uses plain BN for CGBN)."""
    return build_model(num_classes, backbone=m.backbone, norm=norm or m.norm, process_set=process_set,
                       two_phase=m.two_phase, anchor_sizes=m.anchor_sizes,
                       trainable_backbone_layers=m.trainable_backbone_layers, weights=m.weights or None,
                       rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
                       rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
                       rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
                       rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
                       box_batch_size_per_image=m.box_batch_size_per_image,
                       box_detections_per_img=m.box_detections_per_img)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg, resume=False):
    """Train per `cfg` on the ranks of this Horovod job; returns (model, final bbox metrics or None)."""
    # Horovod: initialize the library.
    dist.init()
    world, rank = dist.size(), dist.rank()
    # Horovod: pin this process to its local GPU (CPU: split the cores between local ranks).
    device = dist.device_for(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(dist.torch_threads_per_rank())
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.output_dir)

    # CGBN groups of model.bn_group_size consecutive ranks (0 = all ranks); every rank registers all groups.
    group = bn_group(cfg.model.bn_group_size or world)

    train_set, val_set = train_dataset(cfg), val_dataset(cfg)
    if val_set is not None and list(val_set.label_to_cat_id) != list(train_set.label_to_cat_id):
        raise ConfigError(f"{cfg.data.val.annotations} and {cfg.data.train.annotations} list different categories")
    num_classes = len(train_set.label_to_cat_id)  # K categories + background
    model = model_from_config(cfg.model, num_classes, process_set=group).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # Horovod: scale the lr by the world size (MegDet's linear scaling rule, see solver.scaled_lr).
    global_batch = cfg.solver.ims_per_gpu * world
    lr = scaled_lr(cfg.solver.base_lr, cfg.solver.base_batch, global_batch)
    log(f"world size {world} x {cfg.solver.ims_per_gpu} images = global batch {global_batch}; "
        f"lr {cfg.solver.base_lr} x {global_batch}/{cfg.solver.base_batch} = {lr:g} (linear scaling rule); "
        f"warmup from {cfg.solver.warmup_factor:g} x lr over {cfg.solver.warmup_iters} iterations")
    optimizer = build_optimizer(model, cfg.solver, lr)

    start_iter = 0
    if resume:
        path, state = checkpoint.latest(out, log) if dist.is_main() else (None, None)
        if dist.is_main() and state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_iter = state["iteration"]
            log(f"resumed from {path} at iteration {start_iter}")
        # Horovod: every rank continues from rank 0's iteration and its own saved RNG state.
        start_iter, rng_states = dist.broadcast_object(
            (start_iter, state["rng"] if state is not None else None), name="resume_state")
        if rng_states is not None and rank < len(rng_states):
            set_rng_state(rng_states[rank])

    # Horovod: average gradients with allreduce, fused and overlapped with the backward pass.
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if cfg.solver.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=cfg.solver.backward_passes_per_step)
    # Horovod: start every rank from rank 0's parameters, buffers and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    # Horovod: each rank reads its own shard of the training set.
    train_loader = build_train_loader(train_set, cfg.solver.ims_per_gpu, rank, world, cfg.seed,
                                      cfg.data.num_workers, start_iter=start_iter)
    val_loader = build_val_loader(val_set, rank, world, cfg.data.num_workers) if val_set else None
    coco_gt = None
    if val_set is not None and dist.is_main():
        coco_gt = load_coco(cfg.data.val.annotations)
    iters_per_epoch = epoch_length(len(train_set), global_batch)

    writer = metrics_file = None
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        metrics_file = open(out / "metrics.jsonl", "a")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    log(f"{len(train_set)} training images, {iters_per_epoch} iterations per epoch; "
        f"{cfg.solver.max_iter} iterations; norm={cfg.model.norm} bn_group_size={cfg.model.bn_group_size or world}")

    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and device.type == "cuda" else None

    def save(iteration):
        # Horovod: every rank's RNG state goes into the checkpoint, so a resumed run repeats this one exactly.
        rng_states = dist.gather_object(rng_state(), name=f"rng_{iteration}")
        if dist.is_main():
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "iteration": iteration, "config": to_dict(cfg), "rng": rng_states},
                            checkpoint.path_for(out, iteration))

    def run_eval(iteration):
        if val_loader is None:
            return None
        metrics = evaluate(model, val_loader, coco_gt, train_set.label_to_cat_id, device, out, iteration,
                           cfg.amp, cfg.channels_last)
        log(f"iter {iteration}: bbox " + " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
        if writer:
            for k, v in metrics.items():
                writer.add_scalar(f"bbox/{k}", v, iteration)
        return metrics

    model.train()
    skipped = 0
    # A progress bar on a terminal; under horovodrun (output piped) a plain line every log_period instead.
    bar = tqdm(total=cfg.solver.max_iter, initial=start_iter, dynamic_ncols=True,
               disable=not (dist.is_main() and sys.stderr.isatty()))
    data_iter = iter(train_loader)
    t_data = time.perf_counter()
    for iteration in range(start_iter, cfg.solver.max_iter):
        images, targets = next(data_iter)
        images, targets = to_device(images, targets, device, cfg.channels_last)
        data_time = time.perf_counter() - t_data
        lr_now = lr_at(iteration, cfg.solver, world)
        set_lr(optimizer, lr_now)
        losses, stepped = train_step(model, optimizer, images, targets, amp=cfg.amp, scaler=scaler,
                                     clip_grad_norm=cfg.solver.clip_grad_norm)
        if not stepped:
            skipped += 1
            if cfg.solver.nonfinite == "stop":
                raise FloatingPointError(f"non-finite loss or gradient at iteration {iteration} "
                                         f"(losses {losses}); stopping (solver.nonfinite=stop)")
            log(f"warning: iteration {iteration}: non-finite loss or gradient, step skipped ({skipped} so far)")
        step_time = time.perf_counter() - t_data
        done = iteration + 1
        if dist.is_main():
            record = {"iteration": done, "epoch": done / iters_per_epoch, "lr": lr_now, **losses,
                      "skipped": skipped, "time": step_time, "data_time": data_time}
            metrics_file.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(lr=f"{lr_now:.4g}", loss=f"{losses['loss']:.3f}")
            if done % cfg.log_period == 0:
                if bar.disable:
                    log(f"iter {done}/{cfg.solver.max_iter} epoch {record['epoch']:.2f} lr {lr_now:.4g} "
                        + " ".join(f"{k} {v:.3f}" for k, v in losses.items())
                        + f" time {step_time:.2f}s data {data_time:.2f}s")
                metrics_file.flush()
                for k, v in record.items():
                    if k != "iteration":
                        writer.add_scalar(f"train/{k}", v, done)
        if done % cfg.checkpoint_period == 0 and done < cfg.solver.max_iter:
            save(done)
        if cfg.eval_period and done % cfg.eval_period == 0 and done < cfg.solver.max_iter:
            run_eval(done)
        t_data = time.perf_counter()
    bar.close()

    save(cfg.solver.max_iter)
    metrics = run_eval(cfg.solver.max_iter)
    if dist.is_main():
        metrics_file.close()
        writer.close()
        log(f"done: {cfg.solver.max_iter} iterations, {skipped} skipped; outputs in {out}"
            + (f"; bbox AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}" if metrics else ""))
    return model, metrics


# Errors in what the user gave (config, data, checkpoints): one line naming the culprit, no traceback.
USER_ERRORS = (ConfigError, DatasetError, checkpoint.CheckpointError)


def main(argv=None):
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides), resume=args.resume)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
