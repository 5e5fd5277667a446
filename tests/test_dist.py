"""dist: Horovod's set-up on real ranks: which process sets CGBN groups get."""
import subprocess
import sys

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.multirank


def _init_rank(bn_group_size):
    import horovod.torch as hvd
    import torch

    from hvd_megdet import dist
    from hvd_megdet.train import bn_process_set

    dist.init(bn_group_size=bn_group_size)
    try:
        hvd.add_process_set([0])
        dynamic = True
    except Exception:  # Horovod refuses new sets unless initialised with dynamic process sets
        dynamic = False
    group = bn_process_set(bn_group_size, elastic=False)
    ranks = None if group is None else group.ranks
    # Horovod: the group's sum, over its process set (all ranks for None).
    total = hvd.allreduce(torch.ones(1), op=hvd.Sum, name="group_sum",
                          process_set=group or hvd.global_process_set).item()
    return {"dynamic": dynamic, "static": dist.static_bn_sets() is not None, "ranks": ranks, "total": total}


def test_groups_over_the_world_need_no_process_set():
    ranks = run_ranks(_init_rank, np=2, args=(0,), timeout=120)
    assert ranks == [{"dynamic": False, "static": False, "ranks": None, "total": 2.0}] * 2


def test_groups_within_the_world_get_static_process_sets():
    ranks = run_ranks(_init_rank, np=4, args=(2,), timeout=120)
    assert [r["ranks"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(not r["dynamic"] and r["static"] and r["total"] == 2.0 for r in ranks)


def test_a_crash_in_native_code_prints_the_python_stacks():
    """After dist.init a fatal signal (a segfault in Horovod, Gloo or torch) prints where each thread was."""
    code = "import os, signal\nfrom hvd_megdet import dist\ndist.init()\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    crashed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -11
    assert "Fatal Python error: Segmentation fault" in crashed.stderr
    assert 'File "<string>", line 4 in <module>' in crashed.stderr


def test_the_exit_after_a_finished_job_runs_the_exit_handlers_and_keeps_the_output(tmp_path):
    """dist.exit_skipping_native_teardown skips only what comes after Python's exit handlers: non-daemon threads
    are waited for, atexit handlers run (Horovod's shutdown among them), buffered output is written."""
    done = tmp_path / "done"
    code = ("import atexit, sys, threading, time\nfrom hvd_megdet import dist\ndist.init()\n"
            f"atexit.register(lambda: open({str(done)!r}, 'w').write('atexit'))\n"
            "threading.Thread(target=lambda: (time.sleep(0.5), print('thread', end=' '))).start()\n"
            "print('buffered', end=' ')\nsys.stderr.write('err')\ndist.exit_skipping_native_teardown()\n")
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (ended.returncode, ended.stdout, ended.stderr) == (0, "buffered thread ", "err")
    assert done.read_text() == "atexit"
