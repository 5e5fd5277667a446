"""Train a MegDet detector (Faster R-CNN + FPN, CGBN, linear scaling rule, warmup) with Horovod.

    horovodrun -np 64 -H host1:8,...,host8:8 python -m hvd_megdet.train \
        --config configs/megdet_r50_fpn_b256.yaml [key=value ...] [--resume]
    python -m hvd_megdet.train --config configs/demo_shapes.yaml     # one process: a world of 1
    horovodrun -np 64 --min-np 32 --max-np 64 --host-discovery-script ./discover_hosts.sh \
        python -m hvd_megdet.train --config ... --elastic            # see docs/robustness.md

The order follows Horovod's ImageNet example: init, pin the device, shard the data, scale the lr by the
world size, wrap the optimizer, broadcast parameters and optimizer state; rank 0 alone writes, and only
under output_dir. Errors end every rank with one line `error: ...` (docs/robustness.md lists the cases).
"""
import argparse
import json
import random
import sys
import time
import types
from pathlib import Path

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError
from tqdm import tqdm

from hvd_megdet import checkpoint, dist
from hvd_megdet import elastic as hvd_elastic
from hvd_megdet.config import ConfigError, load_config, save_config, to_dict
from hvd_megdet.data import (CocoDetection, DatasetError, build_train_loader, build_transforms, build_val_loader,
                             load_coco)
from hvd_megdet.data.sampler import epoch_length
from hvd_megdet.engine import evaluate, next_batch, to_device, train_step
from hvd_megdet.model import build_model, load_weights, use_channels_last
from hvd_megdet.solver import build_optimizer, lr_at, scaled_lr, set_lr
from hvd_megdet.sync_bn import bn_group


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--elastic", action="store_true",
                        help="Horovod elastic mode: go on when workers are lost or added (needs horovodrun "
                             "--min-np/--max-np/--host-discovery-script)")
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


def model_from_config(m, num_classes, norm=None, process_set=None, channels_last=False):
    """The detector of model config `m`, with `norm` overriding m.norm (evaluation uses plain BN for CGBN),
    computing in channels_last when asked (`model.use_channels_last`). A missing or unusable m.weights file
    raises CheckpointError naming it (and the mismatching keys)."""
    model = build_model(num_classes, backbone=m.backbone, norm=norm or m.norm, process_set=process_set,
                        two_phase=m.two_phase, anchor_sizes=m.anchor_sizes,
                        trainable_backbone_layers=m.trainable_backbone_layers,
                        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
                        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
                        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
                        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
                        box_batch_size_per_image=m.box_batch_size_per_image,
                        box_detections_per_img=m.box_detections_per_img)
    if m.weights:
        try:
            load_weights(model, m.weights)
        except (OSError, ValueError) as e:
            raise checkpoint.CheckpointError(f"model.weights: {e}") from None
    return use_channels_last(model) if channels_last else model


def bn_process_set(bn_group_size, elastic):
    """This rank's CGBN process set (sync_bn.bn_group) for groups of `bn_group_size` ranks (0 = all ranks).

    A size that does not divide the world size is a ConfigError; in elastic mode, where the world size
    changes, the largest divisor of the world size below it is used instead. Elastic mode logs the groups.
    """
    world = dist.size()
    k = bn_group_size or world
    if world % k:
        if not elastic:
            raise ConfigError(f"model.bn_group_size={bn_group_size} does not divide the world size {world}")
        k = max(d for d in range(1, min(k, world) + 1) if world % d == 0)
        log(f"warning: model.bn_group_size={bn_group_size} does not divide the world size {world}")
    if elastic:
        log(f"BN groups of {k} of the {world} ranks")
    return bn_group(k)


def log_scaling(cfg, world, num_images):
    """Log the global batch and the lr the linear scaling rule gives for `world` ranks."""
    global_batch = cfg.solver.ims_per_gpu * world
    lr = scaled_lr(cfg.solver.base_lr, cfg.solver.base_batch, global_batch)
    log(f"world size {world} x {cfg.solver.ims_per_gpu} images = global batch {global_batch}; "
        f"lr {cfg.solver.base_lr} x {global_batch}/{cfg.solver.base_batch} = {lr:g} (linear scaling rule); "
        f"warmup from {cfg.solver.warmup_factor:g} x lr over {cfg.solver.warmup_iters} iterations; "
        f"{epoch_length(num_images, global_batch)} iterations per epoch")


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def restore_latest(out, model, optimizer):
    """Load the newest loadable checkpoint under `out` into model and optimizer.

    Returns (iteration, per-rank RNG states or None, error message or None): the error (a checkpoint that
    does not fit) is returned rather than raised, so that the caller raises it on every rank.
    """
    path, state = checkpoint.latest(out, log)
    if state is None:
        log(f"--resume: no checkpoint under {checkpoint.checkpoint_dir(out)}; starting at iteration 0")
        return 0, None, None
    try:
        checkpoint.restore(model, optimizer, state, path)
    except checkpoint.CheckpointError as e:
        return 0, None, str(e)
    log(f"resumed from {path} at iteration {state['iteration']}")
    return int(state["iteration"]), state.get("rng"), None


def open_metrics(path, start_iter):
    """metrics.jsonl opened for appending, holding only the records of iterations <= start_iter: a resumed
    run writes the later ones again, and a killed run may have left a partial last line."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] <= start_iter:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    checkpoint.write_atomic(path, lambda f: f.write("".join(kept).encode()))
    return open(path, "a")


def train(cfg, resume=False, elastic=False):
    """Train per `cfg` on the ranks of this Horovod job; returns (model, final bbox metrics or None).

    resume: continue from the newest loadable checkpoint under output_dir (model, optimizer, iteration,
        hence the sampler position and the schedule, and every rank's RNG state).
    elastic: Horovod elastic mode (hvd_megdet.elastic): lost or added workers do not stop the run.
    """
    if elastic and not hvd_elastic.in_elastic_job():
        raise ConfigError("--elastic needs an elastic horovodrun: horovodrun --min-np N --max-np M "
                          "--host-discovery-script SCRIPT ...")
    # Horovod: initialize the library.
    dist.init()
    rank = dist.rank()
    # Horovod: pin this process to its local GPU (CPU: split the cores between local ranks).
    device = dist.device_for(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(dist.torch_threads_per_rank())
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.output_dir)

    train_set, val_set = train_dataset(cfg), val_dataset(cfg)
    if val_set is not None and list(val_set.label_to_cat_id) != list(train_set.label_to_cat_id):
        raise ConfigError(f"{cfg.data.val.annotations} and {cfg.data.train.annotations} list different categories")
    log(f"{cfg.data.train.annotations}: {len(train_set)} training images; dropped "
        + ", ".join(f"{n} {what}" for what, n in train_set.dropped.items()))
    num_classes = len(train_set.label_to_cat_id)  # K categories + background
    # CGBN groups of model.bn_group_size consecutive ranks (0 = all ranks); every rank registers all groups.
    model = model_from_config(cfg.model, num_classes, process_set=bn_process_set(cfg.model.bn_group_size, elastic),
                              channels_last=cfg.channels_last).to(device)

    # Horovod: scale the lr by the world size (MegDet's linear scaling rule, see solver.scaled_lr), then
    # average gradients with allreduce, fused and overlapped with the backward pass.
    optimizer = hvd.DistributedOptimizer(
        build_optimizer(model, cfg.solver, scaled_lr(cfg.solver.base_lr, cfg.solver.base_batch,
                                                     cfg.solver.ims_per_gpu * dist.size())),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if cfg.solver.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=cfg.solver.backward_passes_per_step)
    init_optimizer_state(optimizer)

    start_iter = 0
    if resume:
        # Elastic: every rank reads the checkpoint itself (no collective outside the elastic loop; the first
        # sync then broadcasts rank 0's state). Else rank 0 reads it and broadcasts what every rank needs.
        start_iter, rng_states, error = (restore_latest(out, model, optimizer) if dist.is_main() or elastic
                                         else (0, None, None))
        if not elastic:
            # Horovod: rank 0's iteration, every rank's saved RNG state, or rank 0's error, to every rank.
            start_iter, rng_states, error = dist.broadcast_object((start_iter, rng_states, error),
                                                                  name="resume_state")
        if error:
            raise checkpoint.CheckpointError(error)
        if rng_states is not None and rank < len(rng_states):
            set_rng_state(rng_states[rank])
    if not elastic:
        # Horovod: start every rank from rank 0's parameters, buffers and optimizer state.
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        dist.record_peers()

    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log(f"{cfg.solver.max_iter} iterations; norm={cfg.model.norm} bn_group_size={cfg.model.bn_group_size}")
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and device.type == "cuda" else None
    logs = {}  # rank 0's metrics.jsonl and TensorBoard writer, opened by whichever process is rank 0

    def save(iteration):
        """Checkpoint `iteration` (rank 0 writes), unless some rank's weights are not finite: then raise."""
        nonfinite = checkpoint.first_nonfinite({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        # Horovod: every rank's RNG state goes into the checkpoint, so a resumed run repeats this one exactly;
        # and every rank learns whether any rank's weights are non-finite, so all stop together.
        gathered = dist.gather_object((rng_state(), nonfinite), name=f"checkpoint_{iteration}")
        bad = [(r, name) for r, (_, name) in enumerate(gathered) if name]
        if bad:
            raise FloatingPointError(f"iteration {iteration}: {bad[0][1]} is not finite on rank {bad[0][0]}; "
                                     f"checkpoint not written")
        if dist.is_main():
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "iteration": iteration, "config": to_dict(cfg), "rng": [g[0] for g in gathered]},
                            checkpoint.path_for(out, iteration))

    def on_nonfinite(iteration, lr, losses, report, skipped):
        """Log a skipped step, or write the diagnostics and stop (solver.nonfinite)."""
        ranks = [r["rank"] for r in report if not r["loss_finite"]]
        what = (f"non-finite loss on rank {', '.join(map(str, ranks))}" if ranks
                else "non-finite gradient (after averaging over the ranks)")
        if cfg.solver.nonfinite == "skip":
            log(f"warning: iteration {iteration}: {what}; step skipped ({skipped} so far)")
            return
        path = out / f"nonfinite_{iteration:07d}.json"
        if dist.is_main():
            path.write_text(json.dumps({"iteration": iteration, "lr": lr, "world_size": dist.size(),
                                        "mean_losses": losses, "ranks": report}, indent=1))
        raise FloatingPointError(f"iteration {iteration}: {what}; stopping (solver.nonfinite=stop); "
                                 f"diagnostics in {path}")

    def loop(state):
        """Iterations state.iteration..max_iter, then the final checkpoint and evaluation; returns (final
        metrics, skipped steps). In elastic mode this is called again after every change of the workers."""
        world = dist.size()
        log_scaling(cfg, world, len(train_set))
        if len(train_set) < world:
            raise DatasetError(f"{cfg.data.train.annotations}: {len(train_set)} training images for {world} "
                               f"ranks: every rank needs at least one")
        # Horovod: each rank reads its own shard of the training set, from the current iteration on.
        train_loader = build_train_loader(train_set, cfg.solver.ims_per_gpu, dist.rank(), world, cfg.seed,
                                          cfg.data.num_workers, start_iter=state.iteration)
        val_loader = build_val_loader(val_set, dist.rank(), world, cfg.data.num_workers) if val_set else None
        coco_gt = load_coco(cfg.data.val.annotations) if val_set is not None and dist.is_main() else None
        iters_per_epoch = epoch_length(len(train_set), cfg.solver.ims_per_gpu * world)
        if dist.is_main() and not logs:
            from torch.utils.tensorboard import SummaryWriter
            logs.update(metrics=open_metrics(out / "metrics.jsonl", state.iteration), tb=SummaryWriter(str(out / "tb")))

        def run_eval(iteration):
            if val_loader is None:
                return None
            metrics = evaluate(model, val_loader, coco_gt, train_set.label_to_cat_id, device, out, iteration,
                               cfg.amp)
            log(f"iter {iteration}: bbox " + " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
            if dist.is_main():
                for k, v in metrics.items():
                    logs["tb"].add_scalar(f"bbox/{k}", v, iteration)
            return metrics

        model.train()
        # A progress bar on a terminal; under horovodrun (output piped) a plain line every log_period instead.
        bar = tqdm(total=cfg.solver.max_iter, initial=state.iteration, dynamic_ncols=True,
                   disable=not (dist.is_main() and sys.stderr.isatty()))
        data_iter = iter(train_loader)
        t_data = time.perf_counter()
        while state.iteration < cfg.solver.max_iter:
            iteration = state.iteration
            images, targets = next_batch(data_iter)
            images, targets = to_device(images, targets, device)
            data_time = time.perf_counter() - t_data
            lr_now = lr_at(iteration, cfg.solver, world)
            set_lr(optimizer, lr_now)
            losses, nonfinite = train_step(model, optimizer, images, targets, amp=cfg.amp, scaler=scaler,
                                           clip_grad_norm=cfg.solver.clip_grad_norm)
            if nonfinite:
                state.skipped += 1
                on_nonfinite(iteration, lr_now, losses, nonfinite, state.skipped)
            step_time = time.perf_counter() - t_data
            done = iteration + 1
            if done % cfg.checkpoint_period == 0 and done < cfg.solver.max_iter:
                save(done)
            if cfg.eval_period and done % cfg.eval_period == 0 and done < cfg.solver.max_iter:
                run_eval(done)
            state.iteration = done
            if dist.is_main():
                record = {"iteration": done, "epoch": done / iters_per_epoch, "lr": lr_now, **losses,
                          "skipped": state.skipped, "world_size": world, "time": step_time,
                          "data_time": data_time}
                # One line per iteration, flushed: a killed run leaves whole lines.
                logs["metrics"].write(json.dumps(record) + "\n")
                logs["metrics"].flush()
                bar.update(1)
                bar.set_postfix(lr=f"{lr_now:.4g}", loss=f"{losses['loss']:.3f}")
                if done % cfg.log_period == 0:
                    if bar.disable:
                        log(f"iter {done}/{cfg.solver.max_iter} epoch {record['epoch']:.2f} lr {lr_now:.4g} "
                            + " ".join(f"{k} {v:.3f}" for k, v in losses.items())
                            + f" time {step_time:.2f}s data {data_time:.2f}s")
                    for k, v in record.items():
                        if k != "iteration":
                            logs["tb"].add_scalar(f"train/{k}", v, done)
            # Elastic: the state to roll back to when a worker is lost (a no-op otherwise). Last: a failure in
            # a collective above redoes the iteration, whose record is written only after them.
            state.commit()
            t_data = time.perf_counter()
        bar.close()
        save(cfg.solver.max_iter)
        return run_eval(cfg.solver.max_iter), state.skipped

    if elastic:
        def on_reset():
            # Horovod: re-initialization dropped the BN process sets; register the groups of the new world.
            hvd_elastic.set_process_set(model, bn_process_set(cfg.model.bn_group_size, elastic=True))

        metrics, skipped = hvd_elastic.run(loop, model, optimizer, on_reset, iteration=start_iter, skipped=0)
    else:
        metrics, skipped = loop(types.SimpleNamespace(iteration=start_iter, skipped=0, commit=lambda: None))
    if dist.is_main():
        logs["metrics"].close()
        logs["tb"].close()
        log(f"done: {cfg.solver.max_iter} iterations, {skipped} skipped; outputs in {out}"
            + (f"; bbox AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}" if metrics else ""))
    return model, metrics


# Errors in what the user gave (config, data, checkpoints): one line naming the culprit, no traceback.
USER_ERRORS = (ConfigError, DatasetError, checkpoint.CheckpointError)


def main(argv=None):
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides), resume=args.resume, elastic=args.elastic)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except FloatingPointError as e:  # solver.nonfinite=stop; the class name is what log scanners look for
        sys.exit(f"error: FloatingPointError: {e}")
    except HorovodInternalError as e:  # a peer died (elastic mode handles this itself)
        sys.exit(f"error: {dist.lost_peer_message(e)}")


if __name__ == "__main__":
    main()
