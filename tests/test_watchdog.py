"""The watchdog's parts in one process: what a probe tells, where a stack waits, what a monitor says of its rank.

The stall and lost-peer paths on real Horovod ranks: tests/test_stall.py, test_loader_lifetime.py, test_faults.py.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from horovod.torch import mpi_ops

from hvd_megdet import sync_bn, watchdog
from hvd_megdet.watchdog import State, Watchdog, probe


def test_a_probe_tells_an_answer_from_an_exited_and_a_frozen_process():
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert probe("127.0.0.1", port) == ("exited", None)  # nothing listens: the process is gone

    # A stopped process's kernel still completes the connection (the listen backlog), but nobody answers.
    with socket.create_server(("127.0.0.1", 0)) as frozen:
        assert probe("127.0.0.1", frozen.getsockname()[1], timeout=0.5) == ("not responding", None)


@pytest.mark.parametrize("reply", [b'{"state": "runn', b'{"state": "running"\xff\n', b'[1, 2]\n'])
def test_a_probe_reading_a_cut_off_or_garbled_reply_calls_the_peer_not_responding(reply):
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer_and_hang_up():
            conn, _ = server.accept()
            with conn:
                conn.sendall(reply)

        threading.Thread(target=answer_and_hang_up, daemon=True).start()
        assert probe("127.0.0.1", server.getsockname()[1]) == ("not responding", None)


def test_a_probe_that_cannot_connect_calls_the_peer_unreachable(monkeypatch):
    def no_route(*args, **kwargs):
        raise OSError(113, "No route to host")

    monkeypatch.setattr(socket, "create_connection", no_route)
    assert probe("10.0.0.1", 1) == ("unreachable", None)


def test_status_names_the_collective_a_thread_waits_in_and_where_it_was_called(monkeypatch):
    """A function in one of the collectives' files counts as a collective (here: this test file, declared one).
    The watched thread writes its own stack: reading another thread's frames can crash Python 3.11."""
    monkeypatch.setattr(watchdog, "_collective_files", lambda: frozenset([__file__]))
    monkeypatch.setattr(sys, "_current_frames", lambda: pytest.fail("read another thread's frames from Python"))
    monkeypatch.setattr(mpi_ops, "_handle_map", {})
    entered, release = threading.Event(), threading.Event()

    def allreduce_like():
        entered.set()
        release.wait(10)

    waiting = threading.Thread(target=allreduce_like)
    waiting.start()
    entered.wait(10)
    dog = Watchdog(limit=0)
    dog._main = waiting.ident  # watch that thread as if it were the main one
    first = dog.status()
    time.sleep(0.3)
    same_wait = dog.status()
    mpi_ops._handle_map[7] = None  # Horovod started a collective: a wait from the same place is a new one
    new_wait = dog.status()
    release.set()
    waiting.join()
    assert [first["where"], same_wait["where"]] == [new_wait["where"]] * 2
    assert first["collective"].startswith("allreduce_like from ") and first["collective"].endswith(" run")
    assert first["waiting_s"] == 0.0 and same_wait["waiting_s"] >= 0.3 and new_wait["waiting_s"] == 0.0


def test_the_collective_files_are_the_modules_that_wait_for_peers():
    from horovod.torch import functions, mpi_ops, optimizer

    files = watchdog._collective_files()
    assert files == {mpi_ops.__file__, functions.__file__, optimizer.__file__, sync_bn.__file__}
    assert all(os.path.isfile(f) for f in files)


def test_status_names_a_collective_that_waits_off_the_main_thread(monkeypatch):
    """CGBN's waits announce themselves through sync_bn's collective hook on whatever thread runs them (on GPU,
    autograd's device threads run the backward), and the longest wait is the rank's: no thread's frames are
    read. Each collective is a new wait."""
    monkeypatch.setattr(sys, "_current_frames", lambda: pytest.fail("read another thread's frames from Python"))
    peers_arrived = [threading.Event(), threading.Event()]  # Horovod's handles 0 and 1 complete when set
    monkeypatch.setattr(sync_bn.hvd, "poll", lambda handle: peers_arrived[handle].is_set())
    monkeypatch.setattr(sync_bn.hvd, "synchronize", lambda handle: None)
    dog = Watchdog(limit=0)

    def backward_like():
        for handle, name in enumerate(["sync_bn.0.grad", "sync_bn.1.grad"]):
            sync_bn._allreduce_wait(sync_bn._Allreduce(handle, name), poll=20e-6)

    def status_once(collective):
        deadline = time.monotonic() + 10
        while (status := dog.status())["collective"] != collective and time.monotonic() < deadline:
            time.sleep(0.01)
        return status

    waiting = threading.Thread(target=backward_like)
    waiting.start()
    first = status_once("sync_bn.0.grad off the main thread")
    time.sleep(0.5)
    same_wait = dog.status()
    peers_arrived[0].set()
    new_wait = status_once("sync_bn.1.grad off the main thread")
    peers_arrived[1].set()
    waiting.join()
    done = dog.status()
    assert first["collective"] == same_wait["collective"] == "sync_bn.0.grad off the main thread"
    assert same_wait["waiting_s"] >= first["waiting_s"] + 0.5
    assert new_wait["collective"] == "sync_bn.1.grad off the main thread"
    assert new_wait["waiting_s"] < same_wait["waiting_s"]
    assert done["collective"] is None and done["waiting_s"] is None


def start_monitor(rank_pid, rank, peers, status_port):
    """`python -m hvd_megdet.watchdog` for the process `rank_pid` as rank `rank` of `peers`; (process, its port)."""
    monitor = subprocess.Popen([sys.executable, "-m", "hvd_megdet.watchdog", str(rank_pid), str(status_port), "0"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(monitor.stdout.readline())
    monitor.stdin.write(json.dumps({"rank": rank, "peers": peers}) + "\n")
    monitor.stdin.flush()
    return monitor, port


def closed_port():
    """A local port nobody listens on: a peer whose monitor has exited."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


def serving(answer):
    """A local server that answers like a peer's monitor, with `answer`; its card."""
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=watchdog._serve, args=(server, lambda: answer), daemon=True).start()
    return server


def card(host, pid, port):
    return {"host": host, "pid": pid, "address": "127.0.0.1", "port": port}


def test_a_monitor_reports_its_rank_running_stopped_or_exited():
    """A stand-in rank (a sleeping process) with a watchdog's monitor: what a peer's probe reads."""
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status_server = socket.create_server(("127.0.0.1", 0))  # the rank's status server, which never answers
    monitor, port = start_monitor(rank.pid, 1, [], status_server.getsockname()[1])
    try:
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


def sigterm_line(peers):
    """SIGTERM a monitor (rank 0 of `peers`, beside a stand-in rank) as horovodrun ends a failed job; what it
    prints, and whether a peer then reads that its launcher ends it."""
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status_server = socket.create_server(("127.0.0.1", 0))
    monitor, port = start_monitor(rank.pid, 0, [card("h0", rank.pid, 0), *peers], status_server.getsockname()[1])
    try:
        deadline = time.monotonic() + 10
        while probe("127.0.0.1", port)[0] != "ok" and time.monotonic() < deadline:  # serving: it has its peers
            time.sleep(0.1)
        monitor.send_signal(signal.SIGTERM)
        while not (view := probe("127.0.0.1", port)[1]).get("terminated") and time.monotonic() < deadline:
            time.sleep(0.1)
        rank.kill()  # the launcher's SIGTERM or SIGKILL ends the rank too
        rank.wait()
        assert monitor.wait(15) == 0  # it ends a few seconds after its rank
        return monitor.stderr.read().strip(), view["terminated"]
    finally:
        rank.kill()
        monitor.kill()
        status_server.close()


def test_a_monitor_ended_by_the_launcher_names_the_ranks_gone_before():
    """horovodrun SIGTERMs a failed job's processes on its host as soon as it sees a rank's ssh session end,
    before the survivors' collectives fail and name the lost rank: the monitor names it then."""
    line, terminated = sigterm_line([card("c2", 4242, closed_port())])
    assert line == "error: rank 0: ended by the launcher; gone before: rank 1 has exited (host c2, pid 4242)"
    assert terminated


def test_a_monitor_ended_by_the_launcher_is_quiet_when_no_rank_was_lost_or_one_reported():
    """A scheduler's cancel (every peer ended by its launcher too), or a peer that printed its own line."""
    ended = serving({"state": "exited", "status": None, "silent_s": 0.0, "terminated": True, "reported": False})
    reported = serving({"state": "exited", "status": None, "silent_s": 0.0, "terminated": False, "reported": True})
    with ended, reported:
        assert sigterm_line([card("c2", 7, ended.getsockname()[1])]) == ("", True)
        assert sigterm_line([card("c2", 7, closed_port()), card("c3", 8, reported.getsockname()[1])]) == ("", True)


def test_a_rank_sigtermed_by_its_launcher_has_its_monitor_name_the_ranks_gone_before():
    """horovodrun SIGTERMs the ranks on its own host, not their children: the rank's SIGTERM reaches its monitor
    through Python's signal wakeup pipe (written by the C-level handler, so also while the rank's main thread is
    blocked in a collective), and the rank still dies of the SIGTERM."""
    lost = card("c2", 4242, closed_port())
    code = ("import sys, time\nfrom hvd_megdet.watchdog import Watchdog\ndog = Watchdog(limit=0)\n"
            f"dog.start(0, [dog.card(), {lost!r}])\nprint('started', flush=True)\ntime.sleep(60)\n")
    rank = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline() == "started\n"
        rank.send_signal(signal.SIGTERM)
        _, err = rank.communicate(timeout=30)  # until the monitor, which shares the rank's stderr, has ended too
    finally:
        rank.kill()
    assert rank.returncode == -signal.SIGTERM
    assert err.strip() == "error: rank 0: ended by the launcher; gone before: rank 1 has exited (host c2, pid 4242)"


def test_a_monitor_whose_rank_lost_its_launcher_ends_it_and_tells_peers_so():
    """A remote rank's output goes to its ssh session; when horovodrun ends a job it kills that session, and
    the rank's monitor ends the rank. Peers then read "ended by its launcher", not "exited" (a lost rank)."""
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status_server = socket.create_server(("127.0.0.1", 0))
    monitor, port = start_monitor(rank.pid, 2, [], status_server.getsockname()[1])
    try:
        monitor.stderr.close()  # the ssh session is gone
        assert rank.wait(10) == -signal.SIGKILL
        assert probe("127.0.0.1", port)[1]["terminated"]
        assert monitor.wait(15) == 0
    finally:
        rank.kill()
        monitor.kill()
        status_server.close()


# The monitor's state machine, without processes: each transition takes the time.
LINGER, GRACE = watchdog._LINGER, watchdog._EXIT_GRACE


def test_a_watching_monitor_tells_nothing_and_stops_with_its_rank():
    machine = watchdog._StateMachine()
    assert machine.state is State.WATCHING and machine.watching
    assert machine.told() == {"terminated": False, "reported": False}
    assert not machine.lingers(0.0) and not machine.overdue(1e9)


def test_the_launchers_sigterm_is_told_once_and_the_rank_is_watched_still():
    machine = watchdog._StateMachine()
    assert machine.terminate(10.0)  # the first SIGTERM: name the ranks gone before
    assert not machine.terminate(11.0)  # the rank's and the monitor's own SIGTERM come together: once
    assert (machine.state, machine.since) == (State.TERMINATED, 10.0) and machine.watching
    assert machine.told() == {"terminated": True, "reported": False}
    assert machine.lingers(10.0 + LINGER - 0.1) and not machine.lingers(10.0 + LINGER)
    machine.report(20.0)  # a stall line after all
    assert (machine.state, machine.since) == (State.REPORTED, 20.0) and not machine.watching
    assert machine.told() == {"terminated": True, "reported": True}
    assert machine.lingers(20.0 + LINGER - 0.1) and not machine.lingers(20.0 + LINGER)


def test_a_stall_line_is_reported_once_and_a_later_sigterm_keeps_it():
    machine = watchdog._StateMachine()
    machine.report(5.0)
    assert (machine.state, machine.since) == (State.REPORTED, 5.0) and not machine.watching
    assert machine.told() == {"terminated": False, "reported": True}
    assert machine.terminate(7.0)  # peers read "reported" first; the monitor lingers from the SIGTERM
    assert machine.state is State.REPORTED and machine.told() == {"terminated": True, "reported": True}
    assert machine.lingers(7.0 + LINGER - 0.1) and not machine.lingers(7.0 + LINGER)


def test_a_rank_ending_after_its_own_error_has_its_grace_from_its_last_word():
    machine = watchdog._StateMachine()
    machine.end(5.0)
    assert (machine.state, machine.since) == (State.ENDING, 5.0) and not machine.watching
    assert machine.told() == {"terminated": False, "reported": True}
    assert not machine.overdue(5.0 + GRACE - 0.1) and machine.overdue(5.0 + GRACE)
    machine.end(8.0)  # said again: its grace starts again
    assert not machine.overdue(8.0 + GRACE - 0.1) and machine.overdue(8.0 + GRACE)
    assert machine.terminate(9.0)  # the launcher's SIGTERM leaves it ENDING, its grace unchanged
    assert (machine.state, machine.since) == (State.ENDING, 8.0) and machine.overdue(8.0 + GRACE)
    assert machine.told() == {"terminated": True, "reported": True}
    assert machine.lingers(9.0 + LINGER - 0.1) and not machine.lingers(9.0 + LINGER)


def test_a_reported_rank_that_says_it_ends_is_ending():
    machine = watchdog._StateMachine()
    machine.report(1.0)
    machine.end(2.0)
    assert (machine.state, machine.since) == (State.ENDING, 2.0) and machine.overdue(2.0 + GRACE)
    assert machine.told() == {"terminated": False, "reported": True}


def test_a_lost_output_is_the_launchers_end_with_nobody_to_name():
    machine = watchdog._StateMachine()
    machine.lose_output(1.0)
    assert (machine.state, machine.since) == (State.TERMINATED, 1.0)
    machine.lose_output(2.0)  # seen again at the next tick, until the rank has exited
    assert (machine.state, machine.since) == (State.TERMINATED, 2.0)
    assert not machine.terminate(3.0)  # a SIGTERM now names nobody: the launcher's end is known already
    assert machine.told() == {"terminated": True, "reported": False}
    assert machine.lingers(2.0 + LINGER - 0.1) and not machine.lingers(2.0 + LINGER)
    machine.report(4.0)
    machine.lose_output(5.0)  # in REPORTED (or ENDING) the state stays
    assert (machine.state, machine.since) == (State.REPORTED, 4.0)
    assert machine.told() == {"terminated": True, "reported": True} and not machine.lingers(5.0 + LINGER)
