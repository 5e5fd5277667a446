"""Checkpoints: written atomically, loaded safely, the newest loadable one found for --resume.

A checkpoint is `<output_dir>/checkpoints/model_<iteration>.pth`, a dict of plain tensors and containers:
{"model", "optimizer", "iteration", "config", "rng"}. It is written to a temporary file in the same folder,
flushed and fsynced, then renamed over the final name, so a process killed mid-save never leaves a
half-written checkpoint under a final name. Loading uses `torch.load(weights_only=True)`: pickles that are
not plain tensors and containers are refused.
"""
import os
import re
from pathlib import Path

import torch

NAME = re.compile(r"^model_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not a checkpoint; the message names the file."""


def checkpoint_dir(output_dir):
    return Path(output_dir) / "checkpoints"


def save(state, path):
    """Atomically write `state` to `path` (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path, map_location="cpu"):
    """Load a checkpoint or state dict with weights_only=True; raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated files and refused pickles
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if "Weights only load failed" in str(e):
            first = "refused: it holds objects other than tensors and plain containers (weights_only=True)"
        raise CheckpointError(f"checkpoint {path}: cannot load: {first}") from None


def iteration_of(path):
    """The iteration a checkpoint file name records, or None for other files."""
    m = NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def candidates(output_dir):
    """Checkpoint files under output_dir, newest iteration first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(iteration_of(p), p) for p in folder.iterdir() if iteration_of(p) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def latest(output_dir, log=print):
    """The newest checkpoint under output_dir that loads, as (path, state); (None, None) if there is none.

    Checkpoints that fail to load (e.g. truncated by a crash outside this writer) are reported and skipped.
    """
    for path in candidates(output_dir):
        try:
            return path, load(path)
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None, None


def path_for(output_dir, iteration):
    return checkpoint_dir(output_dir) / f"model_{iteration:07d}.pth"
