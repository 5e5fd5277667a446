"""The runs: each one the trainer in a subprocess with its own folder, its outcome read back from what the
trainer wrote (converged, diverged or failed), its result.json written once it finished, and the test that lets
a rerun of the grid skip it."""
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hvd_megdet import process
from hvd_megdet.checkpoint import write_atomic

DEFAULT_LAUNCHER = [str(Path(sys.executable).with_name("horovodrun")), "-np", "{np}", "-H", "localhost:{np}",
                    "--gloo"]
LOG_TAIL_LINES = 40
# What a run's processes print, captured; not the trainer's log.txt, which the trainer appends to itself.
OUTPUT = "output.txt"


def command(run, run_dir, grid):
    """The argv that trains `run` into `run_dir`: plain python for one rank, else the grid's launcher."""
    train = [sys.executable, "-m", "hvd_megdet.train", "--config", grid.base, *run.overrides,
             f"output_dir={run_dir}"]
    if run.ranks == 1:
        return train
    return [t.replace("{np}", str(run.ranks)) for t in grid.launcher or DEFAULT_LAUNCHER] + train


def execute(cmd, output_path, timeout):
    """Run `cmd` with stdout and stderr into `output_path`; its exit status, or None if it ran past `timeout`
    seconds (then it and everything it started are killed, as they are if this process is interrupted)."""
    with open(output_path, "w") as output:
        return process.run(cmd, timeout, stdout=output, stdin=subprocess.DEVNULL)[0]


def divergence(losses, skipped, max_skipped=0, explode_factor=10.0):
    """Why a training diverged, or None if it did not.

    losses: the total loss of each iteration in order (non-finite values allowed); skipped: the number of
    steps the trainer skipped as non-finite. Diverged: more than `max_skipped` skipped steps; no finite loss;
    a loss above `explode_factor` x the early median (median of the first w finite losses, w = a tenth of
    them, 1..20); or the late median (last w) not below the early median.
    """
    if skipped > max_skipped:
        return f"{skipped} non-finite steps skipped (more than {max_skipped})"
    finite = [(i, x) for i, x in enumerate(losses) if math.isfinite(x)]
    if not finite:
        return "no finite loss"
    w = max(1, min(20, len(finite) // 10))
    early = statistics.median(x for _, x in finite[:w])
    i, peak = max(finite, key=lambda p: p[1])
    if peak > explode_factor * early:
        return f"loss exploded: {peak:.3g} at iteration {i + 1} > {explode_factor:g} x early median {early:.3g}"
    late = statistics.median(x for _, x in finite[-w:])
    if late >= early:
        return f"loss did not decrease: late median {late:.3g} >= early median {early:.3g}"
    return None


def read_metrics(run_dir):
    """The trainer's per-iteration records (metrics.jsonl), in order; [] if there are none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_evals(run_dir, iters_per_epoch):
    """[{"epoch", "AP", "AP50"}] from the trainer's eval/metrics_<iteration>.json files, by epoch."""
    evals = []
    for path in sorted((Path(run_dir) / "eval").glob("metrics_*.json")):
        record = json.loads(path.read_text())
        bbox = record["bbox"]
        evals.append({"epoch": record["iteration"] / iters_per_epoch, "AP": bbox["AP"], "AP50": bbox["AP50"]})
    return evals


def last_epoch_loss(losses, iters_per_epoch):
    """Mean of the finite losses of the last `iters_per_epoch` iterations; None if there is none."""
    finite = [x for x in losses[-iters_per_epoch:] if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else None


def collect(run, run_dir, returncode, wall_s, grid):
    """The result record of a finished (or killed) run: its settings, outcome and measurements."""
    records = read_metrics(run_dir)
    evals = read_evals(run_dir, run.iters_per_epoch)
    losses = [r["loss"] for r in records]
    skipped = records[-1]["skipped"] if records else 0
    result = {**dataclasses.asdict(run), "status": "failed", "converged": None, "reason": None,
              "AP": evals[-1]["AP"] if evals else None, "AP50": evals[-1]["AP50"] if evals else None,
              "ap_by_epoch": evals, "iterations_done": len(records), "skipped": skipped,
              "final_loss": last_epoch_loss(losses, run.iters_per_epoch),
              "train_time_s": sum(r["time"] for r in records), "wall_s": wall_s, "log_tail": None}
    output_path = Path(run_dir) / OUTPUT
    lines = output_path.read_text(errors="replace").splitlines() if output_path.exists() else []
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    stop = [line for line in lines if "FloatingPointError" in line]
    if returncode is None:
        result.update(reason=f"timed out after {grid.timeout:g} s", log_tail=tail)
    elif returncode != 0 and stop:
        result.update(status="diverged", converged=False, reason=stop[-1].strip()[-300:])
    elif returncode != 0:
        result.update(reason=f"exit status {returncode}", log_tail=tail)
    elif len(records) < run.max_iter:
        result.update(reason=f"exited after {len(records)} of {run.max_iter} iterations", log_tail=tail)
    else:
        reason = divergence(losses, skipped, grid.divergence.max_skipped, grid.divergence.explode_factor)
        result.update(status="diverged" if reason else "converged", converged=reason is None, reason=reason)
    return result


def source_version():
    """The git commit of the hvd_megdet code that runs ("<sha>", "<sha>+changes" when tracked files differ
    from it), or "unknown" outside a git checkout: each result records it, so that a grid run from its own
    clone at a fixed commit can be checked to be one code."""
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return "unknown"
    return sha + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_result(run_dir, result):
    """Write the result record `result` as `run_dir`/result.json (atomically): the run counts as done."""
    write_atomic(Path(run_dir) / "result.json", lambda f: f.write(json.dumps(result, indent=1).encode()))


def read_result(run_dir):
    """The result record `train_run` wrote into `run_dir`; None if there is none."""
    path = Path(run_dir) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def is_done(result, run):
    """A recorded result counts when it did not fail and was produced with exactly `run`'s settings."""
    if result is None or result["status"] == "failed":
        return False
    spec = json.loads(json.dumps(dataclasses.asdict(run)))
    return all(result.get(k) == v for k, v in spec.items())


def train_run(run, run_dir, grid, execute=execute):
    """Train `run` from scratch in `run_dir` (deleted first); write and return its result record."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    returncode = execute(command(run, run_dir, grid), run_dir / OUTPUT, grid.timeout)
    result = collect(run, run_dir, returncode, time.perf_counter() - t0, grid) | {"commit": source_version()}
    write_result(run_dir, result)
    return result

