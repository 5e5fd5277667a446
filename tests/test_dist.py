"""dist: Horovod's set-up: which process sets CGBN groups get (decided before init, then on real ranks)."""
import os
import socket
import subprocess
import sys

import horovod.torch as hvd
import pytest

from hvd_megdet import dist
from hvd_megdet.config import ConfigError
from hvd_megdet.sync_bn import LOCAL
from tests.harness import run_ranks


def _registration(size, elastic, world):
    groups = dist.bn_groups(size, elastic, world)
    return groups.dynamic, [ps.ranks for ps in groups.static]


def test_process_sets_are_registered_only_for_groups_between_one_rank_and_the_world():
    """dist.bn_groups, before hvd.init: no set for groups of the world (0 or the world size) or of one rank,
    static sets for groups in between, no set for a size that does not divide the world (refused later)."""
    assert _registration(0, False, 4) == (False, [])
    assert _registration(1, False, 4) == (False, [])
    assert _registration(4, False, 4) == (False, [])
    assert _registration(2, False, 4) == (False, [[0, 1], [2, 3]])
    assert _registration(3, False, 4) == (False, [])


def test_process_sets_are_dynamic_in_elastic_mode_or_when_the_world_size_is_unknown():
    assert _registration(2, True, 4) == (True, [])
    assert _registration(0, True, 4) == (True, [])
    assert _registration(2, False, 0) == (True, [])  # mpirun: no HOROVOD_SIZE before init
    assert _registration(1, False, 0) == (False, [])
    assert _registration(0, False, 0) == (False, [])


def test_a_group_size_that_does_not_divide_the_world_is_refused_or_in_elastic_mode_shrunk():
    """BNGroups.process_set in a world of 1: groups of 2 are a ConfigError naming model.bn_group_size; in
    elastic mode they become groups of the largest divisor (1: per-rank BN), reported with the groups."""
    hvd.init()  # a world of 1
    with pytest.raises(ConfigError, match=r"model\.bn_group_size=2 does not divide the world size 1"):
        dist.bn_groups(2, False, 1).process_set(print)
    reported = []
    assert dist.bn_groups(2, True, 1).process_set(reported.append) == LOCAL
    assert reported == ["warning: model.bn_group_size=2 does not divide the world size 1",
                        "BN groups of 1 of the 1 ranks"]


def _init_rank(bn_group_size):
    import horovod.torch as hvd
    import torch

    from hvd_megdet import dist
    from hvd_megdet.logs import log

    bn_groups = dist.init(bn_group_size=bn_group_size)
    try:
        hvd.add_process_set([0])
        dynamic = True
    except Exception:  # Horovod refuses new sets unless initialised with dynamic process sets
        dynamic = False
    group = bn_groups.process_set(log)
    ranks = None if group is None else group.ranks
    # Horovod: the group's sum, over its process set (all ranks for None).
    total = hvd.allreduce(torch.ones(1), op=hvd.Sum, name="group_sum",
                          process_set=group or hvd.global_process_set).item()
    return {"dynamic": dynamic, "static": bool(bn_groups.static), "ranks": ranks, "total": total}


@pytest.mark.multirank
def test_groups_over_the_world_need_no_process_set():
    ranks = run_ranks(_init_rank, np=2, args=(0,), timeout=120)
    assert ranks == [{"dynamic": False, "static": False, "ranks": None, "total": 2.0}] * 2


@pytest.mark.multirank
def test_groups_within_the_world_get_static_process_sets():
    ranks = run_ranks(_init_rank, np=4, args=(2,), timeout=120)
    assert [r["ranks"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(not r["dynamic"] and r["static"] and r["total"] == 2.0 for r in ranks)


@pytest.mark.multirank
def test_a_crash_in_native_code_prints_the_python_stacks():
    """After dist.init a fatal signal (a segfault in Horovod, Gloo or torch) prints where each thread was."""
    code = "import os, signal\nfrom hvd_megdet import dist\ndist.init()\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    crashed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -11
    assert "Fatal Python error: Segmentation fault" in crashed.stderr
    assert 'File "<string>", line 4 in <module>' in crashed.stderr


def test_a_rank_whose_horovod_start_up_hangs_ends_naming_itself():
    """A hvd.init that never returns (a rank that never started, a transport that cannot connect) ends the rank
    after stall_limit seconds with one line naming its rank and host, instead of holding it for ever."""
    code = ("import time\nimport horovod.torch as hvd\nfrom hvd_megdet import dist\n"
            "hvd.init = lambda *args, **kwargs: time.sleep(600)\ndist.init(stall_limit=1)\nprint('returned')\n")
    env = {**os.environ, "HOROVOD_RANK": "3"}
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert ended.returncode == 1 and "returned" not in ended.stdout
    assert f"error: rank 3 (host {socket.gethostname()}, pid " in ended.stderr
    assert "start-up did not finish in 1 s (stall_limit)" in ended.stderr


def test_a_start_up_that_finishes_leaves_the_rank_running_past_the_limit():
    code = "import time\nfrom hvd_megdet import dist\ndist.init(stall_limit=1)\ntime.sleep(2.5)\nprint('alive')\n"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout) == (0, "alive\n"), ran.stderr


@pytest.mark.multirank
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
