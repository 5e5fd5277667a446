"""Benchmark of Cross-GPU BatchNorm: per-layer forward+backward latency and collectives per iteration.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python -m hvd_megdet.bench.sync_bn \
        [--shapes 2x256x50x76 ...] [--full] [--iters 5] [--json OUT]

Shapes are per rank, N x C x H x W. The issue's detector feature maps (2x256x200x304, 2x64x400x608,
2x1024x50x76) take seconds per layer on a 2-core CPU, so the default divides H and W by 4 (16x fewer
elements); --full runs them as they are. In the same run, on the same shapes, it times:
  - hvd_megdet SyncBatchNorm, two_phase=True and False (Horovod allreduce); two_phase=True again with
    Horovod's spinning wait instead of CGBN's sleep-poll (wait="horovod"), and with Horovod's allreduce
    standing in as the identity ("arithmetic only": what CGBN's local work costs, against local BatchNorm);
  - local nn.BatchNorm2d (no synchronization: the floor);
  - naive sync BN, detectron2's approach: one torch.distributed all_reduce of [mean, mean of squares] forward
    and one backward (equal batch sizes only, biased running variance), on Gloo (CPU) or NCCL (GPU);
  - torch.nn.SyncBatchNorm and hvd.SyncBatchNorm, which both refuse CPU tensors: on CPU their refusal is
    printed instead of a time.
Latency: median over --iters timed iterations (after --warmup), each started together on all ranks, of the
slowest rank; the layers of a shape take turns every iteration, so a change in machine load hits all alike.
Collectives: counted by wrapping Horovod's and torch.distributed's collective functions during one extra
iteration. Rank 0 prints the table and writes JSON.
"""
import argparse
import contextlib
import json
import os
import socket
import statistics
import time
from pathlib import Path
from unittest import mock

import horovod
import horovod.torch as hvd
import horovod.torch.sync_batch_norm as hvd_sync_batch_norm
import torch
import torch.distributed as dist
import torch.nn as nn

from hvd_megdet.sync_bn import SyncBatchNorm

ISSUE_SHAPES = [(2, 256, 200, 304), (2, 64, 400, 608), (2, 1024, 50, 76)]
SCALE = 4  # default: H and W of ISSUE_SHAPES divided by this
GPU_ONLY = ("torch.nn.SyncBatchNorm", "hvd.SyncBatchNorm")


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxCxHxW with positive integers")
    return shape


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, help="per-rank NxCxHxW (default: issue shapes / 4)")
    parser.add_argument("--full", action="store_true", help="the issue's shapes, not scaled down")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per layer and shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--json", type=Path, help="write the results here (rank 0)")
    args = parser.parse_args(argv)
    if args.shapes and args.full:
        parser.error("--shapes and --full are exclusive")
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if not args.shapes:
        args.shapes = ISSUE_SHAPES if args.full else [(n, c, h // SCALE, w // SCALE) for n, c, h, w in ISSUE_SHAPES]
    return args


class _AllReduceSum(torch.autograd.Function):
    """torch.distributed all_reduce(SUM) with the same in the backward (detectron2's differentiable_all_reduce)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """The CPU peer: detectron2's NaiveSyncBatchNorm (training forward only). Averages per-rank [mean, mean of
    squares] over ranks, so it is exact only for equal batch sizes, and var = E[x^2] - E[x]^2 in the input
    precision; running_var gets the biased variance."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        channels, world = x.shape[1], dist.get_world_size()
        mean = x.mean(dim=[0, 2, 3])
        meansqr = (x * x).mean(dim=[0, 2, 3])
        mean, meansqr = torch.split(_AllReduceSum.apply(torch.cat([mean, meansqr])) / world, channels)
        var = meansqr - mean * mean
        with torch.no_grad():
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (var - self.running_var)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _layers(device):
    """name -> factory(C) of a BN layer in training mode on `device`."""
    layers = {
        "CGBN two_phase=True": lambda c: SyncBatchNorm(c, two_phase=True),
        "CGBN two_phase=False": lambda c: SyncBatchNorm(c, two_phase=False),
        "CGBN two_phase=True, spin wait": lambda c: SyncBatchNorm(c, two_phase=True, wait="horovod"),
        "CGBN two_phase=True, arithmetic only": lambda c: _without_collectives(SyncBatchNorm(c, two_phase=True)),
        "local nn.BatchNorm2d": nn.BatchNorm2d,
        "naive sync BN (torch.distributed)": NaiveSyncBatchNorm,
        "torch.nn.SyncBatchNorm": nn.SyncBatchNorm,
        "hvd.SyncBatchNorm": hvd.SyncBatchNorm,
    }
    return {name: (lambda c, make=make: make(c).to(device).train()) for name, make in layers.items()}


@contextlib.contextmanager
def count_collectives():
    """Yield a function returning the number of collective calls made so far inside the block: Horovod's
    public ops, those hvd.SyncBatchNorm imported, and torch.distributed's."""
    targets = [(hvd, name) for name in ("allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
                                        "allgather", "allgather_async", "grouped_allreduce", "broadcast")]
    targets += [(hvd_sync_batch_norm, name) for name in ("allreduce_async", "allgather_async")]
    targets += [(dist, name) for name in ("all_reduce", "all_gather", "all_gather_single",
                                          "all_gather_into_tensor", "reduce_scatter_tensor")]
    with contextlib.ExitStack() as stack:
        mocks = [stack.enter_context(mock.patch.object(module, name, wraps=getattr(module, name)))
                 for module, name in targets if hasattr(module, name)]
        yield lambda: sum(m.call_count for m in mocks)


def _without_collectives(layer):
    """Mark a CGBN layer to run as if alone in its process set: see `_identity_allreduces`."""
    layer.no_collectives = True
    return layer


def _identity_allreduces():
    """Horovod's asynchronous allreduce, as SyncBatchNorm calls it, standing in as the identity: the tensor is
    its own handle, always ready, and its own result. A CGBN layer then does all of its local work (the same
    torch ops, its collective hook told as usual) and no collective: statistics of this rank's batch only,
    for timing, not for results. The stand-in replaces Horovod's public functions (allreduce_async_, poll,
    synchronize), the boundary sync_bn talks through, so sync_bn's own code runs unchanged. Not a layer with
    process_set=LOCAL instead: a layer of one rank normalizes with torch's own BatchNorm kernel, which is the
    "local nn.BatchNorm2d" row, not CGBN's arithmetic."""
    return mock.patch.multiple(hvd, allreduce_async_=lambda tensor, **kwargs: tensor, poll=lambda handle: True,
                               synchronize=lambda handle: handle)


def _step(layer, x, grad, device):
    x.grad = None
    layer.zero_grad()
    with _identity_allreduces() if getattr(layer, "no_collectives", False) else contextlib.nullcontext():
        layer(x).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(layers, shape, iters, warmup, device):
    """Time `layers` ({name: BN layer}) on one shape, round-robin so that load changes hit all alike.

    Returns {name: (median seconds of forward+backward of the slowest rank, collectives per iteration) or the
    refusal message of a GPU-only peer}."""
    gen = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device)
    results, counts, times = {}, {}, {}
    for name, layer in layers.items():
        try:
            with count_collectives() as collectives:
                _step(layer, x, grad, device)
                counts[name], times[name] = collectives(), []
        except ValueError as e:  # the GPU-only peers refuse CPU tensors (on every rank, before any collective)
            if name not in GPU_ONLY:
                raise
            results[name] = str(e).splitlines()[0]
    for i in range(warmup + iters):
        for name in times:
            hvd.barrier()  # Horovod: start each step together, so a rank's time includes waiting for others
            start = time.perf_counter()
            _step(layers[name], x, grad, device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = hvd.allgather_object({name: statistics.median(t) for name, t in times.items()}, name="bench.medians")
    results.update({name: (max(m[name] for m in medians), counts[name]) for name in times})
    return {name: results[name] for name in layers}


def _init_torch_distributed(device):
    """torch.distributed in the Horovod processes: same ranks, a free port chosen by rank 0."""
    if hvd.rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = None
    # Horovod: share rank 0's port (free when chosen, not reserved). An explicit name: the default is the
    # object's type, int on rank 0 but NoneType elsewhere, and mismatched names never complete.
    port = hvd.broadcast_object(port, root_rank=0, name="bench.master_port")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=hvd.rank(), world_size=hvd.size())


def run(args):
    """Measure every layer on every shape; return the JSON-ready results (also on ranks other than 0)."""
    device = torch.device("cuda", hvd.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks share the host's cores: more threads than cores per rank would spin against each other
        torch.set_num_threads(max(1, os.cpu_count() // hvd.local_size()))
    _init_torch_distributed(device)
    rows = []
    for shape in args.shapes:
        layers = {name: make_layer(shape[1]) for name, make_layer in _layers(device).items()}
        for name, result in measure(layers, shape, args.iters, args.warmup, device).items():
            row = {"layer": name, "shape": "x".join(map(str, shape))}
            if isinstance(result, str):
                row["refused"] = result
            else:
                row.update(ms=result[0] * 1e3, collectives=result[1])
            rows.append(row)
    for row in rows:
        base = {r["layer"]: r.get("ms") for r in rows if r["shape"] == row["shape"]}
        if "ms" in row:
            row["vs_local"] = row["ms"] / base["local nn.BatchNorm2d"]
            row["vs_naive"] = row["ms"] / base["naive sync BN (torch.distributed)"]
    return {
        "world_size": hvd.size(), "device": str(device), "torch": torch.__version__,
        "horovod": horovod.__version__, "threads_per_rank": torch.get_num_threads(),
        "HOROVOD_CYCLE_TIME": os.environ.get("HOROVOD_CYCLE_TIME", "unset (1 ms)"),
        "HOROVOD_CACHE_CAPACITY": os.environ.get("HOROVOD_CACHE_CAPACITY", "unset (1024)"),
        "iters": args.iters, "warmup": args.warmup, "rows": rows,
    }


def format_table(result):
    lines = [f"Sync BN per layer, forward+backward, np={result['world_size']} on {result['device']}, "
             f"median of {result['iters']} iterations (slowest rank); HOROVOD_CYCLE_TIME="
             f"{result['HOROVOD_CYCLE_TIME']}",
             f"{'shape (per rank)':<18} {'layer':<36} {'ms':>9} {'x local':>8} {'x naive':>8} {'collectives':>11}"]
    for row in result["rows"]:
        if "ms" in row:
            lines.append(f"{row['shape']:<18} {row['layer']:<36} {row['ms']:9.2f} {row['vs_local']:8.2f} "
                         f"{row['vs_naive']:8.2f} {row['collectives']:11d}")
        else:
            lines.append(f"{row['shape']:<18} {row['layer']:<36} refuses: {row['refused']}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    hvd.init()
    result = run(args)
    if hvd.rank() == 0:
        print(format_table(result), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
