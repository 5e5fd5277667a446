"""The plots of a grid's results: ap_by_epoch.png, loss.png (one panel per block of the grid) and lr.png, drawn
from the result records and the trainer's metrics.jsonl of each run."""
import math
from pathlib import Path

from hvd_megdet.experiments.report import ap_by_epoch, by_setting
from hvd_megdet.experiments.runs import read_metrics


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
    if ax.lines:  # none when every run was imported without its training log
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

