"""Benchmark of Horovod's knobs for CGBN's small, latency-bound allreduces, settings side by side.

    python -m hvd_megdet.bench.knobs [--np 2] [--cycle-ms 0.1 0.5 1 5] [--cache 1024 0] [--rounds 2] [--json OUT]

Runs `horovodrun -np N -H localhost:N --gloo python -m hvd_megdet.bench.knobs --probe FILE` once per setting
(HOROVOD_CYCLE_TIME x HOROVOD_CACHE_CAPACITY) and round; the settings take turns in every round, so a change
in machine load hits them all alike. Each probe measures, slowest rank:
  allreduce  one CGBN allreduce, as a layer issues and waits for it: the 129 float64 moments of a 64-channel
             layer with two_phase=False on a (2, 64) input, from its start to the end of its wait (timed by
             sync_bn's collective hook), median of back-to-back forwards
  cgbn       forward + backward of a CGBN layer (two_phase=True, 3 allreduces) on a small feature map,
             median: what a latency-bound layer costs
  compute    10 forward + backward of the same layer as local nn.BatchNorm2d, no collective, median: the CPU
             that Horovod's background thread, cycling while idle, takes from the ranks' work
The table gives medians over rounds, and each column relative to Horovod's defaults (cycle 1 ms, cache 1024).
HOROVOD_FUSION_THRESHOLD is not swept: CGBN's allreduces are issued one at a time (each waits for the
previous), so there is never a second tensor to fuse with; it matters for the gradient allreduce only.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = (1.0, 1024)  # Horovod 0.28.1's HOROVOD_CYCLE_TIME (ms) and HOROVOD_CACHE_CAPACITY
SHAPE = (2, 64, 24, 32)  # per rank: a small FPN level, where round trips dominate
COLUMNS = ("allreduce_us", "cgbn_ms", "compute_ms")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--np", type=int, default=2, help="ranks on this host")
    parser.add_argument("--cycle-ms", type=float, nargs="+", default=[0.1, 0.5, 1.0, 5.0],
                        help="HOROVOD_CYCLE_TIME values (ms)")
    parser.add_argument("--cache", type=int, nargs="+", default=[1024, 0], help="HOROVOD_CACHE_CAPACITY values")
    parser.add_argument("--rounds", type=int, default=2, help="launches per setting")
    parser.add_argument("--iters", type=int, default=200, help="allreduces / layer steps per probe")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch before it is killed")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # rank side: write measurements here
    args = parser.parse_args(argv)
    if args.np < 2 or args.rounds < 1 or args.iters < 10:
        parser.error(f"--np must be >= 2, --rounds >= 1 and --iters >= 10, got {args.np}, {args.rounds}, "
                     f"{args.iters}")
    if min(args.cycle_ms) <= 0 or min(args.cache) < 0:
        parser.error("--cycle-ms must be > 0 and --cache >= 0")
    return args


def _median_seconds(fn, iters, barrier):
    """Median over `iters` calls of fn's wall time, every call started after `barrier()`."""
    times = []
    for _ in range(iters):
        barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_collective_seconds(fn, iters, barrier):
    """Median over `iters` calls of fn, every call started after `barrier()`, of the mean time of the CGBN
    collectives it runs, each from its start to the end of its wait (sync_bn's collective hook)."""
    from hvd_megdet import sync_bn

    seconds, means = [], []

    def timed(name, event):
        if event == "start":
            seconds.append(-time.perf_counter())
        elif event == "end":
            seconds[-1] += time.perf_counter()

    with sync_bn.register_collective_hook(timed):
        for _ in range(iters):
            barrier()
            seconds.clear()
            fn()
            means.append(statistics.fmean(seconds))
    return statistics.median(means)


def probe(iters):
    """Rank side: {column: value} of this rank (see the module docstring)."""
    import horovod.torch as hvd
    import torch
    from torch import nn

    from hvd_megdet import dist, sync_bn

    dist.init()
    torch.set_num_threads(dist.torch_threads_per_rank())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(hvd.rank())).requires_grad_()
    grad = torch.randn(SHAPE)
    cgbn, local = sync_bn.SyncBatchNorm(SHAPE[1]), nn.BatchNorm2d(SHAPE[1])
    # One allreduce per forward (1 + 2 x 64 values); its local work is on 128 values, next to nothing.
    statistics_only, stats_x = sync_bn.SyncBatchNorm(SHAPE[1], two_phase=False), torch.randn(2, SHAPE[1])

    def step(layer):
        x.grad = None
        layer(x).backward(grad)

    def allreduce_batch():  # 10 back-to-back allreduces; spreads the barrier's cost
        for _ in range(10):
            statistics_only(stats_x)

    for _ in range(10):  # warm-up: negotiation of every name, the response cache filled
        allreduce_batch(), step(cgbn), step(local)
    barrier = hvd.barrier
    result = {"allreduce_us": _median_collective_seconds(allreduce_batch, iters // 10, barrier) * 1e6,
              "cgbn_ms": _median_seconds(lambda: step(cgbn), iters, barrier) * 1e3,
              "compute_ms": _median_seconds(lambda: [step(local) for _ in range(10)], iters // 10, barrier) * 1e3}
    per_rank = dist.gather_object(result, name="knobs.result")
    return {k: max(r[k] for r in per_rank) for k in COLUMNS} if dist.is_main() else None


def launch(np, cycle_ms, cache, iters, timeout):
    """One horovodrun of the probe under HOROVOD_CYCLE_TIME=cycle_ms, HOROVOD_CACHE_CAPACITY=cache."""
    from hvd_megdet.process import run

    horovodrun = Path(sys.executable).with_name("horovodrun")
    env = dict(os.environ, HOROVOD_CYCLE_TIME=str(cycle_ms), HOROVOD_CACHE_CAPACITY=str(cache))
    with tempfile.TemporaryDirectory(prefix="hvd_knobs_") as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [str(horovodrun), "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, "-m",
               "hvd_megdet.bench.knobs", "--probe", str(out), "--iters", str(iters)]
        returncode, log = run(cmd, timeout, env=env)
        if returncode is None:
            raise RuntimeError(f"bench.knobs: probe with cycle {cycle_ms} ms, cache {cache} timed out after "
                               f"{timeout:.0f} s")
        if returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench.knobs: probe with cycle {cycle_ms} ms, cache {cache} failed "
                               f"(exit {returncode}):\n{log[-3000:]}")
        return json.loads(out.read_text())


def summarize(runs):
    """runs: {(cycle_ms, cache): [probe result, ...]} -> {setting: {column: median, column_vs_default: ratio}},
    the default being DEFAULT when it was measured, else the first setting."""
    medians = {setting: {k: statistics.median(r[k] for r in rs) for k in COLUMNS} for setting, rs in runs.items()}
    base = medians.get(DEFAULT, next(iter(medians.values())))
    for row in medians.values():
        row.update({f"{k}_vs_default": row[k] / base[k] for k in COLUMNS})
    return medians


def format_table(summary, meta):
    lines = [" ".join(f"{k}={v}" for k, v in meta.items()),
             "| HOROVOD_CYCLE_TIME (ms) | HOROVOD_CACHE_CAPACITY | allreduce (us) | x default | CGBN layer (ms) "
             "| x default | 10 local BN, Horovod idle (ms) | x default |",
             "|---|---|---|---|---|---|---|---|"]
    for (cycle, cache), row in summary.items():
        lines.append(f"| {cycle:g} | {cache} | {row['allreduce_us']:.0f} | {row['allreduce_us_vs_default']:.2f} | "
                     f"{row['cgbn_ms']:.2f} | {row['cgbn_ms_vs_default']:.2f} | {row['compute_ms']:.2f} | "
                     f"{row['compute_ms_vs_default']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        result = probe(args.iters)
        if result is not None:
            args.probe.write_text(json.dumps(result))
        return
    settings = list(itertools.product(args.cycle_ms, args.cache))
    runs = {setting: [] for setting in settings}
    for rnd in range(args.rounds):
        for setting in settings[rnd % len(settings):] + settings[:rnd % len(settings)]:
            runs[setting].append(launch(args.np, *setting, args.iters, args.timeout))
    summary = summarize(runs)
    meta = {"np": args.np, "rounds": args.rounds, "iters": args.iters, "shape": "x".join(map(str, SHAPE)),
            "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 1)}
    print(format_table(summary, meta), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "runs": {f"{c}ms/{k}": r for (c, k), r in runs.items()},
                                         "summary": {f"{c}ms/{k}": r for (c, k), r in summary.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
