"""Distribution has one home: Horovod set-up, rank queries and the few collectives the trainer needs.

A process started without horovodrun is rank 0 of a world of 1 (Horovod handles that itself), so the
trainer, evaluator and tests run the same code single-process and under `horovodrun -np N`.
Every function here that communicates must be called by all ranks, in the same order.
"""
import os
import socket

import horovod.torch as hvd
import psutil
import torch


def init():
    """Initialise Horovod (with dynamic process sets, so BN groups can be registered once the size is known)."""
    hvd.init(process_sets="dynamic")


def rank():
    return hvd.rank()


def size():
    return hvd.size()


def local_rank():
    return hvd.local_rank()


def is_main():
    return hvd.rank() == 0


def device_for(requested):
    """The torch.device for this rank: 'auto' picks CUDA (this rank's local GPU) when available, else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA device")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        # Horovod: pin one GPU per process, by local rank.
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_sum(tensor, name):
    """Sum of `tensor` over all ranks (on CPU; returns a new tensor)."""
    return hvd.allreduce(tensor.cpu(), op=hvd.Sum, name=name)


def any_rank(flag, name):
    """True on every rank when `flag` is true on any rank (use it to fail or skip on all ranks together)."""
    return allreduce_sum(torch.tensor([float(bool(flag))]), name).item() > 0


def broadcast_object(obj, name, root_rank=0):
    """`obj` from `root_rank`, on every rank."""
    if hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)


def gather_object(obj, name):
    """The list of every rank's `obj` (all ranks receive it; the trainer only uses it on rank 0)."""
    if hvd.size() == 1:
        return [obj]
    return hvd.allgather_object(obj, name=name)


_peers = {"rank": None, "table": []}  # this rank and every rank's (host, pid), from record_peers()


def record_peers():
    """Gather every rank's (host, pid) once, so that a rank whose collective fails can tell which peer died.

    A collective: call it on all ranks, after init (not in elastic mode, where a late joiner must not run
    collectives outside the elastic loop).
    """
    _peers["rank"] = hvd.rank()
    _peers["table"] = gather_object((socket.gethostname(), os.getpid()), name="peers")


def _exited(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by the launcher
    except psutil.NoSuchProcess:
        return True


def lost_peer_message(error):
    """One line for a failed collective (Horovod's HorovodInternalError): this rank, and the rank(s) that
    died when they ran on this host (peers on other hosts cannot be checked from here: the launcher names
    them, e.g. horovodrun's "Process 2 exit with status code 137")."""
    host = socket.gethostname()
    lost = [r for r, (h, pid) in enumerate(_peers["table"]) if h == host and pid != os.getpid() and _exited(pid)]
    who = (f"rank {', '.join(map(str, lost))} {'has' if len(lost) == 1 else 'have'} exited" if lost else
           "another rank exited or the network failed (see the launcher's log for which rank exited first)")
    reason = str(error).strip().split(". ")[0] or error.__class__.__name__
    me = _peers["rank"]
    return f"{'rank ' + str(me) if me is not None else 'this rank'}: a collective failed: {who} ({reason})"


def torch_threads_per_rank():
    """CPU threads for one rank: the cores divided by the ranks on this host (avoids oversubscription)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores // max(1, hvd.local_size()))
