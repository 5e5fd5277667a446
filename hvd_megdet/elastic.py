"""Horovod elastic training: the trainer's loop goes on when workers are lost or added.

    horovodrun -np 8 --min-np 4 --max-np 16 --host-discovery-script ./discover_hosts.sh \
        python -m hvd_megdet.train --config CONFIG --elastic [--resume]

`run` wraps the trainer's loop in `hvd.elastic.run` with a `TrainingState` holding the model, the optimizer,
the fp16 loss scaler and the trainer's counters (the iteration, which is also the sampler position: the
training stream is a pure function of it and of the world size). The loop commits the state after every iteration. When a
worker dies, the others get a HorovodInternalError from their next collective, roll back to the last commit,
re-initialize Horovod with the workers left, run the reset callbacks (the trainer rebuilds the BN process
sets there: Horovod's re-initialization drops them) and call the loop again, which rebuilds the data loader
for the new rank and world size and takes the lr of the new global batch from the linear scaling rule. A
worker that joins does the trainer's set-up, then receives the state from rank 0.
"""
import os
import socket

import horovod.torch as hvd

from hvd_megdet import dist
from hvd_megdet.logs import log
from hvd_megdet.sync_bn import SyncBatchNorm


def in_elastic_job():
    """True in a worker started by `horovodrun --host-discovery-script ...` (elastic mode)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def set_process_set(model, process_set):
    """Point every cross-GPU BatchNorm of `model` at `process_set` (see sync_bn.bn_group)."""
    for module in model.modules():
        if isinstance(module, SyncBatchNorm):
            module.process_set = process_set


def describe_workers(before, after):
    """The log line for a (re)start on the workers whose hosts are `after` (one host name per worker, by
    rank), naming the hosts that left or joined since `before` (the same for the previous start, or [])."""
    line = f"elastic: {len(after)} workers on {', '.join(sorted(set(after)))}"
    if before:
        line += f" (was {len(before)})"
    line += "".join(f"; host {h} left" for h in sorted(set(before) - set(after)))
    return line + "".join(f"; host {h} joined" for h in sorted(set(after) - set(before)) if before)


class TrainingState(hvd.elastic.TorchState):
    """hvd.elastic.TorchState (model, optimizer, `counters` as attributes) that also carries `scaler`, the fp16
    GradScaler (None without fp16): its state is saved at each commit, put back on a rollback, and sent from
    rank 0 at each sync, like the rest. Else a worker that joins would start at another loss scale than the
    others; Horovod would average gradients scaled by different factors, each rank would unscale by its own,
    and the replicas would drift apart with no error."""

    def __init__(self, model, optimizer, scaler, **counters):
        self._scaler = scaler
        super().__init__(model=model, optimizer=optimizer,
                         loss_scaler=None if scaler is None else scaler.state_dict(), **counters)

    def save(self):
        if self._scaler is not None:
            self.loss_scaler = self._scaler.state_dict()
        super().save()

    def restore(self):
        super().restore()
        self._load_scaler()

    def sync(self):
        super().sync()
        self._load_scaler()

    def _load_scaler(self):
        if self._scaler is not None:
            self._scaler.load_state_dict(self.loss_scaler)


def run(loop, model, optimizer, scaler, on_reset, **counters):
    """Run `loop(state)` under Horovod elastic and return its result.

    state: a TrainingState with `model`, `optimizer` and `counters` as attributes (e.g. iteration=0,
    skipped=0), which also keeps `scaler` (fp16's GradScaler, or None) in step; `loop` calls
    `state.commit()` after each iteration. `on_reset()` runs on the surviving workers after Horovod is
    re-initialized for a new set of workers, before the state is synced. The model, optimizer and scaler must
    already hold their starting state on rank 0 (e.g. from a checkpoint): the first sync broadcasts them from
    there.
    """
    state = TrainingState(model, optimizer, scaler, **counters)
    # A failed step's pending gradient allreduces are dropped by the state's restore
    # (hvd.DistributedOptimizer.load_state_dict clears them).
    state.register_reset_callbacks([on_reset])
    hosts = []  # every worker's host at the last (re)start that this process took part in

    def loop_on_these_workers(state):
        # Horovod: every worker's host, to every worker; inside the elastic loop, where a failure resets.
        now = dist.gather_object(socket.gethostname(), name="elastic_hosts")
        log(describe_workers(hosts, now))
        hosts[:] = now
        return loop(state)

    return hvd.elastic.run(loop_on_these_workers)(state)
