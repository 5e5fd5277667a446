"""Train a MegDet detector (Faster R-CNN + FPN, CGBN, linear scaling rule, warmup) with Horovod.

    horovodrun -np 64 -H host1:8,...,host8:8 python -m hvd_megdet.train \
        --config configs/megdet_r50_fpn_b256.yaml [key=value ...] [--resume]
    python -m hvd_megdet.train --config configs/demo_shapes.yaml     # one process: a world of 1
    horovodrun -np 64 --min-np 32 --max-np 64 --host-discovery-script ./discover_hosts.sh \
        python -m hvd_megdet.train --config ... --elastic            # see docs/robustness.md

`train` follows Horovod's ImageNet example: init, pin the device, scale the lr by the world size, wrap the
optimizer, broadcast parameters and optimizer state; then `Trainer.run` shards the data and runs the loop.
Rank 0 alone writes, and only under output_dir. Errors end every rank with one line `error: ...`
(docs/robustness.md lists the cases).
"""
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError

from hvd_megdet import checkpoint, dist
from hvd_megdet import elastic as hvd_elastic
from hvd_megdet.cli import command_parser, exit_on_user_error
from hvd_megdet.config import ConfigError, dump, load_config, save_config, to_dict
from hvd_megdet.data import (DatasetError, build_train_loader, build_val_loader, epoch_length, load_coco,
                             train_dataset, val_dataset)
from hvd_megdet.engine import evaluate, grad_scaler, next_batch, precise_bn, to_device, train_step
from hvd_megdet.logs import MetricsWriter, log, log_to_file
from hvd_megdet.model import detector_from_config
from hvd_megdet.solver import describe_scaling, due, global_batch, init_optimizer_state, lr_at, set_lr
from hvd_megdet.sync_bn import average_running_stats


def parse_args(argv=None):
    parser = command_parser(__doc__)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--elastic", action="store_true",
                        help="Horovod elastic mode: go on when workers are lost or added (needs horovodrun "
                             "--min-np/--max-np/--host-discovery-script)")
    return parser.parse_args(argv)


def restore_latest(out, model, optimizer):
    """Load the newest loadable checkpoint under `out` into model and optimizer.

    Returns (what the run resumes from, error message or None). The first is {"iteration", "skipped",
    "overflows" (the counters), "rng" (per-rank RNG states or None), "scaler" (the loss scaler's state or
    None)}; the error (a checkpoint that does not fit) is returned rather than raised, so that the caller
    raises it on every rank. The optimizer keeps the config's hyperparameters (weight decay, momentum...),
    and the log says which ones differ from the checkpoint's.
    """
    path, state = checkpoint.latest(out, log)
    if state is None:
        log(f"--resume: no checkpoint under {checkpoint.checkpoint_dir(out)}; starting at iteration 0")
        return asdict(Progress()) | {"rng": None, "scaler": None}, None
    try:
        changed = checkpoint.restore(model, optimizer, state, path)
    except checkpoint.CheckpointError as e:
        return None, str(e)
    log(f"resumed from {path} at iteration {state['iteration']}")
    if changed:
        log("the config's optimizer settings replace the checkpoint's: " + "; ".join(changed))
    return {"iteration": int(state["iteration"]), "skipped": int(state.get("skipped", 0)),
            "overflows": int(state.get("overflows", 0)), "rng": state.get("rng"), "scaler": state.get("scaler")}, None


@dataclass
class Progress:
    """Where training stands: the next iteration to run (also the training sampler's position), the number
    of skipped steps and of fp16 loss-scaling overflows; checkpoints keep all three. In elastic mode
    elastic.TrainingState carries the same counters."""
    iteration: int = 0
    skipped: int = 0
    overflows: int = 0


class Trainer:
    """The training loop (`run`) and the work done around it: checkpoints, evaluations, metrics, the reaction
    to a skipped step. Holds what the loop shares; `train` builds it."""

    def __init__(self, cfg, model, optimizer, scaler, train_set, val_set, device, elastic=False):
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.train_set, self.val_set, self.device, self.elastic = train_set, val_set, device, elastic
        self.out = Path(cfg.output_dir)
        self.coco_gt = None  # rank 0's validation ground truth, loaded at the first evaluation
        self.val_loader = None
        self.writer = None  # rank 0's MetricsWriter, opened by whichever process is rank 0 (elastic: may change)

    def run(self, progress):
        """Train from progress.iteration to solver.max_iter, updating `progress`; returns the final evaluation's
        metrics (None without a validation set). Elastic mode calls it again, with the state of the last
        commit, whenever the workers change."""
        cfg, solver = self.cfg, self.cfg.solver
        world, passes = dist.size(), solver.backward_passes_per_step
        images_per_iteration = global_batch(solver, world)
        iters_per_epoch = epoch_length(len(self.train_set), images_per_iteration)
        log(describe_scaling(solver, world, iters_per_epoch))
        if len(self.train_set) < world:
            raise DatasetError(f"{cfg.data.train.annotations}: {len(self.train_set)} training images for {world} "
                               f"ranks: every rank needs at least one")
        # Horovod: each rank reads its own shard of the training set, from the current iteration on (each
        # iteration takes `passes` batches), and evaluates its own shard of the validation set.
        batches = iter(build_train_loader(self.train_set, solver.ims_per_gpu, dist.rank(), world, cfg.seed,
                                          cfg.data.num_workers, start_iter=progress.iteration * passes))
        if self.val_set is not None:
            self.val_loader = build_val_loader(self.val_set, dist.rank(), world, cfg.data.num_workers)
        if dist.is_main() and self.writer is None:
            self.writer = MetricsWriter(self.out, progress.iteration, solver.max_iter, cfg.log_period)
        elif dist.is_main():  # elastic: back at the last commit, the iterations after it are redone
            self.writer.rewind(progress.iteration)
        if progress.iteration >= solver.max_iter:
            log(f"already at iteration {progress.iteration} of {solver.max_iter}: nothing to train")
            return self.evaluate(progress.iteration)

        metrics = None
        self.model.train()
        start = time.perf_counter()
        for iteration in range(progress.iteration, solver.max_iter):
            step_batches = [to_device(*next_batch(batches), self.device) for _ in range(passes)]
            data_time = time.perf_counter() - start
            lr = lr_at(iteration, solver, world)
            set_lr(self.optimizer, lr)
            step = train_step(self.model, self.optimizer, step_batches, amp=cfg.amp, scaler=self.scaler,
                              clip_grad_norm=solver.clip_grad_norm)
            if step.skipped:
                progress.skipped += 1
                self.on_skipped_step(iteration, lr, step, progress.skipped)
            progress.overflows += step.overflow
            step_time = time.perf_counter() - start
            done = iteration + 1
            save, score = due(done, cfg.checkpoint_period, solver.max_iter), due(done, cfg.eval_period, solver.max_iter)
            if save or score:
                self.prepare_bn_statistics(done)
            if save:
                self.checkpoint(done, progress)
            if score:
                metrics = self.evaluate(done)
            progress.iteration = done
            if dist.is_main():
                self.writer.write({"iteration": done, "epoch": done / iters_per_epoch, "lr": lr, **step.losses,
                                   "skipped": progress.skipped, "amp_overflows": progress.overflows,
                                   "world_size": world, "time": step_time, "data_time": data_time},
                                  images_per_iteration)
            if self.elastic and due(done, cfg.elastic.commit_period, solver.max_iter):
                # Horovod: the state to roll back to when a worker is lost. Last: a failure in a collective
                # above redoes the iteration, whose record is written only after them.
                progress.commit()
            start = time.perf_counter()
        overflows = f", {progress.overflows} fp16 overflows" if self.scaler else ""
        log(f"done: {solver.max_iter} iterations, {progress.skipped} skipped{overflows}; outputs in {self.out}"
            + (f"; bbox AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}" if metrics else ""))
        return metrics

    def prepare_bn_statistics(self, iteration):
        """Make the BatchNorm running statistics one model's before it is evaluated or saved: with PreciseBN
        (test.precise_bn_iters > 0) their true average over that many training batches per rank (the ones
        the next iterations will use), else the training EMAs; either way averaged over the ranks. PreciseBN
        leaves the random number generators as it found them: its loader and train-mode forward passes draw
        from them (the RPN's and RoI heads' samplers), and the run must go on as it would without it."""
        if self.cfg.test.precise_bn_iters > 0:
            solver, rngs = self.cfg.solver, checkpoint.rng_state()
            # Horovod: each rank its own shard, as in training.
            batches = iter(build_train_loader(self.train_set, solver.ims_per_gpu, dist.rank(), dist.size(),
                                              self.cfg.seed, 0, start_iter=iteration * solver.backward_passes_per_step))
            precise_bn(self.model, batches, self.cfg.test.precise_bn_iters, self.cfg.amp)
            checkpoint.set_rng_state(rngs)
        else:
            average_running_stats(self.model)

    def checkpoint(self, iteration, progress):
        """Checkpoint `iteration` with the counters of `progress` (rank 0 writes), unless some rank's weights
        are not finite: then raise."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        nonfinite = checkpoint.first_nonfinite(state)
        # Horovod: every rank's RNG state goes into the checkpoint, so a resumed run repeats this one exactly;
        # and every rank learns whether any rank's weights are non-finite, so all stop together.
        gathered = dist.gather_object((checkpoint.rng_state(), nonfinite), name=f"checkpoint_{iteration}")
        bad = [(r, name) for r, (_, name) in enumerate(gathered) if name]
        if bad:
            raise FloatingPointError(f"iteration {iteration}: {bad[0][1]} is not finite on rank {bad[0][0]}; "
                                     f"checkpoint not written")
        if dist.is_main():
            extra = {"scaler": self.scaler.state_dict()} if self.scaler else {}
            checkpoint.save({**state, "iteration": iteration, "skipped": progress.skipped,
                             "overflows": progress.overflows, "config": to_dict(self.cfg), **extra,
                             "categories": self.train_set.categories, "rng": [rng for rng, _ in gathered]},
                            checkpoint.path_for(self.out, iteration))

    def evaluate(self, iteration):
        """COCO evaluation of the model on the validation set (every rank its shard); the metrics, or None
        without a validation set."""
        if self.val_set is None:
            return None
        if dist.is_main() and self.coco_gt is None:
            self.coco_gt = load_coco(self.cfg.data.val.annotations)
        metrics = evaluate(self.model, self.val_loader, self.coco_gt, self.train_set.label_to_cat_id, self.device,
                           self.out, iteration, self.cfg.amp)
        log(f"iter {iteration}: bbox " + " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
        if dist.is_main():
            self.writer.write_eval(iteration, metrics)
        return metrics

    def on_skipped_step(self, iteration, lr, step, skipped):
        """Log a skipped step, or write the diagnostics and stop (solver.nonfinite)."""
        ranks = [r["rank"] for r in step.nonfinite if not r["loss_finite"]]
        what = (f"non-finite loss on rank {', '.join(map(str, ranks))}" if ranks
                else "non-finite gradient (after averaging over the ranks)")
        if self.cfg.solver.nonfinite == "skip":
            log(f"warning: iteration {iteration}: {what}; step skipped ({skipped} so far)")
            return
        path = self.out / f"nonfinite_{iteration:07d}.json"
        if dist.is_main():
            path.write_text(json.dumps({"iteration": iteration, "lr": lr, "world_size": dist.size(),
                                        "mean_losses": step.losses, "ranks": step.nonfinite}, indent=1))
        raise FloatingPointError(f"iteration {iteration}: {what}; stopping (solver.nonfinite=stop); "
                                 f"diagnostics in {path}")

    def close(self):
        if self.writer is not None:
            self.writer.close()


def train(cfg, resume=False, elastic=False):
    """Train per `cfg` on the ranks of this Horovod job; returns (model, final bbox metrics or None).

    resume: continue from the newest loadable checkpoint under output_dir (model, optimizer, iteration,
        hence the sampler position and the schedule, and every rank's RNG state).
    elastic: Horovod elastic mode (hvd_megdet.elastic): lost or added workers do not stop the run.
    """
    if elastic and not hvd_elastic.in_elastic_job():
        raise ConfigError("--elastic needs an elastic horovodrun: horovodrun --min-np N --max-np M "
                          "--host-discovery-script SCRIPT ...")
    # Horovod: initialize the library (and, in a job of several ranks, the watchdog that ends a stalled job).
    bn_groups = dist.init(stall_limit=cfg.stall_limit, elastic=elastic, bn_group_size=cfg.model.bn_group_size)
    # Horovod: pin this process to its local GPU (CPU: split the cores between local ranks).
    device = dist.device_for(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(dist.torch_threads_per_rank())
    random.seed(cfg.seed + dist.rank())
    torch.manual_seed(cfg.seed + dist.rank())
    out = Path(cfg.output_dir)

    train_set, val_set = train_dataset(cfg), val_dataset(cfg)
    if val_set is not None and list(val_set.label_to_cat_id) != list(train_set.label_to_cat_id):
        raise ConfigError(f"{cfg.data.val.annotations} and {cfg.data.train.annotations} list different categories")
    log(f"{cfg.data.train.annotations}: {len(train_set)} training images; dropped "
        + ", ".join(f"{n} {what}" for what, n in train_set.dropped.items()))
    num_classes = len(train_set.label_to_cat_id)  # K categories + background
    # CGBN groups of model.bn_group_size consecutive ranks (0 = all ranks); every rank registers all groups.
    model = detector_from_config(cfg.model, num_classes, process_set=bn_groups.process_set(log),
                                 channels_last=cfg.channels_last).to(device)

    # Horovod: scale the lr by the world size (MegDet's linear scaling rule), average gradients by allreduce.
    optimizer = dist.distributed_optimizer(model, cfg.solver)
    init_optimizer_state(optimizer)
    scaler = grad_scaler(device, cfg.amp)

    progress = Progress()
    if resume:
        # Elastic: every rank reads the checkpoint itself (no collective outside the elastic loop; the first
        # sync then broadcasts rank 0's state). Else rank 0 reads it and broadcasts what every rank needs.
        resumed = restore_latest(out, model, optimizer) if dist.is_main() or elastic else (None, None)
        if not elastic:
            # Horovod: rank 0's iteration and counters, every rank's saved RNG state, the loss scaler's state,
            # or rank 0's error, to every rank.
            resumed = dist.broadcast_object(resumed, name="resume_state")
        resumed, error = resumed
        if error:
            raise checkpoint.CheckpointError(error)
        rng_states, scaler_state = resumed.pop("rng"), resumed.pop("scaler")
        progress = Progress(**resumed)
        if rng_states is not None and dist.rank() < len(rng_states):
            checkpoint.set_rng_state(rng_states[dist.rank()])
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
    if not elastic:
        # Horovod: start every rank from rank 0's parameters, buffers and optimizer state.
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    if dist.is_main():  # only now: a run that fails on bad input writes nothing
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log_to_file(out / "log.txt")
    if dist.peers():
        log("ranks on hosts: " + ", ".join(f"{r} {host} pid {pid}" for r, (host, pid) in enumerate(dist.peers())))
    log(f"resolved config (also in {out / 'config.yaml'}):\n{dump(cfg).rstrip()}")
    log(f"{cfg.solver.max_iter} iterations; norm={cfg.model.norm} bn_group_size={cfg.model.bn_group_size}")

    trainer = Trainer(cfg, model, optimizer, scaler, train_set, val_set, device, elastic)
    try:
        if elastic:
            def on_reset():
                # Horovod: re-initialization dropped the BN process sets; register the groups of the new world.
                hvd_elastic.set_process_set(model, bn_groups.process_set(log))

            metrics = hvd_elastic.run(trainer.run, model, optimizer, scaler, on_reset, **asdict(progress))
        else:
            metrics = trainer.run(progress)
    finally:
        trainer.close()
    return model, metrics


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        try:
            train(load_config(args.config, args.overrides), resume=args.resume, elastic=args.elastic)
        except FloatingPointError as e:  # solver.nonfinite=stop; the class name is what log scanners look for
            sys.exit(f"error: FloatingPointError: {e}")
        except HorovodInternalError as e:  # a peer died (elastic mode handles this itself)
            sys.exit(f"error: {dist.lost_peer_message(e)}")


if __name__ == "__main__":
    main()
    dist.exit_skipping_native_teardown()
