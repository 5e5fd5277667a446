"""The multi-rank harness itself: results come back per rank, failures and hangs fail the test."""
import time
import uuid

import psutil
import pytest

from tests.harness import RanksTimedOut, horovodrun, run_ranks

pytestmark = pytest.mark.multirank


def _allreduce_rank():
    import horovod.torch as hvd
    import torch
    hvd.init()
    total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum, name="harness_sum")
    return hvd.rank(), hvd.size(), total.item()


def _raise_on_rank_1():
    import horovod.torch as hvd
    hvd.init()
    if hvd.rank() == 1:
        raise RuntimeError("deliberate failure on rank 1")
    return hvd.rank()


def _rank_1_never_joins():
    import horovod.torch as hvd
    import torch
    hvd.init()
    if hvd.rank() == 1:
        time.sleep(3600)
    hvd.allreduce(torch.ones(1), name="never_completes")


def _group_finishes_first():
    """Ranks 2 and 3 sum over their own process set at once; ranks 0 and 1 do the same a second later."""
    import horovod.torch as hvd
    import torch
    groups = [hvd.ProcessSet([0, 1]), hvd.ProcessSet([2, 3])]
    hvd.init(process_sets=groups)
    if hvd.rank() < 2:
        time.sleep(1.0)
    return hvd.allreduce(torch.ones(1), op=hvd.Sum, name="group_sum", process_set=groups[hvd.rank() // 2]).item()


def test_ranks_agree_on_allreduce():
    results = run_ranks(_allreduce_rank, np=2, timeout=60)
    assert [r[:2] for r in results] == [(0, 2), (1, 2)]
    assert [r[2] for r in results] == [3.0, 3.0]


def test_ranks_that_finish_first_wait_for_the_others():
    """Horovod's shutdown is job-wide: a rank that returned and exited would end the collectives that other
    ranks have yet to finish ("Horovod has been shut down"), so finished ranks wait for the rest."""
    assert run_ranks(_group_finishes_first, np=4, timeout=120) == [2.0] * 4


def test_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(pytest.fail.Exception) as info:
        run_ranks(_raise_on_rank_1, np=2, timeout=60)
    message = str(info.value)
    assert "rank 1 raised" in message
    assert "deliberate failure on rank 1" in message and "Traceback" in message


def _has_token(proc, token):
    try:
        return proc.environ().get("HARNESS_TEST_TOKEN") == token
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def test_blocked_collective_is_killed_at_timeout():
    token = uuid.uuid4().hex
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        run_ranks(_rank_1_never_joins, np=2, timeout=20, env={"HARNESS_TEST_TOKEN": token})
    assert time.monotonic() - start < 40
    assert "killed" in str(info.value)
    assert [p.pid for p in psutil.process_iter() if _has_token(p, token)] == []


def test_horovodrun_raises_on_timeout():
    with pytest.raises(RanksTimedOut):
        horovodrun(2, ["sleep", "600"], timeout=5)
