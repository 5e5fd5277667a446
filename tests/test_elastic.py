"""Elastic training (--elastic) on localhost with Gloo: a worker is lost, training finishes on the others.

Horovod blacklists the host of a failed worker, so the job runs on two host names that both mean this
machine: localhost (2 slots) and 127.0.0.1 (1 slot); the worker on 127.0.0.1 kills itself mid-training.
"""
import os
import socket
import sys

import pytest

from hvd_megdet import checkpoint
from hvd_megdet.config import load_config
from hvd_megdet.elastic import describe_workers
from hvd_megdet.process import run
from hvd_megdet.solver import lr_at
from tests.harness import HOROVODRUN, REPO, run_ranks
from tests.tiny_run import CONFIG, overrides, records, train_killed_when

pytestmark = pytest.mark.multirank

# The worker on host 127.0.0.1 dies (SIGKILL) when it is about to load the batch of its iteration 4, one
# iteration after the elastic commit of iteration 2 (elastic.commit_period 2 below).
KILL_ON_127 = train_killed_when('os.environ["HOROVOD_HOSTNAME"] == "127.0.0.1" and calls[0] == 3')


def elastic_horovodrun(argv, discovery, timeout):
    """`horovodrun -np 3 --min-np 2 --max-np 3 --host-discovery-script DISCOVERY ARGV`; (returncode, output)."""
    cmd = [str(HOROVODRUN), "-np", "3", "--min-np", "2", "--max-np", "3", "--host-discovery-script",
           str(discovery), *map(str, argv)]
    # A survivor that shared no connection with the lost worker only notices it when its Gloo operation times
    # out (Horovod's default: 30 s); 15 s keeps the test short and is still ample on localhost.
    env = dict(os.environ, PYTHONPATH=str(REPO), HOROVOD_GLOO_TIMEOUT_SECONDS="15")
    returncode, out = run(cmd, timeout, env=env, cwd=REPO)
    if returncode is None:
        pytest.fail(f"elastic job still running after {timeout}s:\n{out[-4000:]}")
    return returncode, out


def test_lost_worker_training_finishes_on_two_with_the_rescaled_lr(shapes, tmp_path):
    discovery = tmp_path / "discover_hosts.sh"
    discovery.write_text("#!/bin/sh\necho localhost:2\necho 127.0.0.1:1\n")
    discovery.chmod(0o755)
    out = tmp_path / "out"
    # BN groups of 2: 2 does not divide 3 (groups of 1 rank until the worker is lost), then groups of 2.
    argv = overrides(shapes, out, **{"solver.max_iter": 5, "checkpoint_period": 5, "model.bn_group_size": 2,
                                     "elastic.commit_period": 2})
    code, log = elastic_horovodrun([sys.executable, "-c", KILL_ON_127, "--elastic", "--config", CONFIG, *argv],
                                   discovery, timeout=300)
    assert code == 0, log[-4000:]
    assert "exit with status code 137" in log
    assert "warning: model.bn_group_size=2 does not divide the world size 3" in log
    assert log.index("BN groups of 1 of the 3 ranks") < log.index("BN groups of 2 of the 2 ranks")
    host = socket.gethostname()  # every worker's: localhost and 127.0.0.1 are this machine
    assert log.index(f"elastic: 3 workers on {host}") < log.index(f"elastic: 2 workers on {host} (was 3)")
    done = records(out)
    # Each once: the iteration after the last commit (3) is redone on two workers and its record rewritten.
    assert [r["iteration"] for r in done] == [1, 2, 3, 4, 5]
    assert [r["world_size"] for r in done] == [3, 3, 2, 2, 2]
    solver = load_config(CONFIG, argv).solver
    assert [r["lr"] for r in done] == [lr_at(r["iteration"] - 1, solver, r["world_size"]) for r in done]
    # By hand: 3 workers x 2 images = global batch 6, lr 0.02 x 6/16 = 0.0075 (linear scaling rule), warmed up
    # from 0.01 x it over 2 iterations; then 2 x 2 = 4, lr 0.02 x 4/16 = 0.005, x 0.1 from 0-based iteration 4.
    assert [r["lr"] for r in done] == pytest.approx([0.0075 * 0.01, 0.0075 * 0.505, 0.005, 0.005, 0.005 * 0.1])
    assert checkpoint.first_nonfinite(checkpoint.load(checkpoint.path_for(out, 5))) is None


def _loss_scale_through_the_elastic_state():
    import horovod.torch as hvd
    import torch

    from hvd_megdet.elastic import TrainingState
    hvd.init()
    model = torch.nn.Linear(2, 1)
    # Rank 1 plays a worker that joins mid-run: its fresh scaler starts at another scale than rank 0's.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (18 if hvd.rank() == 0 else 16))
    scaler.scale(torch.ones(1))  # creates the scale tensor, as the first training step does
    state = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler, iteration=0)
    state.sync()  # what hvd.elastic.run does on every (re)start
    synced = scaler.get_scale()
    state.commit = state.save  # commit's check for host updates needs an elastic launcher
    state.commit()
    scaler.update(new_scale=4.0)  # an overflow after the commit...
    state.restore()  # ...is rolled back when a worker is lost
    return synced, scaler.get_scale()


def test_the_loss_scale_is_part_of_the_elastic_state():
    """Else a joining worker unscales by another factor than the others and the replicas drift apart."""
    assert run_ranks(_loss_scale_through_the_elastic_state, np=2, timeout=120) == [(2.0 ** 18, 2.0 ** 18)] * 2


def test_the_log_names_the_hosts_that_left_or_joined():
    assert describe_workers([], ["c1", "c2", "c3"]) == "elastic: 3 workers on c1, c2, c3"
    assert describe_workers(["c1", "c2", "c3"], ["c1", "c2"]) == "elastic: 2 workers on c1, c2 (was 3); host c3 left"
    assert describe_workers(["c1", "c1"], ["c1", "c2"]) == "elastic: 2 workers on c1, c2 (was 2); host c2 joined"
    assert describe_workers(["c1", "c1", "c2"], ["c1", "c2"]) == "elastic: 2 workers on c1, c2 (was 3)"
