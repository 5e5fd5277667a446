"""MegDet's ablations as a grid of real trainings: batch x norm x warmup x BN size x seed, same epochs each.

    python -m hvd_megdet.experiments.ablation --grid configs/ablation/shapes_megdet.yaml [--out DIR] [--dry-run]
        [--import-results docs/results/shapes_large_batch.json]   # count another copy's finished runs as done

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
        optimizer: [sgd, lars]       # solver.optimizer
        base_lr: [0.02, 0.04]        # solver.base_lr; default (omitted): the base config's
        warmup_epochs: [0.5, 2]      # warmup length when warmup is on; default (omitted): the grid's
        seed: [0, 1]                 # the trainer's seed (initial weights, data order, augmentation)
        ranks: 0                     # 0: batch / (ims_per_gpu x passes) ranks; else this many ranks, each
                                     # with batch / (ranks x passes) images per pass
        backward_passes_per_step: 1  # gradient accumulation: passes per optimizer step

The lr of each run is MegDet's linear scaling rule, computed by the trainer itself from base_lr x batch /
base_batch (`lr_scaling: none` sets the trainer's base_batch to the run's batch, so its lr is base_lr: the
unscaled control); the runner computes it too, only for the table. One epoch is the trainer's epoch length
(ceil(images / batch) iterations); runs evaluate once per epoch, which gives the AP-by-epoch curves.

Expansion: `frozen` and `bn` runs ignore bn_group_size (one run each); a CGBN group size that does not divide
the ranks is skipped, and CGBN over groups of one rank is per-rank BN, so it becomes (and merges with) `bn`;
`lr_scaling: none` at batch = base_batch is the linear run. A run in several blocks trains once and is drawn in
each. "BN size" is the number of images the statistics are computed over: the images of one backward pass of
one rank for bn, of the ranks of a group for CGBN. Run names say all of it: b64_4x2x8_cgbn4_warmup_s1 is
batch 64 on 4 ranks x 2 images x 8 passes, CGBN over 4 images, with warmup, seed 1; b64_2x32_cgbn64_warmup2ep_lars_lr0.04_s0
adds a 2-epoch warmup, LARS and a base lr of 0.04 (what differs from the defaults).

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
epoch, and one row per run; so are ap_by_epoch.png, loss.png (one panel per block) and lr.png.
Exit status 1 when a run failed.
"""
import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

from hvd_megdet.config import ConfigError
from hvd_megdet.data import DatasetError
from hvd_megdet.experiments.grid import expand, load_grid
from hvd_megdet.experiments.plots import plot
from hvd_megdet.experiments.report import fmt, fmt_time, write_reports
from hvd_megdet.experiments.runs import command, execute, is_done, read_result, train_run, write_result


def run_grid(runs, grid, out, grid_path, execute=execute, log=print, blocks=None):
    """Train every run not already done (see `is_done`), rewriting the reports and the plots (one panel per
    block, see `plot`) after each; return the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Runs done by an earlier call are in the reports from the start, not only once the loop reaches them: a
    # resumed grid's results.json never holds fewer runs than it did.
    finished = {run.name: result for run in runs if is_done(result := read_result(out / run.name), run)}
    for i, run in enumerate(runs, 1):
        if run.name in finished:
            log(f"[{i}/{len(runs)}] {run.name}: done already ({finished[run.name]['status']}), skipped")
        else:
            split = f"{run.ranks} ranks x {run.ims_per_gpu} images" + (
                f" x {run.passes} passes" if run.passes > 1 else "")
            log(f"[{i}/{len(runs)}] {run.name}: {split}, lr {run.lr:g}, "
                f"{run.max_iter} iterations ({run.iters_per_epoch} per epoch) ...")
            result = finished[run.name] = train_run(run, run_dir=out / run.name, grid=grid, execute=execute)
            log(f"    {result['status']}" + (f": {result['reason']}" if result["reason"] else "")
                + f"; AP {fmt(result['AP'])}, AP50 {fmt(result['AP50'])}; {fmt_time(result['wall_s'])} wall")
        so_far = [finished[r.name] for r in runs if r.name in finished]
        # after every run, so that a grid that runs for days shows its curves so far
        write_reports(so_far, out, grid_path, blocks)
        plot(so_far, out, blocks)
    return [finished[r.name] for r in runs]


def import_results(path, runs, out, log=print):
    """Take the finished runs of another copy of this grid, its results.json at `path` (e.g. one committed
    beside a doc): every record that `is_done` for a run of `runs` whose folder under `out` has no result
    becomes that run's result.json, so the grid skips it. Their training logs do not come along (the loss
    and lr plots leave them out). Returns the names imported."""
    try:
        records = {r["name"]: r for r in json.loads(Path(path).read_text())["results"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--import-results {path}: not a grid's results.json ({e.__class__.__name__}: {e})")
    imported = []
    for run in runs:
        record, run_dir = records.get(run.name), out / run.name
        if is_done(record, run) and read_result(run_dir) is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_result(run_dir, record)
            imported.append(run.name)
    log(f"imported {len(imported)} finished runs from {path}" + (f": {', '.join(imported)}" if imported else ""))
    return imported


def parse_args(argv=None):
    """The command's arguments: --grid, --out, --dry-run, --import-results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="grid YAML file")
    parser.add_argument("--out", help="output folder (default: the grid's `out`)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, train nothing")
    parser.add_argument("--import-results", metavar="RESULTS_JSON",
                        help="count the finished runs of this results.json (same settings) as done")
    return parser.parse_args(argv)


def main(argv=None):
    """Expand the grid, then print the runs (--dry-run) or train them (`run_grid`); the exit status."""
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
    if args.import_results:
        try:
            import_results(args.import_results, runs, out)
        except ConfigError as e:
            sys.exit(f"error: {e}")
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
