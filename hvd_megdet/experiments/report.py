"""The reports of a grid's results: results.json, and results.md with three markdown tables (the paper's table
with the seeds of a setting pooled, AP by epoch, one row per run). Pure functions of the result records but
`write_reports`."""
import json
from pathlib import Path

from hvd_megdet.checkpoint import write_atomic


def fmt_time(seconds):
    """A duration for people: minutes below an hour, else hours."""
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def fmt(value, spec=".1f"):
    """`value` formatted with `spec`, or "-" when it is None (a run that did not get that far)."""
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
    """The settings columns of a result: batch, ranks x images (x passes), BN, BN size, optimizer, lr, warmup."""
    norm = {"frozen": "frozen", "bn": "BN", "cgbn": "CGBN"}[r["norm"]]
    split = f"{r['ranks']} x {r['ims_per_gpu']}" + (f" x {r['passes']}" if r["passes"] > 1 else "")
    lr = f"{r['lr']:g}" + (" (unscaled)" if r["lr_scaling"] == "none" else "")
    warmup = f"{r['warmup_epochs']:g} ep ({r['warmup_iters']} it)" if r["warmup"] else "no"
    optimizer = r["optimizer"].upper()
    return f"| {r['batch']} | {split} | {norm} | {r['bn_images'] or '-'} | {optimizer} | {lr} | {warmup} "


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
    pass (x passes), BN, BN size, optimizer, lr, warmup; the seeds; AP and AP50 (mean over the seeds) and their spread
    (max - min); the mean training loss of the last epoch; converged runs / runs; mean time (training
    iterations only: no evaluation, no start-up)."""
    rows = ["| batch | ranks x images | BN | BN size | optimizer | lr | warmup | seeds | AP | AP50 "
            "| spread AP / AP50 | loss | converged | time |",
            "|---:|---|---|---:|---|---:|---|---|---:|---:|---|---:|---|---:|"]
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
