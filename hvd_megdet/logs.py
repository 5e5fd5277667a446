"""What rank 0 tells the user: log lines (stdout and `<output_dir>/log.txt`), and the training metrics.

    log("world size 2 ...")              # rank 0 prints it, and appends it to log.txt once log_to_file() was called
    writer = MetricsWriter(out, start_iter=0, max_iter=600, log_period=20)
    writer.write({"iteration": 1, "lr": 0.04, "loss": 2.1, "time": 0.8, ...})

Every other rank stays silent; errors are the exception: each rank prints its own `error: ...` line on exit,
and so are warnings about a rank's own work (`warn`; `warn_once` for what every rank finds alike).
"""
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hvd_megdet import dist
from hvd_megdet.checkpoint import write_atomic

_log_file = {"handle": None, "pending": []}  # lines logged before log_to_file() wait in "pending"


def log(*args):
    """Print on rank 0 only (through tqdm, so a progress bar stays intact), and append to the log file."""
    if not dist.is_main():
        return
    line = " ".join(str(a) for a in args)
    tqdm.write(line, file=sys.stdout)
    stamped = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n"
    if _log_file["handle"] is None:
        _log_file["pending"].append(stamped)
    else:
        _log_file["handle"].write(stamped)
        _log_file["handle"].flush()


def warn(message):
    """Print one line `warning: <message>` on stderr, on whichever rank calls it (each rank about its own work)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def warn_once(message):
    """`warn` on rank 0 only: for what every rank finds alike (the same checkpoint, the same input files)."""
    if dist.is_main():
        warn(message)


def log_to_file(path):
    """From now on, rank 0 also appends every logged line to `path` (a resumed run appends to the same file),
    starting with the lines logged so far by this process."""
    if dist.is_main():
        if _log_file["handle"] is not None:  # an earlier run in this process (tests, the ablation runner)
            _log_file["handle"].close()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _log_file["handle"] = open(path, "a")
        _log_file["handle"].writelines(_log_file["pending"])
        _log_file["handle"].flush()
    _log_file["pending"].clear()


def _kept_records(path, start_iter):
    """The lines of metrics file `path` for iterations <= start_iter (a resumed run writes the later ones again,
    and a killed run may have left a partial last line)."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] <= start_iter:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return kept


class MetricsWriter:
    """Rank 0's record of training under `output_dir`: `metrics.jsonl` (one JSON line per iteration, flushed,
    so a killed run leaves whole lines), TensorBoard scalars under `tb/`, and the progress a person reads: a
    progress bar on a terminal, else (under horovodrun, output piped) a line every `log_period` iterations
    with the losses, the lr, images/s, the time left and, on CUDA, the peak GPU memory."""

    def __init__(self, output_dir, start_iter, max_iter, log_period):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.metrics = self.tb = None
        self.max_iter, self.log_period = max_iter, log_period
        self.recent = collections.deque(maxlen=20)  # seconds per iteration, for the time left
        self.bar = tqdm(total=max_iter, initial=start_iter, dynamic_ncols=True, disable=not sys.stderr.isatty())
        self.rewind(start_iter)

    def rewind(self, iteration):
        """Continue after `iteration`: metrics.jsonl keeps the records up to it (a resumed or rolled-back run
        writes the later ones again; a killed run may have left a partial last line), and TensorBoard drops
        its events of later steps (purge_step), so no curve shows an iteration twice."""
        from torch.utils.tensorboard import SummaryWriter

        if self.metrics is not None:
            self.metrics.close()
            self.tb.close()
        kept = _kept_records(self.path, iteration)
        write_atomic(self.path, lambda f: f.write("".join(kept).encode()))
        self.metrics = open(self.path, "a")
        self.tb = SummaryWriter(str(self.path.with_name("tb")), purge_step=iteration + 1)
        self.bar.n = iteration

    def write(self, record, images_per_iteration):
        """Record one training iteration: `record` holds "iteration" (done), "epoch", "lr", the losses (with
        "loss", their sum) and "time" (seconds, data included)."""
        done = record["iteration"]
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.recent.append(record["time"])
        self.bar.update(1)
        self.bar.set_postfix(lr=f"{record['lr']:.4g}", loss=f"{record['loss']:.3f}")
        if done % self.log_period and done != self.max_iter:
            return
        if self.bar.disable:
            seconds = statistics.median(self.recent)
            losses = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("loss"))
            memory = (f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G" if torch.cuda.is_available() else "")
            log(f"iter {done}/{self.max_iter} epoch {record['epoch']:.2f} lr {record['lr']:.4g} {losses} "
                f"time {record['time']:.2f}s data {record['data_time']:.2f}s "
                f"{images_per_iteration / seconds:.1f} img/s eta {_duration((self.max_iter - done) * seconds)}"
                + memory)
        for k, v in record.items():
            if k != "iteration":
                self.tb.add_scalar(f"train/{k}", v, done)

    def write_eval(self, iteration, metrics, group="bbox"):
        """TensorBoard scalars of an evaluation's metrics (the detector's bbox AP, or another `group`)."""
        for k, v in metrics.items():
            self.tb.add_scalar(f"{group}/{k}", v, iteration)

    def close(self):
        self.bar.close()
        self.metrics.close()
        self.tb.close()


def _duration(seconds):
    """'1h02m', '4m05s' or '12s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
