"""The watchdog's parts in one process: what a probe tells, where a stack waits, what a monitor says of its rank.

The stall and lost-peer paths on real Horovod ranks: tests/test_stall.py, test_loader_lifetime.py, test_faults.py.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from hvd_megdet import watchdog
from hvd_megdet.watchdog import Watchdog, probe


def test_a_probe_tells_an_answer_from_an_exited_and_a_frozen_process():
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert probe("127.0.0.1", port) == ("exited", None)  # nothing listens: the process is gone

    # A stopped process's kernel still completes the connection (the listen backlog), but nobody answers.
    with socket.create_server(("127.0.0.1", 0)) as frozen:
        assert probe("127.0.0.1", frozen.getsockname()[1], timeout=0.5) == ("not responding", None)


def test_a_probe_that_cannot_connect_calls_the_peer_unreachable(monkeypatch):
    def no_route(*args, **kwargs):
        raise OSError(113, "No route to host")

    monkeypatch.setattr(socket, "create_connection", no_route)
    assert probe("10.0.0.1", 1) == ("unreachable", None)


def test_status_names_the_collective_a_thread_waits_in_and_where_it_was_called(monkeypatch):
    """A function in one of the collectives' files counts as a collective (here: this test file, declared one)."""
    monkeypatch.setattr(watchdog, "_COLLECTIVE_FILES", (__file__,))
    entered, release = threading.Event(), threading.Event()

    def allreduce_like():
        entered.set()
        release.wait(10)

    waiting = threading.Thread(target=allreduce_like)
    waiting.start()
    entered.wait(10)
    dog = Watchdog(limit=0)
    dog._main = waiting.ident  # watch that thread as if it were the main one
    status = dog.status()
    release.set()
    waiting.join()
    assert status["collective"].startswith("allreduce_like from ") and status["waiting_s"] == 0.0


def test_a_monitor_reports_its_rank_running_stopped_or_exited():
    """A stand-in rank (a sleeping process) with a watchdog's monitor: what a peer's probe reads."""
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status_server = socket.create_server(("127.0.0.1", 0))  # the rank's status server, which never answers
    monitor = subprocess.Popen([sys.executable, "-m", "hvd_megdet.watchdog", str(rank.pid),
                                str(status_server.getsockname()[1]), "0"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(monitor.stdout.readline())
        monitor.stdin.write('{"rank": 1, "peers": []}\n')
        monitor.stdin.flush()
        assert probe("127.0.0.1", port)[1]["state"] == "running"
        os.kill(rank.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert probe("127.0.0.1", port)[1]["state"] == "stopped"
        rank.kill()
        rank.wait()
        assert probe("127.0.0.1", port)[1]["state"] == "exited"  # as of now, not as of its last look
        assert monitor.wait(10) == 0  # and it ends with its rank
    finally:
        rank.kill()
        monitor.kill()
        status_server.close()
