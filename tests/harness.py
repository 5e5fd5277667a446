"""Run code on N local Horovod ranks (Gloo over localhost) from pytest, with a hard timeout.

    from tests.harness import run_ranks
    results = run_ranks(fn, np=2, args=(x,), timeout=60)   # [fn's return value on rank 0, on rank 1]

`fn` runs in a fresh process per rank under `horovodrun -np N -H localhost:N --gloo`; it calls `hvd.init()`
itself (so it can register process sets). A rank that raises fails the test with that rank's traceback; ranks
still running at the timeout (e.g. blocked in a collective) are killed with everything they started, and the
test fails naming them. `python -m tests.harness RUNDIR` is the rank-side entry point.
"""
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import cloudpickle
import pytest

from hvd_megdet.process import run

REPO = Path(__file__).resolve().parents[1]
HOROVODRUN = Path(sys.executable).with_name("horovodrun")


class RanksTimedOut(Exception):
    """Raised by `horovodrun` when the ranks did not finish within the timeout (all were killed)."""

    def __init__(self, timeout, output):
        super().__init__(f"ranks still running after {timeout}s were killed; output:\n{output[-4000:]}")
        self.output = output


def horovodrun(np, argv, timeout, env=None, cwd=None):
    """Run `horovodrun -np N -H localhost:N --gloo ARGV...` and return the CompletedProcess.

    stdout and stderr are merged into `.stdout`. On timeout every process it started is killed and
    `RanksTimedOut` is raised, so a hung collective can never hang the caller.
    """
    cmd = [str(HOROVODRUN), "-np", str(np), "-H", f"localhost:{np}", "--gloo", *map(str, argv)]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    returncode, out = run(cmd, timeout, env=full_env, cwd=cwd or REPO)
    if returncode is None:
        raise RanksTimedOut(timeout, out)
    return subprocess.CompletedProcess(cmd, returncode, out)


def run_ranks(fn, np=2, args=(), kwargs=None, timeout=120, env=None):
    """Call `fn(*args, **kwargs)` on `np` Horovod ranks; return the list of per-rank results.

    Fails the current test with the first failing rank's traceback, or when the ranks time out.
    """
    with tempfile.TemporaryDirectory(prefix="hvd_ranks_") as rundir:
        rundir = Path(rundir)
        (rundir / "fn.pkl").write_bytes(cloudpickle.dumps((fn, args, kwargs or {})))
        try:
            proc = horovodrun(np, [sys.executable, "-m", "tests.harness", rundir], timeout, env=env)
        except RanksTimedOut as e:
            pytest.fail(f"{fn.__name__} on {np} ranks: {e}", pytrace=False)
        results = []
        for rank in range(np):
            path = rundir / f"rank{rank}.pkl"
            if not path.exists():
                pytest.fail(f"{fn.__name__}: rank {rank} wrote no result (exit {proc.returncode}); "
                            f"output:\n{proc.stdout[-4000:]}", pytrace=False)
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                pytest.fail(f"{fn.__name__}: rank {rank} raised:\n{value}", pytrace=False)
            results.append(value)
        return results


def _rank_main(rundir):
    rundir = Path(rundir)
    fn, args, kwargs = cloudpickle.loads((rundir / "fn.pkl").read_bytes())
    rank = int(os.environ["HOROVOD_RANK"])
    try:
        outcome, code = ("ok", fn(*args, **kwargs)), 0
    except BaseException:
        outcome, code = ("error", traceback.format_exc()), 1
    tmp = rundir / f"rank{rank}.pkl.tmp"
    tmp.write_bytes(cloudpickle.dumps(outcome))
    tmp.rename(rundir / f"rank{rank}.pkl")
    if code:
        sys.stdout.flush()
        sys.stderr.write(outcome[1])
        os._exit(code)  # skip Horovod's atexit shutdown: it could wait on ranks that are blocked
    _wait_for_every_rank()


def _wait_for_every_rank():
    """Horovod's shutdown at exit is job-wide: a rank that finished first (its process set's collectives
    done) would end the collectives that other ranks have yet to finish ("Horovod has been shut down")."""
    import horovod.torch as hvd
    if hvd.is_initialized():
        # Horovod: every rank has returned before any rank shuts Horovod down.
        hvd.barrier()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
