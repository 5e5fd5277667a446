"""logs: rank 0's log file and metrics writer."""
import json

import horovod.torch as hvd

from hvd_megdet import logs
from hvd_megdet.logs import MetricsWriter, log, log_to_file


def test_metrics_writer_rewinds_to_an_iteration(tmp_path):
    """A resumed run, or an elastic one rolled back to its last commit, writes the later iterations again:
    metrics.jsonl keeps each iteration once, and a partial last line left by a killed run goes."""
    record = lambda i: {"iteration": i, "epoch": i / 10, "lr": 0.1, "loss": 1.0, "time": 0.1, "data_time": 0.0}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in (1, 2, 3)) + '{"itera')
    writer = MetricsWriter(tmp_path, start_iter=2, max_iter=10, log_period=100)
    writer.write(record(3), 8)
    writer.write(record(4), 8)
    writer.rewind(3)
    writer.write(record(4), 8)
    writer.close()
    assert [r["iteration"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


def _tensorboard_steps(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_drops_the_steps_a_resumed_run_writes_again(tmp_path, monkeypatch):
    """A run killed after iteration 4 and resumed from its checkpoint of iteration 2: TensorBoard shows
    iterations 3 and 4 once, with the resumed run's values, not the killed run's beside them."""
    hvd.init()  # a world of 1: rank 0 logs (TensorBoard gets the iterations that are logged)
    monkeypatch.setattr(logs, "_log_file", {"handle": None, "pending": []})  # this test's lines stay its own
    record = lambda i, loss: {"iteration": i, "epoch": i / 10, "lr": 0.1, "loss": loss, "time": 0.1, "data_time": 0.0}
    killed = MetricsWriter(tmp_path, start_iter=0, max_iter=10, log_period=1)
    for i in (1, 2, 3, 4):
        killed.write(record(i, 1.0), 8)
    killed.close()
    resumed = MetricsWriter(tmp_path, start_iter=2, max_iter=10, log_period=1)
    for i in (3, 4, 5, 6):
        resumed.write(record(i, 2.0), 8)
    resumed.close()
    assert _tensorboard_steps(tmp_path / "tb", "train/loss") == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0),
                                                                  (6, 2.0)]


def test_log_file_gets_every_line_from_the_start_and_a_resumed_run_appends(tmp_path):
    hvd.init()  # a world of 1: rank 0 logs
    log("before the output folder exists")
    log_to_file(tmp_path / "log.txt")
    log("world size 1")
    log_to_file(tmp_path / "log.txt")  # a second run in this process (e.g. --resume) appends
    log("resumed")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["before the output folder exists", "world size 1", "resumed"]
