"""The GPU check: the CUDA tests, CGBN against nn.BatchNorm2d on CUDA, and R50-FPN training images/s against a
plain torchvision loop, in one run and one JSON.

    python -m hvd_megdet.bench.gpu --out gpu_check.json [--setup FILE] [--dry-run]

`scripts/gpu_check.sh` sets up a fresh GPU machine (Horovod built there with NCCL) and runs this; README.md,
"GPU check", says how to run it, also on a machine without network. Steps, in this order (the most telling first), each recorded as
{"status": "ok" | "failed" | "skipped", ...} with its seconds, so that one failure does not hide the others;
the JSON is rewritten after each, so a run stopped at its time limit keeps what it finished:

  environment   torch, CUDA, the GPU, Horovod's build flags (and --setup's key=value lines: set-up times)
  bn np1        CGBN against nn.BatchNorm2d, both against a float64 reference: float32, bfloat16, float16;
                torch's fused kernels off and on (SyncBatchNorm's cuda_kernels); two_phase True and False;
                contiguous and channels_last; through CGBN's collective path over the one rank of this process
                (a world of 1 otherwise normalizes locally)
  throughput    R50-FPN at 800x1333, 2 synthetic images per step: hvd_megdet's detector (CGBN, bf16 autocast,
                channels_last) against torchvision's fasterrcnn_resnet50_fpn in float32, the variants (VARIANTS)
                taking turns every round; images/s and the ratio to torchvision's against the 1.3x target
  cuda_tests    tests/test_sync_bn.py's two CUDA tests, under pytest
  bn np2        the BN comparison on two ranks under horovodrun (on one GPU NCCL refuses two ranks: the
                failure is recorded, not fatal)

Without a CUDA device every CUDA step is recorded as skipped with the reason. --dry-run runs what it can on the
CPU at tiny sizes (BN in float32 and bfloat16, np=2 on Gloo, one step of each detector at 128x192), so that
every code path runs in the test suite (tests/test_gpu_check.py).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
CUDA_TESTS = ["tests/test_sync_bn.py::test_cuda_world_of_one_matches_batchnorm_in_fp16_autocast",
              "tests/test_sync_bn.py::test_cuda_tensors_on_two_ranks"]
TARGET_RATIO = 1.3  # hvd_megdet's images/s over the plain torchvision loop's (docs/performance.md, Targets)
# CGBN's error against the float64 reference may be this many times nn.BatchNorm2d's own at that dtype;
# errors below FLOOR count as FLOOR (float32 statistics round at ~1e-7, so both may be ~0 there).
FACTOR, FLOOR = 4.0, 1e-6
QUANTITIES = ("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NUM_CLASSES = 91  # torchvision's default (COCO's category ids), for both detectors
# name -> (hvd_megdet's detector?, CGBN through its collectives?, torch's fused CGBN kernels?, box head: None
# for build_model's default with CGBN, 4 conv + 1 fc; "mlp" for torchvision's 2 fc, the same work as its loop)
VARIANTS = {"torchvision": (False, False, False, None),
            "hvd_megdet": (True, False, False, None),
            "hvd_megdet_cgbn_collectives": (True, True, False, None),
            "hvd_megdet_cgbn_fused": (True, True, True, None),
            "hvd_megdet_cgbn_collectives_mlp_head": (True, True, False, "mlp")}
TARGET_VARIANT = "hvd_megdet_cgbn_collectives"  # CGBN doing its work: the row judged against the target


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--setup", type=Path, help="key=value lines from scripts/gpu_check.sh, kept in the JSON")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: runs the code paths, no figures")
    parser.add_argument("--rounds", type=int, help="throughput: rounds of all variants in turn (default 5)")
    parser.add_argument("--iters", type=int, help="throughput: timed steps per variant and round (default 10)")
    parser.add_argument("--warmup", type=int, help="throughput: untimed steps per variant first (default 5)")
    parser.add_argument("--bn-rank", type=Path, help=argparse.SUPPRESS)  # a rank of the np=2 BN comparison
    args = parser.parse_args(argv)
    defaults = (1, 1, 0) if args.dry_run else (5, 10, 5)
    for name, default in zip(("rounds", "iters", "warmup"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
        parser.error(f"--rounds and --iters must be >= 1 and --warmup >= 0, got {args.rounds}, {args.iters}, "
                     f"{args.warmup}")
    if args.out is None and args.bn_rank is None:
        parser.error("--out is required")
    return args


def _step(name, fn, *args, **kwargs):
    """Run one step of the check: fn(*args, **kwargs) -> its record (a dict with "status"), timed; an exception
    becomes a "failed" record with the traceback's tail, so the next steps still run."""
    start = time.perf_counter()
    try:
        record = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a step's failure is a result of the check, not the end of it
        record = {"status": "failed", "error": traceback.format_exc()[-3000:]}
    record["seconds"] = round(time.perf_counter() - start, 1)
    print(f"gpu check: {name}: {record['status']} ({record['seconds']} s)", flush=True)
    return record


def _skipped(reason):
    return {"status": "skipped", "reason": reason}


def _no_cuda_reason():
    return None if torch.cuda.is_available() else f"no CUDA device (torch {torch.__version__}, CUDA build " \
        f"{torch.version.cuda or 'none'})"


def read_setup(path):
    """{key: value} of scripts/gpu_check.sh's key=value lines; values that read as numbers become numbers."""
    setup = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        try:
            setup[key.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            setup[key.strip()] = value.strip()
    return setup


def environment():
    """What the figures were measured with: Python, torch, torchvision, CUDA, the GPU, Horovod's build."""
    import torchvision

    env = {"status": "ok", "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_count": os.cpu_count(), "machine": platform.machine(),
           # torch's defaults, left alone: the float32 loop's convolutions may use TF32 (cudnn.allow_tf32)
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count(),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    try:
        import horovod
        import horovod.torch as hvd
    except ImportError as e:
        env["horovod"] = f"not importable: {e}"
        return env
    env["horovod"] = horovod.__version__
    env["horovod_built"] = {name: bool(getattr(hvd, f"{name}_built")()) for name in ("nccl", "cuda", "gloo", "mpi")}
    return env


def cuda_tests(timeout=300):
    """The suite's CUDA tests under pytest: {"tests": {test id: {"outcome", "message"}}}; "ok" when all pass."""
    reason = _no_cuda_reason()
    if reason:
        return _skipped(reason)
    from hvd_megdet.process import run

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        returncode, output = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  f"--junitxml={junit}", *CUDA_TESTS], timeout, cwd=REPO, env=_env_with_repo())
        tests = _junit_outcomes(junit) if junit.exists() else {}
    passed = returncode == 0 and len(tests) == len(CUDA_TESTS) and \
        all(t["outcome"] == "passed" for t in tests.values())
    record = {"status": "ok" if passed else "failed", "returncode": returncode, "tests": tests}
    if not passed:
        record["output_tail"] = (output or "")[-3000:]
        record["note"] = _known_cause(output or "")
    return record


def _junit_outcomes(path):
    """{test name: {"outcome": passed | failed | error | skipped, "message"}} from a pytest JUnit XML file."""
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = {"failure": "failed"}.get(child.tag, child.tag), (child.get("message") or "")[:500]
        outcomes[case.get("name")] = {"outcome": outcome, "message": message}
    return outcomes


def _known_cause(output):
    """A one-line explanation of a failure whose cause is known, else None."""
    if "Duplicate GPU detected" in output:
        return "NCCL (>= 2.5) refuses two ranks on one GPU: a two-rank CUDA run needs two GPUs"
    return None


def _env_with_repo():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ------------------------------------------------------------------------------------------------------------
# CGBN against nn.BatchNorm2d


def _force_collectives(module):
    """Make every SyncBatchNorm in `module` take CGBN's collective path (statistics through Horovod allreduces,
    _SyncBatchNormFunction) even when its process set has one rank, where it would normalize locally. Returns
    the module."""
    from hvd_megdet.sync_bn import SyncBatchNorm

    for m in module.modules():
        if isinstance(m, SyncBatchNorm):
            m._group_size = lambda: 2  # anything but 1 (the local shortcut); the process set itself is unchanged
    return module


def _rel_err(actual, expected):
    """||actual - expected|| / ||expected|| in float64; inf when actual has a NaN or infinity."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-300)).item()


def _global_batch(shape, seed=0):
    """Input and upstream gradient of the whole batch (float64, CPU): channel means 3 + c / 4, std 2."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.arange(shape[1], dtype=torch.float64).view(1, -1, 1, 1) / 4
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3 + offset,
            torch.randn(shape, generator=gen, dtype=torch.float64))


def _bn_results(layer, x, dy):
    """One training step of a BatchNorm layer: {quantity: tensor}, output and input gradient for `x`."""
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return {"output": y, "grad_input": x.grad, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad,
            "running_mean": layer.running_mean, "running_var": layer.running_var}


def compare_bn(device, dtype, fused, two_phase, channels_last, rank=0, sizes=(4,), shape=(32, 28, 44)):
    """CGBN on this rank's slice of a global batch (per-rank batch sizes `sizes`) and nn.BatchNorm2d on the
    whole batch, both at `dtype` with float32 parameters on `device`, against nn.BatchNorm2d in float64 on the
    CPU. Both see the input rounded to `dtype` (and the upstream gradient likewise), so the errors are those
    of the layers. CGBN's weight and bias gradients are summed over the ranks first (they stay local).
    Returns {"cgbn": {quantity: error}, "batchnorm": {...}, "within": bool per quantity, "keeps_dtype",
    "keeps_memory_format", "ok"}."""
    import horovod.torch as hvd

    from hvd_megdet import sync_bn

    channels = shape[0]
    x64, dy64 = _global_batch((sum(sizes), *shape))
    x64, dy64 = x64.to(dtype).double(), dy64.to(dtype).double()
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.rand(channels, generator=gen) + 0.5, torch.rand(channels, generator=gen) - 0.5
    layers = {"reference": nn.BatchNorm2d(channels).double(), "batchnorm": nn.BatchNorm2d(channels).to(device),
              "cgbn": _force_collectives(sync_bn.SyncBatchNorm(channels, two_phase=two_phase, cuda_kernels=fused)
                                         .to(device))}
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    on_device = {name: t.to(device, dtype).contiguous(memory_format=fmt) for name, t in (("x", x64), ("dy", dy64))}

    ref = _bn_results(layers["reference"], x64, dy64)
    bn = _bn_results(layers["batchnorm"], on_device["x"], on_device["dy"])
    cgbn = _bn_results(layers["cgbn"], on_device["x"][lo:hi], on_device["dy"][lo:hi])
    if len(sizes) > 1:
        for key in ("grad_weight", "grad_bias"):
            # Horovod: CGBN's weight and bias gradients are per-rank partial sums; their sum is BatchNorm's.
            cgbn[key] = hvd.allreduce(cgbn[key], op=hvd.Sum, name=f"gpu_check.{key}")
    own_slice = {"output", "grad_input"}
    errors = {"cgbn": {q: _rel_err(cgbn[q], ref[q][lo:hi] if q in own_slice else ref[q]) for q in QUANTITIES},
              "batchnorm": {q: _rel_err(bn[q], ref[q]) for q in QUANTITIES}}
    within = {q: errors["cgbn"][q] <= FACTOR * max(errors["batchnorm"][q], FLOOR) for q in QUANTITIES}
    keeps_dtype = cgbn["output"].dtype == cgbn["grad_input"].dtype == dtype
    keeps_format = cgbn["output"].is_contiguous(memory_format=fmt)
    return {**errors, "within": within, "keeps_dtype": keeps_dtype, "keeps_memory_format": keeps_format,
            "ok": all(within.values()) and keeps_dtype and keeps_format}


def bn_cases(device):
    """(dtype name, fused, two_phase, channels_last) of every comparison on `device`: float16 and the fused
    kernels on CUDA only (torch has no CPU implementation of the fused kernels)."""
    dtypes = ("float32", "bfloat16", "float16") if device.type == "cuda" else ("float32", "bfloat16")
    fused = (False, True) if device.type == "cuda" else (False,)
    return [(d, f, t, c) for d in dtypes for f in fused for t in (True, False) for c in (False, True)]


def bn_rows(device, rank, sizes, shape):
    """compare_bn on every case of `bn_cases`, as JSON-ready rows."""
    rows = []
    for dtype, fused, two_phase, channels_last in bn_cases(device):
        result = compare_bn(device, DTYPES[dtype], fused, two_phase, channels_last, rank, sizes, shape)
        rows.append({"dtype": dtype, "fused": fused, "two_phase": two_phase, "channels_last": channels_last,
                     **result})
    return rows


def _bn_summary(rows, device):
    record = {"status": "ok" if all(r["ok"] for r in rows) else "failed", "device": str(device), "rows": rows,
              "factor": FACTOR, "floor": FLOOR}
    if device.type == "cuda":
        fused = [r["ok"] for r in rows if r["fused"]]
        record["fused_kernels_match"] = all(fused)
    else:
        record["fused_kernels"] = "not run: torch's fused SyncBatchNorm kernels are CUDA only"
    return record


def bn_np1(device, shape):
    """The BN comparison in this process (np=1): CGBN through its collectives over the one rank."""
    return _bn_summary(bn_rows(device, 0, (4,), shape), device)


def bn_np2(dry_run, timeout=180):
    """The BN comparison on two Horovod ranks (horovodrun --gloo, ranks 3 and 1 images), each on GPU
    local_rank % device count, else the CPU; {"status": "failed", "note"} when they could not run."""
    from hvd_megdet.process import run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [str(Path(sys.executable).with_name("horovodrun")), "-np", "2", "-H", "localhost:2", "--gloo",
               sys.executable, "-m", "hvd_megdet.bench.gpu", "--bn-rank", str(out)] + (["--dry-run"] if dry_run else [])
        returncode, output = run(cmd, timeout, cwd=REPO, env=_env_with_repo())
        if returncode != 0 or not out.exists():
            return {"status": "failed", "returncode": returncode, "output_tail": (output or "")[-3000:],
                    "note": _known_cause(output or "")}
        result = json.loads(out.read_text())
    return _bn_summary(result["rows"], torch.device(result["device"]))


def _bn_rank_main(path, dry_run):
    """A rank of bn_np2: its slice of the global batch on its device; rank 0 writes the rows."""
    import horovod.torch as hvd

    hvd.init()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", hvd.local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    rows = bn_rows(device, hvd.rank(), (3, 1), _bn_shape(dry_run))
    # Horovod: every rank's rows to rank 0, which judges each case on the worse rank.
    per_rank = hvd.allgather_object(rows, name="gpu_check.bn_rows")
    if hvd.rank() == 0:
        merged = []
        for cases in zip(*per_rank):
            row = dict(cases[0])
            for key in ("output", "grad_input"):  # each rank compares its own slice
                row["cgbn"][key] = max(c["cgbn"][key] for c in cases)
            row["within"] = {q: row["cgbn"][q] <= FACTOR * max(row["batchnorm"][q], FLOOR) for q in QUANTITIES}
            row["ok"] = all(row["within"].values()) and all(c["ok"] for c in cases)
            merged.append(row)
        path.write_text(json.dumps({"device": str(device), "rows": merged}))


def _bn_shape(dry_run):
    return (8, 6, 10) if dry_run else (32, 28, 44)


# ------------------------------------------------------------------------------------------------------------
# Training throughput


def synthetic_batch(device, height, width, images=2, boxes=8, seed=0):
    """`images` random images (3 x height x width, values in [0, 1]) with `boxes` random boxes each, labels in
    1..NUM_CLASSES - 1, on `device`: no dataset is needed, and every detector trains on the same batch."""
    gen = torch.Generator().manual_seed(seed)
    batch, targets = [], []
    for _ in range(images):
        batch.append(torch.rand(3, height, width, generator=gen).to(device))
        xy = torch.rand(boxes, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.05 + 0.25 * torch.rand(boxes, 2, generator=gen)) * torch.tensor([width, height])
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(1, NUM_CLASSES, (boxes,), generator=gen).to(device)})
    return batch, targets


def build_detector(name, device, height, width, **detector_kwargs):
    """The detector of variant `name` (VARIANTS) on `device`, with its SGD optimizer: torchvision's
    fasterrcnn_resnet50_fpn without weights (so its ResNet has trainable nn.BatchNorm2d, like ours), resizing
    to the batch's own size; or hvd_megdet's R50-FPN with CGBN (two_phase=True), channels_last.
    `detector_kwargs` go to torchvision's FasterRCNN in both (the dry run samples fewer boxes)."""
    ours, collectives, fused, box_head = VARIANTS[name]
    torch.manual_seed(0)
    if ours:
        from hvd_megdet.model import build_model, use_channels_last

        model = use_channels_last(build_model(NUM_CLASSES, "resnet50", norm="cgbn", two_phase=True,
                                              cgbn_cuda_kernels=fused, box_head=box_head, **detector_kwargs))
        if collectives:
            _force_collectives(model)
    else:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                        min_size=height, max_size=width, **detector_kwargs)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return model, optimizer


def train_step(model, optimizer, images, targets, amp):
    """One SGD step, the loop of torchvision's references/detection (with bf16 autocast when `amp`); returns
    the loss (a tensor: reading it would wait for the device)."""
    with torch.autocast(images[0].device.type, dtype=torch.bfloat16, enabled=amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(device, height, width, rounds, iters, warmup, names, **detector_kwargs):
    """Training images/s of each variant in `names`: `warmup` steps each, then `rounds` rounds in which each
    variant (in an order rotating every round) runs `iters` timed steps on the same batch. Returns
    {"variants": {name: {"images_per_s" (median over rounds), "per_round", "loss", "peak_memory_gib"}},
    "ratio_vs_torchvision": {name: median ratio}, "per_round_ratio", "target", "target_met"}."""
    images, targets = synthetic_batch(device, height, width)
    models = {name: build_detector(name, device, height, width, **detector_kwargs) for name in names}
    # bf16 autocast on the GPU; not on the CPU (the dry run), where bf16 convolutions without bf16 units are
    # several times slower than float32.
    amp = device.type == "cuda"
    per_round = {name: [] for name in names}
    losses, memory = {}, {}

    def steps(name, n):
        model, optimizer = models[name]
        ours = VARIANTS[name][0]
        for _ in range(n):
            losses[name] = train_step(model, optimizer, images, targets, amp=amp and ours)

    for name in names:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps(name, warmup)
        _sync(device)
        if device.type == "cuda":
            memory[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    for rnd in range(rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            _sync(device)
            start = time.perf_counter()
            steps(name, iters)
            _sync(device)
            per_round[name].append(iters * len(images) / (time.perf_counter() - start))
    variants = {name: {"images_per_s": statistics.median(per_round[name]), "per_round": per_round[name],
                       "loss": float(losses[name]), "peak_memory_gib": memory.get(name)} for name in names}
    record = {"status": "ok", "device": str(device), "image_size": [height, width], "images_per_step": len(images),
              "hvd_megdet_amp": "bf16" if amp else "off", "hvd_megdet_channels_last": True,
              "rounds": rounds, "iters": iters, "warmup": warmup, "detector_kwargs": detector_kwargs,
              "box_heads": {n: type(m.roi_heads.box_head).__name__ for n, (m, _) in models.items()},
              "variants": variants,
              "target": TARGET_RATIO, "target_variant": TARGET_VARIANT}
    if "torchvision" in names:
        base = variants["torchvision"]["images_per_s"]
        record["ratio_vs_torchvision"] = {n: v["images_per_s"] / base for n, v in variants.items()}
        record["per_round_ratio"] = {n: [a / b for a, b in zip(per_round[n], per_round["torchvision"])]
                                     for n in names}
        if TARGET_VARIANT in names and device.type == "cuda":
            record["target_met"] = record["ratio_vs_torchvision"][TARGET_VARIANT] >= TARGET_RATIO
    if not all(math.isfinite(v["loss"]) for v in variants.values()):
        record["status"] = "failed"
        record["error"] = "a detector's loss is not finite"
    return record


# ------------------------------------------------------------------------------------------------------------


def run(args, save):
    """Every step of the check, the most telling first (so that a run stopped at its time limit has them), the
    result passed to `save` after each; returns the JSON-ready result."""
    result = {"meta": {"command": " ".join(sys.argv), "dry_run": args.dry_run,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    if args.setup:
        result["setup"] = read_setup(args.setup)
    result["environment"] = _step("environment", environment)
    save(result)
    reason = _no_cuda_reason()
    device = torch.device("cpu") if reason else torch.device("cuda", 0)
    horovod = result["environment"].get("horovod", "not importable")
    horovod_missing = "not importable" in str(horovod)
    if horovod_missing or (reason and not args.dry_run):
        result["bn"] = {"np1": _skipped(f"Horovod: {horovod}" if horovod_missing else reason)}
    else:
        import horovod.torch as hvd

        hvd.init()  # a world of 1: CGBN's collectives run over this one rank
        if device.type == "cuda":
            torch.cuda.set_device(device)
        result["bn"] = {"np1": _step("bn np=1", bn_np1, device, _bn_shape(args.dry_run))}
    save(result)

    if reason and not args.dry_run:
        result["throughput"] = _skipped(reason)
    else:
        size = (128, 192) if args.dry_run else (800, 1333)
        # The dry run samples few proposals and boxes: at 128x192 the box head would be most of the work.
        sampling = {"rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 16} if args.dry_run else {}
        names = [n for n in VARIANTS if (not horovod_missing or not VARIANTS[n][0])
                 and not (device.type == "cpu" and VARIANTS[n][2])]  # the fused kernels are CUDA only
        result["throughput"] = _step("throughput", throughput, device, *size, args.rounds, args.iters,
                                     args.warmup, names, **sampling)
        if reason:
            result["throughput"]["note"] = f"dry run on the CPU, no figures: {reason}"
        else:
            torch.cuda.empty_cache()  # the detectors are gone: leave their memory to the tests' processes
    save(result)

    result["cuda_tests"] = _step("cuda_tests", cuda_tests)
    save(result)
    if "np1" in result["bn"] and result["bn"]["np1"]["status"] != "skipped":
        result["bn"]["np2"] = _step("bn np=2", bn_np2, args.dry_run)
    else:
        result["bn"]["np2"] = result["bn"]["np1"]
    if "setup" in result and "started_epoch" in result["setup"]:
        result["meta"]["total_seconds"] = round(time.time() - result["setup"]["started_epoch"], 1)
    result["summary"] = summary(result)
    save(result)
    return result


def summary(result):
    """One line per step: what passed, what failed, what was skipped and why."""
    lines = []
    for name in ("environment", "cuda_tests"):
        step = result[name]
        lines.append(f"{name}: {step['status']}" + (f" ({step['reason']})" if "reason" in step else ""))
    for np_key, step in result["bn"].items():
        line = f"bn {np_key}: {step['status']}"
        if "rows" in step:
            passed = sum(r["ok"] for r in step["rows"])
            line += f", {passed}/{len(step['rows'])} cases within {FACTOR:g}x BatchNorm's error"
        line += "".join(f" ({step[k]})" for k in ("reason", "note") if step.get(k))
        lines.append(line)
    t = result["throughput"]
    if "variants" in t:
        rates = ", ".join(f"{n} {v['images_per_s']:.2f}" for n, v in t["variants"].items())
        lines.append(f"throughput ({t['device']}, {t['image_size'][0]}x{t['image_size'][1]}, images/s): {rates}")
        for name, ratio in t.get("ratio_vs_torchvision", {}).items():
            if name != "torchvision":
                lines.append(f"  {name} / torchvision: {ratio:.2f}x (target {TARGET_RATIO}x"
                             + (", judged on this row)" if name == TARGET_VARIANT else ")"))
    else:
        lines.append(f"throughput: {t['status']}" + (f" ({t['reason']})" if "reason" in t else ""))
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.bn_rank:
        _bn_rank_main(args.bn_rank, args.dry_run)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args, lambda partial: args.out.write_text(json.dumps(partial, indent=2)))
    print("\n".join(result["summary"]), f"written: {args.out}", sep="\n", flush=True)


if __name__ == "__main__":
    main()
