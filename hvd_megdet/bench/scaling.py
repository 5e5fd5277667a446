"""Scaling model of MegDet training (R50-FPN, 800x1333, 2 images per GPU) from 8 to 128 GPUs.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python -m hvd_megdet.bench.scaling measure \
        [--iters 20] [--json OUT]        # Horovod allreduce latency and bandwidth here
    python -m hvd_megdet.bench.scaling model [--measured OUT] [--json TABLE]   # the table of docs/scaling.md

The model (`iteration_time`) is a pure function:
    t(n) = compute + exposed gradient allreduce + CGBN latency
  - gradient allreduce: ring, 2(n-1)/n x bytes / bus bandwidth + 2(n-1) x per-hop latency per fused
    buffer (HOROVOD_FUSION_THRESHOLD), overlapped with the backward pass: only what exceeds the backward
    time is exposed;
  - CGBN: every synchronization point (a BN layer, or BN layers normalized together) blocks
    on `allreduces_per_layer` small allreduces per iteration (3 two_phase, 2 not), each costing Horovod's
    per-collective overhead plus a tree's 2 log2(n) hops.
Scaling efficiency at n GPUs = t(8) / t(n) (per-GPU throughput against the paper's 8-GPU baseline).
The scenarios' figures are published hardware numbers or stated assumptions (SCENARIOS); the Horovod
per-collective overhead can come from `measure` (its smallest-tensor latency).
"""
import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

GPUS = (8, 16, 32, 64, 128)
MB = 1024 * 1024

# R50-FPN (hvd_megdet.model.build_model(81, "resnet50", norm="cgbn")): parameters and CGBN synchronization
# points per iteration, counted by `count_model`: ResNet-50's 53 BN layers in 49 (each downsampling block's
# bn1 with its shortcut's norm), the FPN's 8 in 2 (lateral and output levels), the conv box head's 4.
R50_FPN = {"params": 43.07e6, "cgbn_syncs": 55}

# Per-GPU compute of one iteration (2 images, 800x1333, forward + backward + step) and the network. Sources:
# compute: detectron2 MODEL_ZOO.md, faster_rcnn_R_50_FPN_1x: 0.210 s/iter on 8 V100 (allreduce included,
#   so an upper bound); A100 with AMP: assumed 2.5x faster. Backward: assumed 2/3 of compute.
# bandwidth: NVLink 2 (V100, DGX-1) 300 GB/s per GPU, NVLink 3 (A100) 600 GB/s (NVIDIA data sheets); NCCL
#   reaches about half as bus bandwidth, used here: 130 and 230 GB/s (nccl-tests, 8 GPUs). Between nodes:
#   InfiniBand EDR 100 Gb/s = 12.5 GB/s per port (MegDet-era nodes: one port assumed), DGX A100 8x HDR
#   200 Gb/s = 200 GB/s per node (NVIDIA DGX A100 data sheet).
# latency: per hop 5 us in a node, 10 us between nodes (assumed, order of nccl-tests small-message times);
#   Horovod per collective (negotiation, waiting for the background thread's next cycle): assumed 0.5 ms
#   (V100 row) and 0.1 ms (A100 row, a short HOROVOD_CYCLE_TIME with the response cache); `model --measured`
#   adds a row set with the latency measured here instead.
SCENARIOS = {
    "V100 + IB EDR x1": {"compute_s": 0.21, "bw_intra": 130e9, "bw_inter": 12.5e9,
                         "hop_intra": 5e-6, "hop_inter": 10e-6, "overhead_s": 0.5e-3},
    "A100 AMP + IB HDR x8": {"compute_s": 0.084, "bw_intra": 230e9, "bw_inter": 200e9,
                             "hop_intra": 5e-6, "hop_inter": 10e-6, "overhead_s": 0.1e-3},
}
GPUS_PER_NODE = 8
FUSION_BYTES = 128 * MB  # Horovod's default HOROVOD_FUSION_THRESHOLD
BACKWARD_FRACTION = 2 / 3


def ring_allreduce_s(n, nbytes, bandwidth, hop_s):
    """Ring allreduce of `nbytes` over n ranks: 2(n-1) steps of nbytes/n each; 0 for n = 1."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) * hop_s + 2 * (n - 1) / n * nbytes / bandwidth


def small_allreduce_s(n, overhead_s, hop_s):
    """A latency-bound allreduce (a few KB: CGBN statistics) over n ranks: overhead + tree, 2 log2(n) hops."""
    return 0.0 if n == 1 else overhead_s + 2 * math.ceil(math.log2(n)) * hop_s


def iteration_time(n, compute_s, grad_bytes, cgbn_syncs, allreduces_per_layer, bw_intra, bw_inter, hop_intra,
                   hop_inter, overhead_s, bn_group=0, gpus_per_node=GPUS_PER_NODE, fusion_bytes=FUSION_BYTES,
                   backward_fraction=BACKWARD_FRACTION):
    """Seconds per iteration on n GPUs and its parts: {"compute", "grad_allreduce", "grad_exposed", "cgbn",
    "total"}. Within a node the ring runs at bw_intra with hop_intra per hop; a ring across nodes at
    bw_inter (per node) with hop_inter. Gradients travel in ceil(grad_bytes / fusion_bytes) fused buffers;
    what exceeds backward_fraction x compute is exposed. CGBN's allreduces are all on the critical path,
    over BN groups of `bn_group` GPUs (0 = all n; a group within a node uses the intra-node hop)."""
    multi_node = n > gpus_per_node
    bw, hop = (bw_inter, hop_inter) if multi_node else (bw_intra, hop_intra)
    buffers = math.ceil(grad_bytes / fusion_bytes)
    grad = sum(ring_allreduce_s(n, min(fusion_bytes, grad_bytes - i * fusion_bytes), bw, hop) for i in range(buffers))
    exposed = max(0.0, grad - backward_fraction * compute_s)
    g = min(n, bn_group or n)
    cgbn = cgbn_syncs * allreduces_per_layer * small_allreduce_s(
        g, overhead_s, hop_inter if g > gpus_per_node else hop_intra)
    return {"compute": compute_s, "grad_allreduce": grad, "grad_exposed": exposed, "cgbn": cgbn,
            "total": compute_s + exposed + cgbn}


def scaling_table(scenario, model=R50_FPN, gpus=GPUS, allreduces_per_layer=3, bn_group=0):
    """Rows {"gpus", parts of iteration_time in s, "images_per_s", "efficiency" = t(gpus[0]) / t(n),
    "vs_compute" = compute / t(n) (against a step with no communication at all)}."""
    rows = []
    for n in gpus:
        t = iteration_time(n, grad_bytes=4 * model["params"], cgbn_syncs=model["cgbn_syncs"],
                           allreduces_per_layer=allreduces_per_layer, bn_group=bn_group, **scenario)
        rows.append({"gpus": n, **t, "images_per_s": 2 * n / t["total"], "vs_compute": t["compute"] / t["total"]})
    for row in rows:
        row["efficiency"] = rows[0]["total"] / row["total"]
    return rows


def paper_efficiency(hours_small=33.0, gpus_small=8, hours_large=4.0, gpus_large=128):
    """Scaling efficiency implied by MegDet's training times (same epochs): speed-up / GPU ratio."""
    return (hours_small / hours_large) / (gpus_large / gpus_small)


def count_model(num_classes=81):
    """{"params", "cgbn_syncs"} of hvd_megdet's R50-FPN with norm="cgbn": CGBN's synchronization points are
    counted as calls of SyncBatchNorm.forward_sharing_collectives (every CGBN layer goes through it; fused layers
    share one call) in one forward pass of a small image, in a world of 1 (no collective is issued)."""
    from unittest import mock

    import torch

    from hvd_megdet.model import build_model
    from hvd_megdet.sync_bn import SyncBatchNorm

    model = build_model(num_classes, backbone="resnet50", norm="cgbn").eval()
    sharing = SyncBatchNorm.forward_sharing_collectives
    with mock.patch.object(SyncBatchNorm, "forward_sharing_collectives", wraps=sharing) as calls, torch.no_grad():
        model([torch.rand(3, 64, 64)])
    return {"params": sum(p.numel() for p in model.parameters()), "cgbn_syncs": calls.call_count}


def measure(iters, sizes=(1, 512, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024)):
    """Horovod allreduce (float32, Sum) of each size in elements: median seconds over `iters`, slowest rank
    via the median of rank 0 (the collective couples the ranks). Returns {"sizes", "seconds",
    "latency_s" (smallest size), "bus_bandwidth" (bytes/s of the largest, ring bus bandwidth)}."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    seconds = []
    for size in sizes:
        x = torch.ones(size)
        samples = []
        for i in range(iters + 2):
            start = time.perf_counter()
            hvd.allreduce(x, op=hvd.Sum, name=f"bench_{size}")
            if i >= 2:
                samples.append(time.perf_counter() - start)
        seconds.append(statistics.median(samples))
    n = hvd.size()
    busbw = 2 * (n - 1) / n * 4 * sizes[-1] / seconds[-1]
    return {"np": n, "sizes": list(sizes), "seconds": seconds, "latency_s": seconds[0], "bus_bandwidth": busbw,
            "loadavg_1m": round(os.getloadavg()[0], 1)} if hvd.rank() == 0 else None


def format_rows(title, rows):
    lines = [title,
             "| GPUs | compute (ms) | grad allreduce (ms) | exposed (ms) | CGBN (ms) | iteration (ms) | images/s "
             "| efficiency vs 8 GPUs | vs compute only |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['compute'] * 1e3:.0f} | {r['grad_allreduce'] * 1e3:.1f} | "
                     f"{r['grad_exposed'] * 1e3:.1f} | {r['cgbn'] * 1e3:.1f} | {r['total'] * 1e3:.0f} | "
                     f"{r['images_per_s']:.0f} | {r['efficiency']:.0%} | {r['vs_compute']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("measure", "model"))
    parser.add_argument("--iters", type=int, default=20, help="measure: timed allreduces per size")
    parser.add_argument("--measured", type=Path, help="model: JSON of `measure`, adds a row set with its latency")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.mode == "measure":
        result = measure(args.iters)
        if result is None:
            return
        print("| elements | bytes | median ms |\n|---|---|---|")
        for size, s in zip(result["sizes"], result["seconds"]):
            print(f"| {size} | {4 * size} | {s * 1e3:.2f} |")
        print(f"latency {result['latency_s'] * 1e3:.2f} ms, bus bandwidth {result['bus_bandwidth'] / 1e9:.2f} GB/s, "
              f"np={result['np']}, load {result['loadavg_1m']}")
    else:
        scenarios = dict(SCENARIOS)
        if args.measured:
            measured = json.loads(args.measured.read_text())
            name = f"V100 + IB EDR x1, Horovod overhead {measured['latency_s'] * 1e3:.2f} ms (measured here)"
            scenarios[name] = dict(SCENARIOS["V100 + IB EDR x1"], overhead_s=measured["latency_s"])
        result = {"paper_efficiency": paper_efficiency(), "model": R50_FPN, "tables": {}}
        print(f"MegDet paper: 33 h on 8 GPUs -> 4 h on 128 GPUs = {result['paper_efficiency']:.0%} efficiency")
        for name, scenario in scenarios.items():
            for k, group in ((3, 0), (2, 0), (2, GPUS_PER_NODE)):
                title = f"{name}, CGBN {k} allreduces/layer, BN group {group or 'all GPUs'}"
                result["tables"][title] = scaling_table(scenario, allreduces_per_layer=k, bn_group=group)
                print("\n" + format_rows(title, result["tables"][title]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
