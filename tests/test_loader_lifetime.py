"""No process outlives its job: whatever ends a rank, its data-loader processes (forkserver, workers) go with it.

Each test starts a 2-rank training (tests.test_faults' tiny run, one loader worker per rank) whose processes all
carry a tag in their environment (horovodrun passes its environment to the ranks, and the loader processes
inherit it), ends it from outside as a scheduler or a failing node would, and counts the tagged processes left.
`Job` is also what tests/test_stall.py runs.
"""
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from hvd_megdet.data.synthetic import make_dataset
from tests.harness import HOROVODRUN, REPO
from tests.test_faults import CONFIG, overrides

pytestmark = pytest.mark.multirank
TAG = "HVD_MEGDET_TEST_JOB"


class Job:
    """`horovodrun -np 2 -H localhost:2 --gloo python -m hvd_megdet.train --config CONFIG ARGV` in the
    background, its output in `tmp_path/job.log`; every process of the job carries TAG=<its own id>. Use it as
    a context manager: on leaving, whatever of the job still runs is killed."""

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


def long_run(data, out, **extra):
    """Overrides for a 2-rank run that goes on until it is ended, one loader worker per rank."""
    return overrides(data, out, **{"solver.max_iter": 10000, "solver.steps": "[9000]", "checkpoint_period": 10000,
                                   "data.num_workers": 1, **extra})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(str(root), num_train=16, num_val=4, seed=1)
    return root


def test_a_cancelled_job_leaves_no_process(shapes, tmp_path):
    """SIGTERM to horovodrun, as a scheduler's cancel does: the ranks end, and their loader processes too."""
    with Job(tmp_path, long_run(shapes, tmp_path / "out")) as job:
        job.wait_iteration(2, tmp_path / "out")
        assert all(len(job.processes(r)) >= 3 for r in (0, 1))  # the rank, its forkserver and its worker
        job.launcher.send_signal(signal.SIGTERM)
        job.wait(60)
        assert job.left_after() == []


def test_a_killed_rank_takes_its_loader_processes_with_it(shapes, tmp_path):
    """SIGKILL of rank 1 (the OOM killer's way): horovodrun ends rank 0; nothing of either rank is left."""
    with Job(tmp_path, long_run(shapes, tmp_path / "out")) as job:
        job.wait_iteration(2, tmp_path / "out")
        assert len(job.processes(1)) >= 3
        job.rank(1).kill()
        assert job.wait(60) != 0
        assert job.left_after() == []
