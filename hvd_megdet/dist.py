"""Distribution has one home: Horovod set-up, CGBN groups' process sets, the distributed optimizer, rank queries
and the few collectives the trainer needs.

A process started without horovodrun is rank 0 of a world of 1 (Horovod handles that itself), so the
trainer, evaluator and tests run the same code single-process and under `horovodrun -np N`.
Every function here that communicates must be called by all ranks, in the same order.
"""
import atexit
import contextlib
import faulthandler
import os
import socket
import sys
import threading
from typing import NamedTuple

import horovod.torch as hvd
import torch

from hvd_megdet.config import ConfigError
from hvd_megdet.solver import build_optimizer, global_batch, scaled_lr
from hvd_megdet.sync_bn import bn_group, bn_process_sets
from hvd_megdet.watchdog import Watchdog

_watchdog = {"dog": None}  # this rank's Watchdog, started by init() in a non-elastic job of several ranks


class BNGroups(NamedTuple):
    """CGBN groups of `size` consecutive ranks (model.bn_group_size; 0 = all ranks) and how Horovod knows
    their process sets: the one place that decides both. `bn_groups` makes it before hvd.init, `init` registers
    what it says and returns it, and `process_set` gives this rank's set, at start-up and after each elastic
    reset."""
    size: int
    elastic: bool  # the world size may change: groups are registered again after each reset
    dynamic: bool  # hvd.init(process_sets="dynamic"): `process_set` registers the groups after init
    static: tuple  # the process sets hvd.init registers (empty: none)

    def process_set(self, report):
        """This rank's process set (sync_bn.bn_group) in the world Horovod has now; call it on every rank, once
        after init and once after each elastic reset. A size that does not divide the world size is a
        ConfigError; in elastic mode, where the world size changes, the largest divisor of the world size below
        it is used instead, and `report` (a log function) says so. Elastic mode reports the groups."""
        world = hvd.size()
        k = self.size or world
        if world % k:
            if not self.elastic:
                raise ConfigError(f"model.bn_group_size={self.size} does not divide the world size {world}")
            k = max(d for d in range(1, min(k, world) + 1) if world % d == 0)
            report(f"warning: model.bn_group_size={self.size} does not divide the world size {world}")
        if self.elastic:
            report(f"BN groups of {k} of the {world} ranks")
        return bn_group(k, list(self.static) or None)


def bn_groups(size, elastic, world):
    """The BNGroups of CGBN groups of `size` ranks (0 = all) in a world of `world` ranks (0: not known before
    hvd.init).

    Process sets cost synchronization in every collective (Horovod's docs), dynamic ones the most, so: none
    (plain hvd.init()) when the groups span the world or are single ranks; static sets, registered at init, for
    groups in between; dynamic ones only in elastic mode, where the world size changes, or when the world size
    is not known before init (mpirun). A size that does not divide the world gets no set here and is refused
    by `BNGroups.process_set`, on every rank.
    """
    if elastic or (not world and size > 1):
        return BNGroups(size, elastic, dynamic=True, static=())
    if size in (0, 1, world) or world % size:
        return BNGroups(size, elastic, dynamic=False, static=())
    return BNGroups(size, elastic, dynamic=False, static=tuple(bn_process_sets(size, world)))


def init(stall_limit=0, elastic=False, bn_group_size=0):
    """Initialise Horovod, with the process sets that CGBN groups of `bn_group_size` ranks (0 = all) need
    (`bn_groups`, from the world size horovodrun exports, HOROVOD_SIZE); returns that BNGroups, which gives
    this rank's process set.

    In a job of several ranks that is not elastic, also start this rank's watchdog (hvd_megdet.watchdog): it
    names the ranks that exited or hang when a collective fails, and with `stall_limit` > 0 ends the job,
    naming the rank that holds it up, once a collective has waited that many seconds. A collective then:
    every rank must call init at the same point. Elastic mode runs no collective outside its loop, and
    Horovod's elastic driver handles lost workers itself.

    The watchdog needs Horovod, so init itself has a plainer limit, outside elastic mode: with `stall_limit` > 0
    a rank whose init has not returned after that many seconds prints one line naming itself and ends (exit 1),
    and the launcher ends the others (`startup_limit`).
    """
    # A crash in native code (Horovod, Gloo, torch) prints every thread's Python stack before the process dies
    # (to the process's own stderr: sys.stderr may be replaced by an object without a file descriptor).
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    groups = bn_groups(bn_group_size, elastic, int(os.environ.get("HOROVOD_SIZE", 0)))  # 0: not known yet
    # An elastic worker added mid-job waits in init until the others reach their next reset: no limit there.
    with startup_limit(0 if elastic else stall_limit):
        if groups.dynamic:
            hvd.init(process_sets="dynamic")
        elif groups.static:
            hvd.init(process_sets=list(groups.static))
        else:
            hvd.init()
        if hvd.size() == 1 or elastic:
            return groups
        if _watchdog["dog"] is None:  # once per process: the first call's stall_limit holds
            dog = Watchdog(stall_limit)
            # Horovod: every rank's host, pid and the address of its watchdog's monitor, to every rank.
            dog.start(hvd.rank(), gather_object(dog.card(), name="watchdog_peers"))
            _watchdog["dog"] = dog
    return groups


# Where launchers put a process's rank before Horovod knows it: horovodrun, OpenMPI, PMI/PMIx (MPICH, srun).
_LAUNCHER_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


@contextlib.contextmanager
def startup_limit(seconds):
    """End this process (exit 1) with one line naming its rank, host and pid when the block has not finished
    after `seconds` (0: no limit).

    For hvd.init and the first gather after it, which the watchdog cannot watch: a rank that never started,
    or a transport that cannot connect (OpenMPI's TCP transport pairing several network interfaces has hung
    there, open-mpi/ompi#4963), would otherwise hold every rank in init for ever. hvd.init releases Python's
    lock while it waits, so a timer thread runs.
    """
    if not seconds:
        yield
        return
    rank = next((os.environ[name] for name in _LAUNCHER_RANK_VARIABLES if name in os.environ), "?")

    def end():
        print(f"error: rank {rank} (host {socket.gethostname()}, pid {os.getpid()}): Horovod's start-up did not "
              f"finish in {seconds:g} s (stall_limit): a rank did not start, or the ranks cannot connect "
              "(with several network interfaces, name one: horovodrun --network-interface)",
              file=sys.__stderr__, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def exit_skipping_native_teardown(code=0):
    """Exit as Python does (wait for non-daemon threads, run the atexit handlers: Horovod's shutdown, the data
    loaders' processes, open files), but skip the interpreter's teardown and C++'s static destructors after it.

    In them a finished rank sometimes aborted ("terminate called without an active exception", exit 134: a
    std::thread destroyed while joinable, with no Python frame left), and horovodrun then failed a job whose
    results were all written (seen three times here, in 3- and 4-rank jobs).
    """
    threading._shutdown()  # what Py_Finalize does first; private, but the only way to ask for it
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def distributed_optimizer(model, solver, name_prefix=""):
    """SGD for `model` at the lr of the global batch (MegDet's linear scaling rule, solver.scaled_lr), wrapped
    in hvd.DistributedOptimizer: gradients averaged over the ranks by allreduce during the backward pass, as
    each becomes ready (or, with solver.allreduce_groups = k, in k groups, each once all its gradients are),
    after solver.backward_passes_per_step passes. `name_prefix` keeps the allreduce names of several models
    in one process apart."""
    lr = scaled_lr(solver.base_lr, solver.base_batch, global_batch(solver, size()))
    return hvd.DistributedOptimizer(
        build_optimizer(model, solver, lr),
        named_parameters=[(name_prefix + name, p) for name, p in model.named_parameters()],
        compression=hvd.Compression.fp16 if solver.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=solver.backward_passes_per_step, num_groups=solver.allreduce_groups)


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


def peers():
    """Every rank's (host, pid), by rank, as gathered by init; [] in a world of 1 or an elastic job."""
    dog = _watchdog["dog"]
    return [(card["host"], card["pid"]) for card in dog.peers] if dog is not None else []


def lost_peer_message(error):
    """One line for a failed collective (Horovod's HorovodInternalError): this rank, and the ranks that exited,
    are unreachable or do not answer, on any host (asked through their watchdogs: a few seconds at most)."""
    dog = _watchdog["dog"]
    who = (dog.lost_peers() if dog is not None else "") or \
        "another rank exited or the network failed (see the launcher's log for which rank exited first)"
    reason = str(error).strip().split(". ")[0] or error.__class__.__name__
    return f"{'rank ' + str(dog.rank) if dog is not None else 'this rank'}: a collective failed: {who} ({reason})"


def torch_threads_per_rank():
    """CPU threads for one rank: the cores divided by the ranks on this host (avoids oversubscription)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores // max(1, hvd.local_size()))
