"""A rank that hangs without dying ends the job after `stall_limit` seconds, with one line naming it.

Two 2-rank trainings (tests/tiny_run.py's `Job`) with stall_limit=15: in one, rank 1 is stopped (SIGSTOP)
from outside mid-run; in the other, rank 1's data-loader worker blocks reading an image (a named pipe that
nobody writes, as a hung network filesystem would). Rank 0 waits in a collective; its watchdog's monitor asks
rank 1's where it is, prints the line and ends rank 0, and horovodrun the job; nothing of the job is left.
A third, smaller job has rank 0 wait in CGBN's backward on a thread other than the main one, as on GPU.
"""
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import time

import pytest

from hvd_megdet.data import CocoDetection
from hvd_megdet.data.sampler import TrainBatchSampler
from tests.harness import horovodrun
from tests.tiny_run import Job, long_run

pytestmark = pytest.mark.multirank
LIMIT = 15
# After the limit: a second or two for the monitors' check and answers, then horovodrun's 5 s grace before it
# SIGKILLs a stopped rank and 5 s more for that rank's shell; measured 20-27 s in all on 2 busy cores.
END_WITHIN = LIMIT + 25


def test_a_stopped_rank_ends_the_job_within_the_stall_limit_naming_it(shapes, tmp_path):
    with Job(tmp_path, long_run(shapes, tmp_path / "out", stall_limit=LIMIT)) as job:
        job.wait_iteration(2, tmp_path / "out")
        rank1 = job.rank(1)
        rank1.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert job.wait(END_WITHIN + 30) != 0
        took = time.monotonic() - stopped
        out = job.output()
        line = next((l for l in out.splitlines() if "error: rank 0: stalled: " in l), None)
        assert line is not None, out[-3000:]
        # Rank 0 waits in a collective, or is blocked in a Horovod call holding Python's lock (its monitor says).
        assert f"(stall_limit {LIMIT} s) in " in line
        assert line.endswith(f"holding it up: rank 1 is stopped: SIGSTOP, or a debugger "
                             f"(host {socket.gethostname()}, pid {rank1.pid})")
        assert took < END_WITHIN, f"the job ended {took:.0f} s after rank 1 stopped"
        # Then rank 0's threads, as faulthandler prints them: its main thread in the trainer's loop.
        stacks = out[out.index(line):]
        assert "rank 0's threads, from Python's faulthandler" in stacks
        assert "(most recent call first):" in stacks and 'hvd_megdet/train.py", line' in stacks
        assert job.left_after() == []


def image_only_rank_1_loads_at(root, iteration, world=2, ims_per_gpu=2):
    """The path of an image that rank 1 loads at `iteration` and that no rank loads before, nor rank 0 at
    `iteration` (the training stream of tests/tiny_run.py's `overrides`: seed 0)."""
    ds = CocoDetection(str(root / "train"), str(root / "annotations" / "instances_train.json"))
    streams = [TrainBatchSampler(ds.aspect_ratios, ims_per_gpu, r, world, seed=0) for r in range(world)]
    earlier = {i for b in itertools.islice(streams[1], iteration) for i in b}
    earlier |= {i for b in itertools.islice(streams[0], iteration + 1) for i in b}
    batch = next(itertools.islice(streams[1], iteration, None))
    return ds.image_path(next(i for i in batch if i not in earlier))


def test_a_rank_stuck_in_its_data_loader_is_named_with_where_it_waits(shapes, tmp_path):
    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    fifo = image_only_rank_1_loads_at(data, iteration=2)
    os.remove(fifo)
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: none will
    with Job(tmp_path, long_run(data, tmp_path / "out", stall_limit=LIMIT)) as job:
        assert job.wait(120) != 0
        out = job.output()
        line = next((l for l in out.splitlines() if "error: rank 0: stalled" in l), None)
        assert line is not None, out[-3000:]
        assert f"rank 1 runs outside any collective (host {socket.gethostname()}, pid" in line
        assert "next_batch" in line  # where rank 1's main thread waits for its batch
        assert job.left_after() == []


# Both ranks run a CGBN layer's forward; then rank 1 hangs before its backward, and asks meanwhile what rank 0
# does (what a third rank's monitor would read when naming the ranks that hold the job up).
BACKWARD_OFF_THE_MAIN_THREAD = """
import json, os, sys, threading, time
import horovod.torch as hvd, torch
from hvd_megdet.sync_bn import SyncBatchNorm
from hvd_megdet.watchdog import Watchdog, probe

hvd.init()
dog = Watchdog(limit=float(sys.argv[1]))
peers = hvd.allgather_object(dog.card())
dog.start(hvd.rank(), peers)
y = SyncBatchNorm(3)(torch.randn(4, 3, 5, requires_grad=True))
if hvd.rank() == 1:
    print("rank 1 pid", os.getpid(), flush=True)
    for _ in range(40):
        view = probe(peers[0]["address"], peers[0]["port"])[1]
        if view["status"] and view["status"]["collective"]:
            break
        time.sleep(0.1)
    print("rank 0 seen from rank 1:", json.dumps(view["status"]), flush=True)
    time.sleep(60)
backward = threading.Thread(target=y.sum().backward)  # on GPU, autograd runs it on a device thread
backward.start()
backward.join()
"""


def test_a_wait_in_a_backward_off_the_main_thread_is_a_stall_naming_the_rank_that_holds_it_up():
    limit = 8
    out = horovodrun(2, [sys.executable, "-c", BACKWARD_OFF_THE_MAIN_THREAD, limit], timeout=120).stdout
    pid = re.search(r"rank 1 pid (\d+)", out).group(1)
    seen = json.loads(re.search(r"rank 0 seen from rank 1: (.*)", out).group(1))
    assert seen["collective"] == "sync_bn.0.grad off the main thread", out[-3000:]
    line = re.search(rf"error: rank 0: stalled: waited \d+ s \(stall_limit {limit} s\) in (.*?); holding it up: (.*)",
                     out)
    assert line is not None, out[-3000:]
    assert line.group(1) == "sync_bn.0.grad off the main thread"
    assert line.group(2).startswith(f"rank 1 runs outside any collective (host {socket.gethostname()}, pid {pid}) at ")
