"""Checkpoints: written atomically, loaded safely, the newest loadable one found for --resume.

A checkpoint is `<output_dir>/checkpoints/model_<iteration>.pth`, a dict of plain tensors and containers:
{"model", "optimizer", "iteration", "config", "categories" ([{"id", "name"}] of labels 1..K), "rng"}. It is
written to a temporary file in the same folder, flushed and fsynced, then renamed over the final name, so a
process killed mid-save never leaves a half-written checkpoint under a final name. Loading uses `torch.load(weights_only=True)`: pickles that are
not plain tensors and containers are refused. The trainer never saves non-finite weights (`first_nonfinite`).
"""
import os
import random
import re
import socket
from pathlib import Path

import torch

NAME = re.compile(r"^model_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not a checkpoint; the message names the file."""


def checkpoint_dir(output_dir):
    return Path(output_dir) / "checkpoints"


def _alive(pid):
    """Whether process `pid` of this host exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path, write):
    """Replace `path` atomically: `write(f)` fills a temporary binary file in the same folder, which is
    fsynced and renamed over `path`, then the folder is fsynced. A reader sees the old file or the new one,
    never part of one, even if the writer is killed. Used for checkpoints, evaluation results, the metrics
    log, predictions and exports (into folders users choose).

    The temporary file is `.<name>.write_atomic-<host>-<pid>`. Such files in the folder that a process of this
    host killed mid-write left behind (its pid no longer exists, or is this process's) are deleted first; any
    other file, a concurrent writer's temporary file included, is left alone. One thread per process writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mark = f".write_atomic-{socket.gethostname()}-"
    tmp = path.with_name(f".{path.name}{mark}{os.getpid()}")
    for stale in path.parent.glob(f".*{mark}*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            write(f)
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


def save(state, path):
    """Atomically write the checkpoint `state` to `path` (`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(state, f))


def load(path, map_location="cpu"):
    """Load a checkpoint or state dict with weights_only=True; raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated files and refused pickles
        first = (str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__) \
            + " (truncated, or not written by torch.save?)"
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


def restore(model, optimizer, state, path):
    """Load a training checkpoint's "model" (strictly) and "optimizer" entries into `model` and `optimizer`.

    The optimizer takes the checkpoint's state (momentum buffers) but keeps its own hyperparameters (weight
    decay, momentum, ...: the config's, which a resumed run may have changed); returns the ones that differ,
    e.g. ["param group 0 weight_decay 0.0001, was 0.0005"] (the lr, set every iteration, is left out).
    Raises CheckpointError naming the file when it is not a training checkpoint, or when it does not fit the
    model (another architecture or config: the message lists the missing, unexpected and differently
    shaped keys, five of each) or the optimizer.
    """
    if not (isinstance(state, dict) and {"model", "optimizer", "iteration"} <= state.keys()):
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint (needs 'model', 'optimizer' and "
                              f"'iteration' entries)")
    problems = mismatched_keys(model.state_dict(), state["model"])
    if problems:
        raise CheckpointError(f"checkpoint {path}: does not fit the model (another architecture or config?): "
                              + problems)
    model.load_state_dict(state["model"])
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None
    changed = []
    for i, (group, settings) in enumerate(zip(optimizer.param_groups, configured)):
        changed += [f"param group {i} {k} {v}, was {group.get(k)}" for k, v in settings.items()
                    if k != "lr" and group.get(k) != v]
        group.update(settings)
    return changed


def _is_counter(key):
    return key.endswith("num_batches_tracked")


def mismatched_keys(expected, saved, ignore_counters=False):
    """Why state dict `saved` does not load into one shaped like `expected`: "" when it fits, else
    "missing (n): [...]; unexpected (n): [...]; shape file vs model (n): [...]" with up to five keys of each,
    BatchNorm num_batches_tracked counters (the least telling keys) last, or left out with ignore_counters."""
    keep = (lambda k: not _is_counter(k)) if ignore_counters else (lambda k: True)
    problems = {"missing": [k for k in expected if k not in saved and keep(k)],
                "unexpected": [k for k in saved if k not in expected and keep(k)],
                "shape file vs model": [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
                                        for k, v in expected.items() if k in saved and saved[k].shape != v.shape]}
    return "; ".join(f"{what} ({len(keys)}): {sorted(keys, key=_is_counter)[:5]}"
                     for what, keys in problems.items() if keys)


def first_nonfinite(tree, prefix=""):
    """The dotted name of the first floating-point tensor in nested dicts/lists `tree` holding a NaN or
    infinity, or None (one reduction per tensor, one host sync in all)."""
    named = []

    def walk(node, name):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}")
        elif torch.is_tensor(node) and node.is_floating_point() and node.numel():
            named.append((name, node))

    walk(tree, prefix)
    if not named:
        return None
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).tolist()
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def rng_state():
    """This process's random number generators' states (torch, Python, CUDA), for a checkpoint's "rng"."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def path_for(output_dir, iteration):
    return checkpoint_dir(output_dir) / f"model_{iteration:07d}.pth"
