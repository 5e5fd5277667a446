"""No process outlives its job: whatever ends a rank, its data-loader processes (forkserver, workers) go with it.

Each test starts a 2-rank training (tests/tiny_run.py's `long_run`, one loader worker per rank) as a `Job`, whose
processes all carry a tag in their environment, ends it from outside as a scheduler or a failing node would, and
counts the tagged processes left.
"""
import signal

import pytest

from tests.tiny_run import Job, long_run

pytestmark = pytest.mark.multirank


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
