"""logs: rank 0's log file and metrics writer."""
import json

import horovod.torch as hvd

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


def test_log_file_gets_every_line_from_the_start_and_a_resumed_run_appends(tmp_path):
    hvd.init()  # a world of 1: rank 0 logs
    log("before the output folder exists")
    log_to_file(tmp_path / "log.txt")
    log("world size 1")
    log_to_file(tmp_path / "log.txt")  # a second run in this process (e.g. --resume) appends
    log("resumed")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["before the output folder exists", "world size 1", "resumed"]
