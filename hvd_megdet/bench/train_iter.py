"""Benchmark of one training iteration of the demo model with norm cgbn (two_phase True and False) / bn /
frozen, side by side.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python -m hvd_megdet.bench.train_iter \
        [--iters 10] [--warmup 2] [--images 32] [--json OUT] [--trace DIR]

configs/demo_shapes.yaml on a generated shapes dataset (hvd_megdet.data.synthetic, in a temporary
directory), num_workers=0. The four models are built in the same processes, in the same order on every
rank (CGBN's collective names come from layer creation order), each with its own hvd.DistributedOptimizer;
iterations take turns round-robin (the starting model rotates every round) and all four train on the
same batch, so a change in machine load hits all alike. One batch is loaded per round: its time is the
"data" column of every model.

Per iteration, from timestamps taken around engine.train_step's calls (nothing is re-implemented):
  forward     model(images, targets)
  backward    from the end of forward to optimizer.synchronize(): loss sum, zero_grad, backward, with the
              gradient allreduces started (and mostly done) during backward
  allreduce   optimizer.synchronize(): waiting for the gradient allreduces still in flight
  checks      the losses / finiteness allreduce and the gradient check
  optimizer   optimizer.step()
"step" and "data" are medians over iterations of the slowest rank (what an iteration costs); the phases
are medians of the mean over ranks (one rank's allreduce wait overlaps the other's backward, so maxima
taken per phase would not add up).

A second table splits the cost of CGBN's allreduces (timed iterations of both cgbn models), from the times
at which each rank starts each of them and finishes waiting for it (sync_bn.register_collective_hook's
"start" and "end"; perf_counter is CLOCK_MONOTONIC, comparable between the ranks of one host):
  skew        last rank's start - first rank's start: time the first rank waits for the others to arrive
  after all   last rank's end - last rank's start: Horovod's own latency once every rank has asked

--trace DIR sets HOROVOD_TIMELINE before hvd.init (DIR/horovod_timeline.json, rank 0's view of every
collective) and writes one torch.profiler trace per model of one extra iteration (DIR/torch_<norm>_rank0.json);
both open in chrome://tracing or Perfetto.
Rank 0 prints the tables and writes JSON.
"""
import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# name -> (model.norm, CGBN two_phase)
VARIANTS = {"cgbn": ("cgbn", True), "cgbn_1phase": ("cgbn", False), "bn": ("bn", True), "frozen": ("frozen", True)}
NORMS = tuple(VARIANTS)
PHASES = ("forward", "backward", "allreduce", "checks", "optimizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per model first")
    parser.add_argument("--images", type=int, default=32, help="training images to generate")
    parser.add_argument("--config", default="configs/demo_shapes.yaml")
    parser.add_argument("--json", type=Path, help="write the results here (rank 0)")
    parser.add_argument("--trace", type=Path, help="directory for the Horovod and torch.profiler timelines")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. solver.allreduce_groups=1")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.images < 1:
        parser.error(f"--iters and --images must be >= 1 and --warmup >= 0, got {args.iters}, {args.images}, "
                     f"{args.warmup}")
    return args


class _Clock:
    """Timestamps of the phases of one engine.train_step, taken by hooks on the model and wrappers on the
    optimizer's synchronize and step (instance attributes, so train_step itself is unchanged)."""

    def __init__(self, model, optimizer):
        self.t = {}
        model.register_forward_pre_hook(lambda *_: self._mark("forward_start"))
        model.register_forward_hook(lambda *_: self._mark("forward_end"))
        for method in ("synchronize", "step"):
            original = getattr(optimizer, method)
            setattr(optimizer, method, self._timed(method, original))

    def _mark(self, key):
        self.t[key] = time.perf_counter()

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            self._mark(f"{name}_start")
            out = fn(*args, **kwargs)
            self._mark(f"{name}_end")
            return out
        return wrapper

    def phases(self, start, end):
        """{phase: seconds} of the step that ran from `start` to `end` (perf_counter)."""
        t = self.t
        return {"forward": t["forward_end"] - t["forward_start"],
                "backward": t["synchronize_start"] - t["forward_end"],
                "allreduce": t["synchronize_end"] - t["synchronize_start"],
                "checks": t["step_start"] - t["synchronize_end"],
                "optimizer": t["step_end"] - t["step_start"],
                "step": end - start}


class _CollectiveLog:
    """[name, start, end] of every CGBN allreduce started while `recording`, from sync_bn's collective hook:
    "start" just before the allreduce is started, "end" when its wait is over. A collective's name is unique
    while it is in flight (one per layer and direction), so it pairs the two."""

    def __init__(self):
        from hvd_megdet import sync_bn

        self.events, self.recording, self._pending = [], False, {}
        self.handle = sync_bn.register_collective_hook(self._told)

    def _told(self, name, event):
        if event == "start" and self.recording:
            self._pending[name] = len(self.events)
            self.events.append([name, time.perf_counter(), None])
        elif event == "end" and name in self._pending:
            self.events[self._pending.pop(name)][2] = time.perf_counter()


def summarize_collectives(per_rank, iters):
    """{kind (name suffix: sum, sqdev, moments, grad): {"per_iteration", "skew", "after_all"}} from every
    rank's event list (the same collectives in the same order on every rank); medians in seconds."""
    kinds = {}
    for events in zip(*per_rank):
        starts, ends = [e[1] for e in events], [e[2] for e in events]
        row = kinds.setdefault(events[0][0].rsplit(".", 1)[1], {"skew": [], "after_all": []})
        row["skew"].append(max(starts) - min(starts))
        row["after_all"].append(max(ends) - max(starts))
    return {kind: {"per_iteration": len(row["skew"]) / iters, "skew": statistics.median(row["skew"]),
                   "after_all": statistics.median(row["after_all"])} for kind, row in kinds.items()}


def summarize(per_rank):
    """Medians over iterations: of the slowest rank for "data" and "step", of the mean over ranks for phases.

    per_rank: one dict per rank, {"data": [s, ...], norm: [{"step": s, phase: s, ...}, ...]} (the same
    number of iterations on every rank). Returns {norm: {"data", "step", "total", phase...: seconds,
    "ratio_vs_bn": total / bn's total}}; "total" = data + step, "data" being the shared batch load.
    """
    data = statistics.median(max(r["data"][i] for r in per_rank) for i in range(len(per_rank[0]["data"])))
    result = {}
    for norm in NORMS:
        iters = range(len(per_rank[0][norm]))
        row = {"data": data}
        row["step"] = statistics.median(max(r[norm][i]["step"] for r in per_rank) for i in iters)
        for key in PHASES:
            row[key] = statistics.median(statistics.fmean(r[norm][i][key] for r in per_rank) for i in iters)
        row["total"] = data + row["step"]
        result[norm] = row
    for row in result.values():
        row["ratio_vs_bn"] = row["total"] / result["bn"]["total"]
    return result


def format_table(result, meta):
    """A markdown table of `summarize`'s result (milliseconds), preceded by one line of `meta`."""
    head = "| norm | iteration (ms) | x bn | data | step | " + " | ".join(PHASES) + " |"
    lines = [" ".join(f"{k}={v}" for k, v in meta.items()), head, "|" + "---|" * (5 + len(PHASES))]
    for norm, row in result.items():
        cells = [f"{row[k] * 1e3:.1f}" for k in ("data", "step") + PHASES]
        lines.append(f"| {norm} | {row['total'] * 1e3:.1f} | {row['ratio_vs_bn']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_collectives(collectives):
    """A markdown table of `summarize_collectives`'s result (milliseconds)."""
    lines = ["| CGBN allreduce | per iteration (both cgbn models) | skew (ms) | after all arrived (ms) |",
             "|---|---|---|---|"]
    for kind, row in collectives.items():
        lines.append(f"| {kind} | {row['per_iteration']:.0f} | {row['skew'] * 1e3:.2f} | "
                     f"{row['after_all'] * 1e3:.2f} |")
    return "\n".join(lines)


def run(args):
    import horovod.torch as hvd
    import torch

    from hvd_megdet import dist
    from hvd_megdet.config import load_config
    from hvd_megdet.data import build_train_loader
    from hvd_megdet.data.synthetic import make_dataset
    from hvd_megdet.engine import next_batch, to_device, train_step
    from hvd_megdet.data import train_dataset
    from hvd_megdet.model import detector_from_config
    from hvd_megdet.logs import log

    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        # Horovod: the timeline must be named before hvd.init; rank 0 writes it.
        os.environ["HOROVOD_TIMELINE"] = str(args.trace.resolve() / "horovod_timeline.json")
    bn_groups = dist.init()
    torch.set_num_threads(dist.torch_threads_per_rank())
    with tempfile.TemporaryDirectory() as tmp:
        # Every rank generates the same files (deterministic), so no rank waits on another's file system.
        splits = make_dataset(os.path.join(tmp, f"rank{dist.rank()}"), num_train=args.images, num_val=1)
        images_dir, ann = splits["train"]
        cfg = load_config(args.config, [f"data.train.images={images_dir}", f"data.train.annotations={ann}",
                                        "data.val.annotations=", "data.num_workers=0", *args.overrides])
        train_set = train_dataset(cfg)
        num_classes = len(train_set.label_to_cat_id)
        models, optimizers, clocks = {}, {}, {}
        process_set = bn_groups.process_set(log)
        for norm, (kind, two_phase) in VARIANTS.items():  # the same order on every rank: CGBN names its
            torch.manual_seed(cfg.seed)                      # collectives by layer creation order
            model = detector_from_config(dataclasses.replace(cfg.model, two_phase=two_phase), num_classes,
                                      norm=kind, process_set=process_set).train()
            # Horovod: average gradients as the trainer does; names prefixed so the models' allreduces never
            # share a name.
            optimizer = dist.distributed_optimizer(model, cfg.solver, name_prefix=f"{norm}.")
            # Horovod: every rank starts from rank 0's weights.
            hvd.broadcast_parameters({f"{norm}.{k}": v for k, v in model.state_dict().items()}, root_rank=0)
            models[norm], optimizers[norm], clocks[norm] = model, optimizer, _Clock(model, optimizer)
        loader = iter(build_train_loader(train_set, cfg.solver.ims_per_gpu, dist.rank(), dist.size(), cfg.seed, 0))

        times = {"data": [], **{norm: [] for norm in NORMS}}
        collectives = _CollectiveLog()
        for rnd in range(args.warmup + args.iters):
            collectives.recording = rnd >= args.warmup
            start = time.perf_counter()
            images, targets = to_device(*next_batch(loader), torch.device("cpu"))
            data_time = time.perf_counter() - start
            order = NORMS[rnd % len(NORMS):] + NORMS[:rnd % len(NORMS)]
            for norm in order:
                start = time.perf_counter()
                train_step(models[norm], optimizers[norm], [(images, targets)])
                phases = clocks[norm].phases(start, time.perf_counter())
                if rnd >= args.warmup:
                    times[norm].append(phases)
            if rnd >= args.warmup:
                times["data"].append(data_time)

        collectives.recording = False
        collectives.handle.remove()
        if args.trace:
            for norm in NORMS:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    train_step(models[norm], optimizers[norm], [(images, targets)])
                if dist.is_main():
                    prof.export_chrome_trace(str(args.trace / f"torch_{norm}_rank0.json"))
    # Horovod: every rank's timings to rank 0 (medians of the slowest rank).
    per_rank = dist.gather_object(times, name="bench_times")
    events = dist.gather_object(collectives.events, name="bench_collectives")
    if not dist.is_main():
        return None
    load = os.getloadavg()
    meta = {"np": dist.size(), "ims_per_gpu": cfg.solver.ims_per_gpu, "iters": args.iters,
            "threads_per_rank": torch.get_num_threads(), "loadavg_1m": round(load[0], 1)}
    return {"meta": meta, "result": summarize(per_rank), "collectives": summarize_collectives(events, args.iters)}


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    if out is not None:
        print(format_table(out["result"], out["meta"]), "", format_collectives(out["collectives"]), sep="\n",
              flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
