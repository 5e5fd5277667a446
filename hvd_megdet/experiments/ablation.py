"""MegDet's ablations as a grid of real trainings: batch x norm x warmup x BN size x seed, same epochs each.

    python -m hvd_megdet.experiments.ablation --grid configs/ablation/shapes_megdet.yaml [--out DIR] [--dry-run]

A grid file (YAML, strict keys; paths relative to the working directory):

    base: configs/demo_shapes.yaml   # the trainer config every run starts from
    out: output/ablation/shapes      # where runs and reports go (--out overrides it)
    epochs: 4                        # every run trains this many epochs of the training set
    ims_per_gpu: 2                   # images per rank and backward pass, unless a block sets `ranks`
    warmup_epochs: 0.5               # length of the linear warmup when warmup is on (off: no warmup)
    steps_epochs: [3]                # lr x solver.gamma at these epochs
    timeout: 3600                    # seconds per run
    launcher: [horovodrun, -np, "{np}", -H, "localhost:{np}", --gloo]   # the default; "{np}" = ranks
    train_images: 0                  # training images the trainer will use; 0 = count them like it does
    divergence: {max_skipped: 0, explode_factor: 10}
    overrides: {input.max_size: 160} # dotted trainer keys fixed for every run
    axes:                            # one mapping, or a list of mappings (blocks) whose expansions are joined
      - title: "no BN vs CGBN"       # names the block's panel in the plots
        batch: [2, 4, 8]             # total images per optimizer step
        norm: [frozen, bn, cgbn]
        warmup: [true, false]
        bn_group_size: [0, 2]        # CGBN only: ranks per BN group, 0 = all ranks
        lr_scaling: [linear, none]   # none: the lr stays solver.base_lr (the lr of solver.base_batch)
        seed: [0, 1]                 # the trainer's seed (initial weights, data order, augmentation)
        ranks: 0                     # 0: batch / (ims_per_gpu x passes) ranks; else this many ranks, each
                                     # with batch / (ranks x passes) images per pass
        backward_passes_per_step: 1  # gradient accumulation: passes per optimizer step

The lr of each run is MegDet's linear scaling rule, computed by the trainer itself from base_lr x batch /
base_batch (`lr_scaling: none` sets the trainer's base_batch to the run's batch, so its lr is base_lr: the
unscaled control); this module computes it too, only for the table. One epoch is the trainer's epoch length
(ceil(images / batch) iterations); runs evaluate once per epoch, which gives the AP-by-epoch curves.

Expansion: `frozen` and `bn` runs ignore bn_group_size (one run each); a CGBN group size that does not divide
the ranks is skipped, and CGBN over groups of one rank is per-rank BN, so it becomes (and merges with) `bn`;
`lr_scaling: none` at batch = base_batch is the linear run. A run in several blocks trains once and is drawn in
each. "BN size" is the number of images the statistics are computed over: the images of one backward pass of
one rank for bn, of the ranks of a group for CGBN. Run names say all of it: b64_4x2x8_cgbn4_warmup_s1 is
batch 64 on 4 ranks x 2 images x 8 passes, CGBN over 4 images, with warmup, seed 1.

Each run is the trainer in a subprocess (plain python for one rank, else the launcher) with its own folder
`<out>/<run name>/`: the trainer's outputs (its `log.txt` among them), `output.txt` (what every rank printed on
stdout and stderr, error lines included) and `result.json` once finished. Resume: rerunning the same command
skips every run whose result.json holds the same settings (the `Run` fields: batch, ranks, norm, lr,
iterations, seed, overrides...) and did not fail; any other run (not started, interrupted, failed, or whose
settings changed) has its folder deleted and runs again from the start. Edits inside the base config file and
changed divergence thresholds are not detected: use a new --out for those.
Outcomes: `converged`; `diverged` (non-finite steps or an exploding loss, see `divergence`, or the trainer
stopped on a non-finite loss with solver.nonfinite=stop) — an outcome, not an error; `failed` (any other
crash or a timeout; the tail of output.txt is kept as "log_tail"). After each run results.json and
results.md are rewritten: the paper's table form with the seeds of a setting pooled (mean and spread), AP by
epoch, and one row per run. At the end ap_by_epoch.png, loss.png (one panel per block) and lr.png are drawn.
Exit status 1 when a run failed.
"""
import argparse
import dataclasses
import itertools
import json
import math
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
from hvd_megdet.checkpoint import write_atomic
from hvd_megdet.config import ConfigError, load_config, merge
from hvd_megdet.data import DatasetError, epoch_length, train_dataset
from hvd_megdet.solver import scaled_lr

NORMS = ("frozen", "bn", "cgbn")
LR_SCALINGS = ("linear", "none")
# Trainer keys each run sets from the grid's axes and epochs; the grid's `overrides` must not set them.
RUNNER_KEYS = ("solver.ims_per_gpu", "solver.backward_passes_per_step", "solver.max_iter", "solver.steps",
               "solver.warmup_iters", "model.norm", "model.bn_group_size", "eval_period", "seed", "output_dir")
DEFAULT_LAUNCHER = [str(Path(sys.executable).with_name("horovodrun")), "-np", "{np}", "-H", "localhost:{np}",
                    "--gloo"]
LOG_TAIL_LINES = 40
# What a run's processes print, captured; not the trainer's log.txt, which the trainer appends to itself.
OUTPUT = "output.txt"


@dataclass
class Axes:
    title: str = ""
    batch: list[int] = field(default_factory=list)
    norm: list[str] = field(default_factory=lambda: ["cgbn"])
    warmup: list[bool] = field(default_factory=lambda: [True])
    bn_group_size: list[int] = field(default_factory=lambda: [0])
    lr_scaling: list[str] = field(default_factory=lambda: ["linear"])
    seed: list[int] = field(default_factory=lambda: [0])
    ranks: int = 0  # 0 = batch / (grid ims_per_gpu x passes)
    backward_passes_per_step: int = 1


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
    setting: str  # the name without the seed: runs that differ only in their seed share it
    batch: int  # total images per optimizer step
    ranks: int
    ims_per_gpu: int  # per backward pass
    passes: int  # backward passes per step (gradient accumulation)
    norm: str  # frozen | bn | cgbn
    bn_group_size: int  # ranks per CGBN group (cgbn); 0 otherwise
    bn_images: int  # images the BN statistics cover; 0 for frozen
    warmup: bool
    warmup_iters: int
    lr_scaling: str  # linear | none
    lr: float  # the peak lr (linear scaling rule, or base_lr for lr_scaling none)
    seed: int
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
        if ax.ranks < 0 or ax.backward_passes_per_step < 1:
            raise ConfigError(f"{where}: axes[{i}]: ranks must be >= 0 and backward_passes_per_step >= 1, got "
                              f"{ax.ranks} and {ax.backward_passes_per_step}")
        per_rank = ax.backward_passes_per_step * (1 if ax.ranks else grid.ims_per_gpu)
        for b in ax.batch:
            if b <= 0 or b % (per_rank * (ax.ranks or 1)):
                what = (f"{ax.ranks} ranks x {ax.backward_passes_per_step} passes" if ax.ranks
                        else f"ims_per_gpu {grid.ims_per_gpu} x {ax.backward_passes_per_step} passes")
                raise ConfigError(f"{where}: axes[{i}].batch {b} is not a positive multiple of {what}")
        for name, values, choices in (("norm", ax.norm, NORMS), ("lr_scaling", ax.lr_scaling, LR_SCALINGS)):
            for value in values:
                if value not in choices:
                    raise ConfigError(f"{where}: axes[{i}].{name} must be among {', '.join(choices)}, "
                                      f"got {value!r}")
        if any(k < 0 for k in ax.bn_group_size) or any(seed < 0 for seed in ax.seed):
            raise ConfigError(f"{where}: axes[{i}].bn_group_size and seed must be >= 0, got "
                              f"{ax.bn_group_size} and {ax.seed}")
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


def layout(batch, ax, ims_per_gpu):
    """(ranks, images per rank and pass, passes) of total batch `batch` in axes block `ax`."""
    passes = ax.backward_passes_per_step
    if ax.ranks:
        return ax.ranks, batch // (ax.ranks * passes), passes
    return batch // (ims_per_gpu * passes), ims_per_gpu, passes


def _combos(ax, ims_per_gpu, base_batch):
    """(batch, norm, group size, warmup, lr scaling) of one axes block, CGBN sizes and lr scaling resolved;
    and skip notes."""
    combos, notes = [], []
    for batch, norm, warmup, scaling in itertools.product(ax.batch, ax.norm, ax.warmup, ax.lr_scaling):
        scaling = "linear" if batch == base_batch else scaling  # unscaled at base_batch is the linear lr
        ranks = layout(batch, ax, ims_per_gpu)[0]
        if norm != "cgbn":
            combos.append((batch, norm, 0, warmup, scaling))
            continue
        for k in ax.bn_group_size:
            size = k or ranks
            if ranks % size:
                notes.append(f"batch {batch} cgbn bn_group_size {k}: {size} does not divide {ranks} ranks, skipped")
            elif size == 1:  # statistics of one rank: exactly per-rank BN
                combos.append((batch, "bn", 0, warmup, scaling))
            else:
                combos.append((batch, "cgbn", size, warmup, scaling))
    return combos, notes


def run_name(batch, ranks, ims, passes, norm, bn_images, warmup, scaling):
    """The setting's name, e.g. b64_4x2x8_cgbn4_warmup (x passes only when more than 1); runs add _s<seed>."""
    return (f"b{batch}_{ranks}x{ims}" + (f"x{passes}" if passes > 1 else "") + f"_{norm}{bn_images or ''}"
            + ("_warmup" if warmup else "_nowarmup") + ("_unscaled" if scaling == "none" else ""))


def expand(grid, where="grid"):
    """The grid's runs, by seed and then in file order, duplicates merged, each validated as a trainer config;
    skip notes; and the blocks as [(title, [setting names in the block])], for plots that compare a block's
    settings.

    Raises ConfigError naming the run when a run's trainer config is invalid.
    """
    fixed = override_args(grid.overrides)
    try:
        base_cfg = load_config(grid.base, fixed)
    except ConfigError as e:
        raise ConfigError(f"{where}: base with overrides: {e}") from None
    base_lr, base_batch = base_cfg.solver.base_lr, base_cfg.solver.base_batch
    n_images = grid.train_images or count_train_images(base_cfg)
    runs, notes, blocks, seen = [], [], [], set()
    for i, ax in enumerate(grid.axes):
        combos, skip_notes = _combos(ax, grid.ims_per_gpu, base_batch)
        notes += skip_notes
        settings = []
        for batch, norm, k, warmup, scaling in combos:
            ranks, ims, passes = layout(batch, ax, grid.ims_per_gpu)
            bn_images = 0 if norm == "frozen" else ims * (k or 1)
            setting = run_name(batch, ranks, ims, passes, norm, bn_images, warmup, scaling)
            settings += [setting] if setting not in settings else []
            ipe = epoch_length(n_images, batch)
            max_iter = max(1, round(grid.epochs * ipe))
            warmup_iters = max(1, round(grid.warmup_epochs * ipe)) if warmup and grid.warmup_epochs else 0
            steps = [round(e * ipe) for e in grid.steps_epochs]
            unscaled = [f"solver.base_batch={batch}"] if scaling == "none" else []
            for seed in ax.seed:
                name = f"{setting}_s{seed}"
                if name in seen:
                    continue
                seen.add(name)
                overrides = fixed + unscaled + [
                    f"solver.ims_per_gpu={ims}", f"solver.backward_passes_per_step={passes}",
                    f"solver.max_iter={max_iter}", f"solver.steps={json.dumps(steps)}",
                    f"solver.warmup_iters={warmup_iters}", f"model.norm={norm}", f"model.bn_group_size={k}",
                    f"eval_period={ipe}", f"seed={seed}"]
                try:
                    load_config(grid.base, overrides)
                except ConfigError as e:
                    raise ConfigError(f"{where}: run {name}: {e}") from None
                runs.append(Run(name=name, setting=setting, batch=batch, ranks=ranks, ims_per_gpu=ims,
                                passes=passes, norm=norm, bn_group_size=k, bn_images=bn_images, warmup=warmup,
                                warmup_iters=warmup_iters, lr_scaling=scaling,
                                lr=base_lr if scaling == "none" else scaled_lr(base_lr, base_batch, batch),
                                seed=seed, epochs=grid.epochs, iters_per_epoch=ipe, max_iter=max_iter,
                                overrides=overrides))
        blocks.append((ax.title or f"axes[{i}]", settings))
    runs.sort(key=lambda r: r.seed)  # stable: an interrupted grid has the first seed of every setting first
    return runs, notes, blocks


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
    returncode = execute(command(run, run_dir, grid), run_dir / OUTPUT, grid.timeout)
    result = collect(run, run_dir, returncode, time.perf_counter() - t0, grid)
    write_atomic(run_dir / "result.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


def fmt_time(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def by_setting(results):
    """{setting: [results of its seeds]} in the order the settings first appear."""
    groups = {}
    for r in results:
        groups.setdefault(r["setting"], []).append(r)
    return groups


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _spread(values):
    """max - min of the values that exist; None with fewer than two."""
    values = [v for v in values if v is not None]
    return max(values) - min(values) if len(values) > 1 else None


def _describe(r):
    """The settings columns of a result: batch, ranks x images (x passes), BN, BN size, lr, warmup."""
    norm = {"frozen": "frozen", "bn": "BN", "cgbn": "CGBN"}[r["norm"]]
    split = f"{r['ranks']} x {r['ims_per_gpu']}" + (f" x {r['passes']}" if r["passes"] > 1 else "")
    lr = f"{r['lr']:g}" + (" (unscaled)" if r["lr_scaling"] == "none" else "")
    warmup = f"{r['warmup_iters']} it" if r["warmup"] else "no"
    return f"| {r['batch']} | {split} | {norm} | {r['bn_images'] or '-'} | {lr} | {warmup} "


def brief(reason):
    """A run's reason without the log's prefix and the trainer's advice: the trainer's stop on a non-finite
    step, '[1]<stderr>:error: FloatingPointError: iteration 7: non-finite loss on rank 0, 1; stopping ...',
    becomes 'non-finite at iteration 7: non-finite loss on rank 0, 1'; other reasons are kept."""
    if reason and "FloatingPointError: " in reason:
        return "non-finite at " + reason.split("FloatingPointError: ", 1)[1].split("; ")[0]
    return reason


def _outcome(runs):
    """'2/2', or '1/2; s1: <reason>' naming the runs that did not converge."""
    bad = [f"s{r['seed']} {'failed: ' if r['status'] == 'failed' else ''}{brief(r['reason'])}"
           for r in runs if r["status"] != "converged"]
    text = f"{len(runs) - len(bad)}/{len(runs)}" + ("; " + "; ".join(bad) if bad else "")
    return text.replace("|", "/")


def table(results):
    """The paper's table form, one markdown row per setting with its seeds pooled: batch, ranks x images per
    pass (x passes), BN, BN size, lr, warmup; the seeds; AP and AP50 (mean over the seeds) and their spread
    (max - min); the mean training loss of the last epoch; converged runs / runs; mean time (training
    iterations only: no evaluation, no start-up)."""
    rows = ["| batch | ranks x images | BN | BN size | lr | warmup | seeds | AP | AP50 | spread AP / AP50 "
            "| loss | converged | time |",
            "|---:|---|---|---:|---:|---|---|---:|---:|---|---:|---|---:|"]
    for runs in by_setting(results).values():
        ap, ap50 = [r["AP"] for r in runs], [r["AP50"] for r in runs]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        rows.append(_describe(runs[0]) + f"| {seeds} | {fmt(_mean(ap))} | {fmt(_mean(ap50))} "
                    f"| {fmt(_spread(ap))} / {fmt(_spread(ap50))} "
                    f"| {fmt(_mean([r['final_loss'] for r in runs]), '.3g')} | {_outcome(runs)} "
                    f"| {fmt_time(_mean([r['train_time_s'] for r in runs]))} |")
    return "\n".join(rows) + "\n"


def run_table(results):
    """One markdown row per run: its name, AP, AP50, last-epoch loss, time, outcome."""
    rows = ["| run | AP | AP50 | loss | time | outcome |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        outcome = r["status"] + (f": {brief(r['reason'])}" if r["reason"] else "")
        rows.append(f"| {r['name']} | {fmt(r['AP'])} | {fmt(r['AP50'])} | {fmt(r['final_loss'], '.3g')} "
                    f"| {fmt_time(r['train_time_s'])} | {outcome.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def ap_by_epoch(runs):
    """[(epoch, mean AP, mean AP50, min AP50, max AP50)] over the seeds `runs`, at the epochs all of them
    evaluated."""
    epochs = sorted(set.intersection(*[{e["epoch"] for e in r["ap_by_epoch"]} for r in runs])) if runs else []
    rows = []
    for epoch in epochs:
        at = [next(e for e in r["ap_by_epoch"] if e["epoch"] == epoch) for r in runs]
        ap50 = [e["AP50"] for e in at]
        rows.append((epoch, _mean([e["AP"] for e in at]), _mean(ap50), min(ap50), max(ap50)))
    return rows


def epoch_table(results):
    """AP / AP50 (mean over the seeds) after each epoch, one markdown row per setting."""
    groups = by_setting(results)
    curves = {setting: ap_by_epoch(runs) for setting, runs in groups.items()}
    epochs = sorted({row[0] for rows in curves.values() for row in rows})
    rows = ["| setting | " + " | ".join(f"{e:g}" for e in epochs) + " |",
            "|---|" + "---:|" * len(epochs)]
    for setting, curve in curves.items():
        cells = {e: f"{ap:.1f} / {ap50:.1f}" for e, ap, ap50, _, _ in curve}
        rows.append(f"| {setting} | " + " | ".join(cells.get(e, "-") for e in epochs) + " |")
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


def mean_curve(curves):
    """Element-wise mean of equally spaced curves, as long as the shortest one."""
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def plot(results, out, blocks=None):
    """Draw under `out`, one panel per block [(title, setting names)] (default: one block of every setting):
    ap_by_epoch.png (AP and AP50 after each epoch, mean over the seeds, the band spanning the seeds' AP50),
    loss.png (training loss by epoch, moving average over a quarter epoch, mean over the seeds, log scale cut
    at 10x the starting loss) and lr.png (the lr schedule of each batch, lr scaling and warmup setting).
    Dashed: no warmup; dotted: unscaled lr."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_setting(results)
    blocks = [(title, [s for s in settings if s in groups]) for title, settings in blocks or [("", list(groups))]]
    marker = {"frozen": "x", "bn": "s", "cgbn": "o"}
    colour = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(groups)}  # one colour per setting

    def label(setting):
        diverged = sum(r["status"] == "diverged" for r in groups[setting])
        return setting + (f" ({diverged}/{len(groups[setting])} diverged)" if diverged else "")

    def style(r):
        return ":" if r["lr_scaling"] == "none" else "-" if r["warmup"] else "--"

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(Path(out) / name, dpi=80)
        plt.close(fig)

    fig, axes = plt.subplots(2, len(blocks), figsize=(4.8 * len(blocks), 7), squeeze=False)
    for col, (title, settings) in enumerate(blocks):
        for setting in settings:
            r0, curve = groups[setting][0], ap_by_epoch(groups[setting])
            epochs = [row[0] for row in curve]
            for row, metric in enumerate(("AP", "AP50")):
                axes[row][col].plot(epochs, [c[1 + row] for c in curve], linestyle=style(r0), color=colour[setting],
                                    marker=marker[r0["norm"]], label=label(setting))
                if row == 1 and len(groups[setting]) > 1:
                    axes[row][col].fill_between(epochs, [c[3] for c in curve], [c[4] for c in curve],
                                                color=colour[setting], alpha=0.15)
        for row, metric in enumerate(("AP", "AP50")):
            axes[row][col].set(xlabel="epoch", ylabel=f"bbox {metric} (%)", title=title)
            axes[row][col].grid(alpha=0.3)
        if settings:
            axes[0][col].legend(fontsize=7)
    save(fig, "ap_by_epoch.png")

    fig, axes = plt.subplots(1, len(blocks), figsize=(4.8 * len(blocks), 3.8), squeeze=False)
    first_losses = []
    for ax, (title, settings) in zip(axes[0], blocks):
        for setting in settings:
            runs = groups[setting]
            curves = [read_metrics(Path(out) / r["name"]) for r in runs]
            curves = [c for c in curves if c]
            if not curves:  # every seed failed before logging
                continue
            window = max(1, runs[0]["iters_per_epoch"] // 4)
            smooth = mean_curve([moving_average([x["loss"] for x in c], window) for c in curves])
            first_losses += [x for x in smooth[:1] if math.isfinite(x)]
            ax.plot([x["epoch"] for x in curves[0][:len(smooth)]], smooth, linestyle=style(runs[0]),
                    color=colour[setting], label=label(setting))
        ax.set(xlabel="epoch", title=title, yscale="log")
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (moving average)")
    if first_losses:  # an exploded loss would squash every other curve: cut the axis at 10x the start
        axes[0][0].set_ylim(top=10 * max(first_losses))
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    drawn = set()
    for r in results:
        key = (r["batch"], r["warmup"], r["lr_scaling"])
        rec = read_metrics(Path(out) / r["name"]) if key not in drawn else []
        if rec:
            drawn.add(key)
            label = (f"batch {r['batch']}" + ("" if r["warmup"] else ", no warmup")
                     + (", unscaled" if r["lr_scaling"] == "none" else ""))
            ax.plot([x["epoch"] for x in rec], [x["lr"] for x in rec], linestyle=style(r), label=label)
    ax.set(xlabel="epoch", ylabel="learning rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "lr.png")


def write_reports(results, out, grid_path, blocks=None):
    """results.json (with the blocks) and results.md (the table by setting, AP by epoch, the runs) under
    `out`, each written atomically."""
    out = Path(out)
    record = {"grid": str(grid_path), "blocks": blocks, "results": results}
    write_atomic(out / "results.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
    text = (f"Grid `{grid_path}`, {len(results)} runs.\n\n" + table(results)
            + "\nAP / AP50 after each epoch, mean over the seeds:\n\n" + epoch_table(results)
            + "\nEvery run:\n\n" + run_table(results))
    write_atomic(out / "results.md", lambda f: f.write(text.encode()))


def run_grid(runs, grid, out, grid_path, execute=execute, log=print, blocks=None):
    """Train every run not already done (see `is_done`), rewriting the reports after each; plot (one panel per
    block, see `plot`); return the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, run in enumerate(runs, 1):
        run_dir = out / run.name
        result = read_result(run_dir)
        if is_done(result, run):
            log(f"[{i}/{len(runs)}] {run.name}: done already ({result['status']}), skipped")
        else:
            split = f"{run.ranks} ranks x {run.ims_per_gpu} images" + (
                f" x {run.passes} passes" if run.passes > 1 else "")
            log(f"[{i}/{len(runs)}] {run.name}: {split}, lr {run.lr:g}, "
                f"{run.max_iter} iterations ({run.iters_per_epoch} per epoch) ...")
            result = train_run(run, run_dir, grid, execute)
            log(f"    {result['status']}" + (f": {result['reason']}" if result["reason"] else "")
                + f"; AP {fmt(result['AP'])}, AP50 {fmt(result['AP50'])}; {fmt_time(result['wall_s'])} wall")
        results.append(result)
        write_reports(results, out, grid_path, blocks)
    plot(results, out, blocks)
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
        runs, notes, blocks = expand(grid, f"grid file {args.grid}")
    except (ConfigError, DatasetError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out or grid.out)
    for note in notes:
        print(f"note: {note}")
    print(f"{len(runs)} runs, {grid.epochs:g} epochs each, into {out}")
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: batch {run.batch} = {run.ranks} x {run.ims_per_gpu} x {run.passes}, "
                  f"lr {run.lr:g}, {run.max_iter} iterations, warmup {run.warmup_iters}\n  "
                  + shlex.join(command(run, out / run.name, grid)))
        return 0
    t0 = time.perf_counter()
    results = run_grid(runs, grid, out, args.grid, blocks=blocks)
    failed = [r["name"] for r in results if r["status"] == "failed"]
    print(f"grid done in {fmt_time(time.perf_counter() - t0)}; reports in {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    # A plain `kill` of the runner stops the training it is running too (execute cleans up on SystemExit).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
