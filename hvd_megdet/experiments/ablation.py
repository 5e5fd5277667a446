"""MegDet's ablations as a grid of real trainings: batch x norm x warmup x BN size, same number of epochs each.

    python -m hvd_megdet.experiments.ablation --grid configs/ablation/shapes_small.yaml [--out DIR] [--dry-run]

A grid file (YAML, strict keys; paths relative to the working directory):

    base: configs/demo_shapes.yaml   # the trainer config every run starts from
    out: output/ablation/shapes      # where runs and reports go (--out overrides it)
    epochs: 4                        # every run trains this many epochs of the training set
    ims_per_gpu: 2                   # images per rank: a total batch B runs on B / ims_per_gpu ranks
    warmup_epochs: 0.5               # length of the linear warmup when warmup is on (off: no warmup)
    steps_epochs: [3]                # lr x solver.gamma at these epochs
    timeout: 3600                    # seconds per run
    launcher: [horovodrun, -np, "{np}", -H, "localhost:{np}", --gloo]   # the default; "{np}" = ranks
    train_images: 0                  # training images the trainer will use; 0 = count them like it does
    divergence: {max_skipped: 0, explode_factor: 10}
    overrides: {input.max_size: 160} # dotted trainer keys fixed for every run
    axes:                            # one mapping, or a list of mappings whose expansions are joined
      batch: [2, 4, 8]               # total images per iteration
      norm: [frozen, bn, cgbn]
      warmup: [true, false]
      bn_group_size: [0, 2]          # CGBN only: ranks per BN group, 0 = all ranks

The lr of each run is MegDet's linear scaling rule, computed by the trainer itself from base_lr x batch /
base_batch; this module computes it too, only for the table. One epoch is the trainer's epoch length
(ceil(images / batch) iterations); runs evaluate once per epoch, which gives the AP-by-epoch curves.

Expansion: `frozen` and `bn` runs ignore bn_group_size (one run each); a CGBN group size that does not divide
the ranks is skipped, and CGBN over groups of one rank is per-rank BN, so it becomes (and merges with) `bn`.
"BN size" is the number of images the statistics are computed over: ims_per_gpu for bn, ims_per_gpu x group
size for CGBN.

Each run is the trainer in a subprocess (plain python for one rank, else the launcher) with its own folder
`<out>/<run name>/` (its trainer outputs, `log.txt`, and `result.json` once finished). Resume: rerunning the
same command skips every run whose result.json holds the same settings (the `Run` fields: batch, ranks, norm,
lr, iterations, overrides...) and did not fail; any other run (not started, interrupted, failed, or whose
settings changed) has its folder deleted and runs again from the start. Edits inside the base config file and
changed divergence thresholds are not detected: use a new --out for those.
Outcomes: `converged`; `diverged` (non-finite steps or an exploding loss, see `divergence`, or the trainer
stopped on a non-finite loss with solver.nonfinite=stop) — an outcome, not an error; `failed` (any other
crash or a timeout; the log's tail is kept). After each run results.json and results.md (the paper's table
form) are rewritten; at the end ap_by_epoch.png, loss.png and lr.png are drawn. Exit status 1 when a run
failed.
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hvd_megdet import process
from hvd_megdet.config import ConfigError, load_config, merge
from hvd_megdet.data import DatasetError, epoch_length, train_dataset
from hvd_megdet.solver import scaled_lr

NORMS = ("frozen", "bn", "cgbn")
# Trainer keys each run sets from the grid's axes and epochs; the grid's `overrides` must not set them.
RUNNER_KEYS = ("solver.ims_per_gpu", "solver.max_iter", "solver.steps", "solver.warmup_iters", "model.norm",
               "model.bn_group_size", "eval_period", "output_dir")
DEFAULT_LAUNCHER = [str(Path(sys.executable).with_name("horovodrun")), "-np", "{np}", "-H", "localhost:{np}",
                    "--gloo"]
LOG_TAIL_LINES = 40


@dataclass
class Axes:
    batch: list[int] = field(default_factory=list)
    norm: list[str] = field(default_factory=lambda: ["cgbn"])
    warmup: list[bool] = field(default_factory=lambda: [True])
    bn_group_size: list[int] = field(default_factory=lambda: [0])


@dataclass
class Divergence:
    max_skipped: int = 0  # more non-finite (skipped) steps than this = diverged
    explode_factor: float = 10.0  # a loss above this x the early median = diverged


@dataclass
class Grid:
    base: str = ""
    out: str = "output/ablation"
    epochs: float = 1.0
    ims_per_gpu: int = 2
    warmup_epochs: float = 0.5
    steps_epochs: list[float] = field(default_factory=list)
    timeout: float = 3600.0
    launcher: list[str] = field(default_factory=list)  # [] = DEFAULT_LAUNCHER
    train_images: int = 0
    divergence: Divergence = field(default_factory=Divergence)
    overrides: dict = field(default_factory=dict)
    axes: list = field(default_factory=list)  # of Axes after load_grid


@dataclass
class Run:
    """One training of the grid; every field is part of its identity (a changed field means a new run)."""
    name: str
    batch: int  # total images per iteration
    ranks: int
    ims_per_gpu: int
    norm: str  # frozen | bn | cgbn
    bn_group_size: int  # ranks per CGBN group (cgbn); 0 otherwise
    bn_images: int  # images the BN statistics cover; 0 for frozen
    warmup: bool
    warmup_iters: int
    lr: float  # after the linear scaling rule (the peak lr)
    epochs: float
    iters_per_epoch: int
    max_iter: int
    overrides: list[str]  # trainer key=value overrides (output_dir is added at launch)


def load_grid(path):
    """Parse and check a grid file; raise ConfigError naming the file and key."""
    where = f"grid file {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML ({e.__class__.__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("axes"), dict):
        data["axes"] = [data["axes"]]
    grid = Grid()
    merge(grid, data or {}, "", where)
    axes = []
    for i, block in enumerate(grid.axes):
        ax = Axes()
        merge(ax, block, f"axes[{i}].", where)
        axes.append(ax)
    grid.axes = axes
    if not grid.base:
        raise ConfigError(f"{where}: base (the trainer config) is required")
    if not axes or not all(ax.batch for ax in axes):
        raise ConfigError(f"{where}: axes needs at least one block with a non-empty batch list")
    if grid.epochs <= 0 or grid.ims_per_gpu <= 0 or grid.timeout <= 0 or grid.warmup_epochs < 0:
        raise ConfigError(f"{where}: epochs, ims_per_gpu and timeout must be positive, warmup_epochs >= 0")
    for i, ax in enumerate(axes):
        for b in ax.batch:
            if b <= 0 or b % grid.ims_per_gpu:
                raise ConfigError(f"{where}: axes[{i}].batch {b} is not a positive multiple of ims_per_gpu "
                                  f"{grid.ims_per_gpu}")
        for norm in ax.norm:
            if norm not in NORMS:
                raise ConfigError(f"{where}: axes[{i}].norm must be among {', '.join(NORMS)}, got {norm!r}")
        if any(k < 0 for k in ax.bn_group_size):
            raise ConfigError(f"{where}: axes[{i}].bn_group_size must be >= 0, got {ax.bn_group_size}")
    for key in grid.overrides:
        if key in RUNNER_KEYS:
            raise ConfigError(f"{where}: overrides.{key} is set by the grid itself (axes, epochs)")
    if grid.launcher and not any("{np}" in t for t in grid.launcher):
        raise ConfigError(f"{where}: launcher must contain \"{{np}}\" (the number of ranks), got {grid.launcher}")
    return grid


def override_args(mapping):
    """{'a.b': [1, 2]} -> ['a.b=[1, 2]']: JSON values, which the trainer's YAML override parser reads back."""
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def count_train_images(cfg):
    """The number of training images the trainer will use (its own dataset class and filtering)."""
    try:
        return len(train_dataset(cfg))
    except DatasetError as e:
        raise DatasetError(f"{e} (counting the training images; train_images in the grid skips this)") from None


def _combos(ax, ims_per_gpu):
    """(batch, ranks, norm, group size, warmup) of one axes block, CGBN sizes resolved; and skip notes."""
    combos, notes = [], []
    for batch, norm, warmup in itertools.product(ax.batch, ax.norm, ax.warmup):
        ranks = batch // ims_per_gpu
        if norm != "cgbn":
            combos.append((batch, ranks, norm, 0, warmup))
            continue
        for k in ax.bn_group_size:
            size = k or ranks
            if ranks % size:
                notes.append(f"batch {batch} cgbn bn_group_size {k}: {size} does not divide {ranks} ranks, skipped")
            elif size == 1:  # statistics of one rank: exactly per-rank BN
                combos.append((batch, ranks, "bn", 0, warmup))
            else:
                combos.append((batch, ranks, "cgbn", size, warmup))
    return combos, notes


def expand(grid, where="grid"):
    """The grid's runs in file order, duplicates merged, each validated as a trainer config; and skip notes.

    Raises ConfigError naming the run when a run's trainer config is invalid.
    """
    fixed = override_args(grid.overrides)
    try:
        base_cfg = load_config(grid.base, fixed)
    except ConfigError as e:
        raise ConfigError(f"{where}: base with overrides: {e}") from None
    n_images = grid.train_images or count_train_images(base_cfg)
    runs, notes, seen = [], [], set()
    for ax in grid.axes:
        combos, skip_notes = _combos(ax, grid.ims_per_gpu)
        notes += skip_notes
        for batch, ranks, norm, k, warmup in combos:
            bn_images = 0 if norm == "frozen" else grid.ims_per_gpu * (k or 1)
            name = f"b{batch}_{norm}{bn_images or ''}" + ("_warmup" if warmup else "_nowarmup")
            if name in seen:
                continue
            seen.add(name)
            ipe = epoch_length(n_images, batch)
            max_iter = max(1, round(grid.epochs * ipe))
            warmup_iters = max(1, round(grid.warmup_epochs * ipe)) if warmup and grid.warmup_epochs else 0
            steps = [round(e * ipe) for e in grid.steps_epochs]
            overrides = fixed + [f"solver.ims_per_gpu={grid.ims_per_gpu}", f"solver.max_iter={max_iter}",
                                 f"solver.steps={json.dumps(steps)}", f"solver.warmup_iters={warmup_iters}",
                                 f"model.norm={norm}", f"model.bn_group_size={k}", f"eval_period={ipe}"]
            try:
                load_config(grid.base, overrides)
            except ConfigError as e:
                raise ConfigError(f"{where}: run {name}: {e}") from None
            runs.append(Run(name=name, batch=batch, ranks=ranks, ims_per_gpu=grid.ims_per_gpu, norm=norm,
                            bn_group_size=k, bn_images=bn_images,
                            warmup=warmup, warmup_iters=warmup_iters,
                            lr=scaled_lr(base_cfg.solver.base_lr, base_cfg.solver.base_batch, batch),
                            epochs=grid.epochs, iters_per_epoch=ipe, max_iter=max_iter, overrides=overrides))
    return runs, notes


def command(run, run_dir, grid):
    """The argv that trains `run` into `run_dir`: plain python for one rank, else the grid's launcher."""
    train = [sys.executable, "-m", "hvd_megdet.train", "--config", grid.base, *run.overrides,
             f"output_dir={run_dir}"]
    if run.ranks == 1:
        return train
    return [t.replace("{np}", str(run.ranks)) for t in grid.launcher or DEFAULT_LAUNCHER] + train


def execute(cmd, log_path, timeout):
    """Run `cmd` with stdout and stderr into `log_path`; its exit status, or None if it ran past `timeout`
    seconds (then it and everything it started are killed, as they are if this process is interrupted)."""
    with open(log_path, "w") as log:
        return process.run(cmd, timeout, stdout=log, stdin=subprocess.DEVNULL)[0]


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
    log_path = Path(run_dir) / "log.txt"
    log_lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    tail = "\n".join(log_lines[-LOG_TAIL_LINES:])
    stop = [line for line in log_lines if "FloatingPointError" in line]
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


def write_json(path, obj):
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_result(run_dir):
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
    returncode = execute(command(run, run_dir, grid), run_dir / "log.txt", grid.timeout)
    result = collect(run, run_dir, returncode, time.perf_counter() - t0, grid)
    write_json(run_dir / "result.json", result)
    return result


def fmt_time(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def table(results):
    """The paper's table form, one markdown row per result: batch, BN, BN size, lr, warmup, AP, AP50, plus
    the mean training loss of the last epoch, time (training iterations only: no evaluation, no start-up)
    and converged."""
    rows = ["| batch | BN | BN size | lr | warmup | AP | AP50 | loss | time | converged |",
            "|---:|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        norm = {"frozen": "frozen", "bn": "BN", "cgbn": "CGBN"}[r["norm"]]
        warmup = f"{r['warmup_iters']} it" if r["warmup"] else "no"
        converged = {"converged": "yes", "diverged": f"no: {r['reason']}", "failed": f"failed: {r['reason']}"}
        rows.append(f"| {r['batch']} | {norm} | {r['bn_images'] or '-'} | {r['lr']:g} | {warmup} "
                    f"| {fmt(r['AP'])} | {fmt(r['AP50'])} | {fmt(r['final_loss'], '.3g')} "
                    f"| {fmt_time(r['train_time_s'])} | {converged[r['status']].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def moving_average(values, window):
    """Trailing mean over `window` values (shorter at the start), non-finite values left out."""
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
        recent = kept[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def plot(results, out):
    """Draw under `out`: ap_by_epoch.png (AP and AP50 of every run; colour = total batch, marker = norm mode,
    dashed = no warmup), loss.png (one panel per total batch, moving average over a quarter epoch, log scale
    cut at 10x the starting loss) and lr.png (one line per total batch and warmup setting)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in results})
    colour = {b: plt.get_cmap("viridis")(0.85 * i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
    marker = {"frozen": "x", "bn": "s", "cgbn": "o"}
    dashes = {True: "-", False: "--"}
    curves = {r["name"]: read_metrics(Path(out) / r["name"]) for r in results}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(Path(out) / name, dpi=80)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("AP", "AP50")):
        for r in results:
            ax.plot([e["epoch"] for e in r["ap_by_epoch"]], [e[metric] for e in r["ap_by_epoch"]],
                    label=r["name"], color=colour[r["batch"]], marker=marker[r["norm"]],
                    linestyle=dashes[r["warmup"]])
        ax.set(xlabel="epoch", ylabel=f"bbox {metric} (%)", title=f"{metric} by epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, "ap_by_epoch.png")

    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False, sharey=True)
    first_losses = []
    for ax, batch in zip(axes[0], batches):
        for r in results:
            rec = curves[r["name"]]
            if r["batch"] == batch and rec:
                smooth = moving_average([x["loss"] for x in rec], max(1, r["iters_per_epoch"] // 4))
                first_losses += [x for x in smooth[:1] if math.isfinite(x)]
                ax.plot([x["epoch"] for x in rec], smooth, linestyle=dashes[r["warmup"]],
                        label=r["name"] + (" (diverged)" if r["status"] == "diverged" else ""))
        ax.set(xlabel="epoch", title=f"batch {batch}", yscale="log")
        if ax.lines:  # none when every run of this batch failed before logging
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (moving average)")
    if first_losses:  # an exploded loss would squash every other curve: cut the axis at 10x the start
        axes[0][0].set_ylim(top=10 * max(first_losses))
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    drawn = set()
    for r in results:
        rec = curves[r["name"]]
        if rec and (r["batch"], r["warmup"]) not in drawn:
            drawn.add((r["batch"], r["warmup"]))
            label = f"batch {r['batch']}" + ("" if r["warmup"] else ", no warmup")
            ax.plot([x["epoch"] for x in rec], [x["lr"] for x in rec], color=colour[r["batch"]],
                    linestyle=dashes[r["warmup"]], label=label)
    ax.set(xlabel="epoch", ylabel="learning rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "lr.png")


def write_reports(results, out, grid_path):
    """results.json and results.md under `out`."""
    out = Path(out)
    write_json(out / "results.json", {"grid": str(grid_path), "results": results})
    (out / "results.md").write_text(f"Grid `{grid_path}`, {len(results)} runs.\n\n" + table(results))


def run_grid(runs, grid, out, grid_path, execute=execute, log=print):
    """Train every run not already done (see `is_done`), rewriting the table after each; plot; the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, run in enumerate(runs, 1):
        run_dir = out / run.name
        result = read_result(run_dir)
        if is_done(result, run):
            log(f"[{i}/{len(runs)}] {run.name}: done already ({result['status']}), skipped")
        else:
            log(f"[{i}/{len(runs)}] {run.name}: {run.ranks} ranks x {run.ims_per_gpu} images, lr {run.lr:g}, "
                f"{run.max_iter} iterations ({run.iters_per_epoch} per epoch) ...")
            result = train_run(run, run_dir, grid, execute)
            log(f"    {result['status']}" + (f": {result['reason']}" if result["reason"] else "")
                + f"; AP {fmt(result['AP'])}; {fmt_time(result['wall_s'])} wall")
        results.append(result)
        write_reports(results, out, grid_path)
    plot(results, out)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="grid YAML file")
    parser.add_argument("--out", help="output folder (default: the grid's `out`)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, train nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        grid = load_grid(args.grid)
        runs, notes = expand(grid, f"grid file {args.grid}")
    except (ConfigError, DatasetError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out or grid.out)
    for note in notes:
        print(f"note: {note}")
    print(f"{len(runs)} runs, {grid.epochs:g} epochs each, into {out}")
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: batch {run.batch} = {run.ranks} x {run.ims_per_gpu}, lr {run.lr:g}, "
                  f"{run.max_iter} iterations, warmup {run.warmup_iters}\n  "
                  + shlex.join(command(run, out / run.name, grid)))
        return 0
    t0 = time.perf_counter()
    results = run_grid(runs, grid, out, args.grid)
    failed = [r["name"] for r in results if r["status"] == "failed"]
    print(f"grid done in {fmt_time(time.perf_counter() - t0)}; reports in {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    # A plain `kill` of the runner stops the training it is running too (execute cleans up on SystemExit).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
