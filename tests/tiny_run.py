"""The tiny 2-rank training that the fault tests run (tests/test_faults.py, test_loader_lifetime.py,
test_stall.py, test_elastic.py), and ways to run it:

    overrides(data, out, **extra)      # config overrides of a 6-iteration run on 96-px images
    long_run(data, out, **extra)       # the same, going on until it is ended, one loader worker per rank
    records(out)                       # out/metrics.jsonl, one dict per iteration
    train_killed_when(condition)       # source for `python -c`: the trainer, killing itself when ...
    with Job(tmp_path, argv) as job:   # horovodrun -np 2 ... hvd_megdet.train in the background

The data set is conftest.py's `shapes` fixture.
"""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.harness import HOROVODRUN, REPO

CONFIG = REPO / "configs" / "demo_shapes.yaml"
TAG = "HVD_MEGDET_TEST_JOB"


def overrides(data_root, out, **extra):
    """A tiny 2-rank run: 96-px images, few proposals, no workers, no evaluation, a checkpoint every 2.
    Everything the tests' expectations depend on is set here, not taken from the demo config."""
    items = {
        "model.backbone": "resnet_tiny", "model.norm": "cgbn", "model.bn_group_size": 0,
        "model.anchor_sizes": "[16, 32, 64, 128, 256]", "device": "cpu", "seed": 0,
        "solver.base_lr": 0.02, "solver.base_batch": 16, "solver.warmup_factor": 0.01, "solver.nonfinite": "skip",
        "data.train.images": data_root / "train",
        "data.train.annotations": data_root / "annotations" / "instances_train.json",
        "data.val.annotations": "", "data.num_workers": 0, "output_dir": out,
        "input.min_size": "[96]", "input.max_size": 128,
        "model.rpn_pre_nms_top_n_train": 100, "model.rpn_post_nms_top_n_train": 50,
        "model.box_batch_size_per_image": 32,
        "solver.ims_per_gpu": 2, "solver.max_iter": 6, "solver.warmup_iters": 2, "solver.steps": "[4]",
        "checkpoint_period": 2, "log_period": 1,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def long_run(data, out, **extra):
    """Overrides for a 2-rank run that goes on until it is ended, one loader worker per rank."""
    return overrides(data, out, **{"solver.max_iter": 10000, "solver.steps": "[9000]", "checkpoint_period": 10000,
                                   "data.num_workers": 1, **extra})


def records(out):
    """The training records of the run in `out` (metrics.jsonl), one dict per iteration."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_killed_when(condition):
    """Source for `python -c`: hvd_megdet.train's main in a process that SIGKILLs itself just before loading
    a batch when `condition` holds (an expression of `hvd`, `os` and `calls[0]`, the batches loaded so far)."""
    return f"""
import os, signal, sys
import horovod.torch as hvd
import hvd_megdet.train as trainer
fetch, calls = trainer.next_batch, [0]
def next_batch(data_iter):
    if {condition}:
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
    return fetch(data_iter)
trainer.next_batch = next_batch
trainer.main(sys.argv[1:])
"""


class Job:
    """`horovodrun -np 2 -H localhost:2 --gloo python -m hvd_megdet.train --config CONFIG ARGV` in the
    background, its output in `tmp_path/job.log`; every process of the job carries TAG=<its own id> in its
    environment (horovodrun passes its environment to the ranks, and the loader processes inherit it). Use it
    as a context manager: on leaving, whatever of the job still runs is killed."""

    def __init__(self, tmp_path, argv):
        self.tag, self.log = uuid.uuid4().hex, tmp_path / "job.log"
        cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo",
               sys.executable, "-m", "hvd_megdet.train", "--config", str(CONFIG), *map(str, argv)]
        env = dict(os.environ, PYTHONPATH=str(REPO), **{TAG: self.tag})
        with open(self.log, "w") as out:
            self.launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                             start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.processes():
            p.kill()
        self.launcher.wait()

    def output(self):
        return self.log.read_text()

    def processes(self, rank=None):
        """The job's live processes (of one rank, with its loader processes, when `rank` is given)."""
        found = []
        for p in psutil.process_iter():
            try:
                env = p.environ()
                if env.get(TAG) == self.tag and p.status() != psutil.STATUS_ZOMBIE and \
                        (rank is None or env.get("HOROVOD_RANK") == str(rank)):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    def rank(self, rank):
        """The process of rank `rank` (its loader processes run other commands)."""
        return next(p for p in self.processes(rank) if p.cmdline()[1:3] == ["-m", "hvd_megdet.train"])

    def wait_iteration(self, iteration, out, timeout=120):
        """Wait until rank 0 has recorded `iteration` in `out`/metrics.jsonl."""
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + timeout
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= iteration):
            assert self.launcher.poll() is None, f"the job ended before iteration {iteration}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no iteration {iteration} after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def wait(self, timeout):
        """The launcher's exit status; fails the test if it runs past `timeout` seconds."""
        try:
            return self.launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {timeout} s later:\n{self.output()[-3000:]}", pytrace=False)

    def left_after(self, timeout=10):
        """The job's processes still alive `timeout` seconds from now (loader workers check every second)."""
        deadline = time.monotonic() + timeout
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in self.processes()]
