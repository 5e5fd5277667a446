"""Stalled and lost ranks: which rank holds a Horovod job up, and an end to a job that waits too long.

    dog = Watchdog(limit=300)          # every rank, after hvd.init(): a status server and a monitor process
    dog.start(rank, peers)             # peers: every rank's dog.card(), gathered (dist.init does both)
    dog.lost_peers()                   # after a collective failed: "rank 1 has exited (host c2, pid 77)"

In each rank a status server answers where the rank waits: the longest wait of its threads in a collective, and
for how long, and where its main thread runs. No thread reads another's frames: that can crash Python 3.11 (4-rank
runs of the ablation grid segfaulted so). The main thread writes its own stack when asked (a signal that
faulthandler handles in C); waits on other threads announce themselves through sync_bn's collective hook (on GPU,
autograd runs the backward, CGBN's allreduces with it, on threads of its own). Seen: every Horovod wait of the
main thread (collectives, hvd.DistributedOptimizer's synchronize, CGBN), CGBN's waits on any thread, and a rank
blocked holding Python's lock (below). Not seen: other Horovod waits off the main thread (a hvd.synchronize in a
thread of one's own); hvd.DistributedOptimizer's backward hooks, which run on autograd's threads too, only start
allreduces, and an enqueue that blocks holds Python's lock.

Each rank also starts a monitor, a small process of its own (`python -m hvd_megdet.watchdog`), which asks its
rank every second. A process, because a rank blocked in a Horovod call can hold Python's lock: an enqueue waits
for Horovod's background thread, which with dynamic process sets holds a lock while it waits for a peer, so no
thread of the rank runs.

The monitor ends its rank (SIGKILL) after printing one line `error: rank R: stalled ...` when the rank has
waited `limit` seconds in one collective, or has not answered for `limit` seconds while running; the launcher
then stops the others. The line names the ranks that hold the job up, from what every other rank's monitor
says: stopped (SIGSTOP, a debugger), exited, unreachable (host down, network), or running outside any
collective (a deadlocked data loader, a hung filesystem: the line says where). A monitor also ends its rank
when nobody reads the rank's output any more (the ssh session of a remote rank closed: its launcher is gone),
and ends itself with its rank. A launcher that ends a job after one of its ranks failed (horovodrun SIGTERMs
the ranks it started on its own host) can be quicker than the survivors' failed collective, which would have
named the lost rank: the rank passes its SIGTERM to the monitor (a signal wakeup pipe), which names the ranks
already gone instead. Ports carry one JSON line out per connection; nothing is ever read from them.
"""
import enum
import faulthandler
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

_PROBE_TIMEOUT = 3.0  # seconds to connect to a peer's monitor, and again for its reply
_EXIT_GRACE = 10.0  # seconds a rank that printed its error line may take to exit before its monitor ends it
_STACKS_SIGNAL = signal.SIGUSR2  # asks a rank to print its threads' stacks (faulthandler)
# Has the main thread write its own stack for the status server (faulthandler). A real-time signal: SIGUSR1 is
# the user's (Slurm's --signal, for one).
_WHERE_SIGNAL = signal.SIGRTMIN + 5
# Seconds a monitor keeps answering after its rank exited when its rank reported an error or its launcher
# SIGTERMed it: peers ended by the same launcher read that, not "exited", and print no line of their own
# (horovodrun SIGKILLs what is left 5 s after its SIGTERM).
_LINGER = 4.0


def local_address():
    """This host's IPv4 address for peers on other hosts: that of the interface horovodrun chose (Gloo:
    HOROVOD_GLOO_IFACE, MPI: the first of NCCL_SOCKET_IFNAME; `--network-interface` names it), else the
    address of the host name unless it is a loopback one (Debian maps it to 127.0.1.1), else the first
    non-loopback address, else 127.0.0.1."""
    ipv4 = {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}
    for name in (os.environ.get("HOROVOD_GLOO_IFACE"), os.environ.get("NCCL_SOCKET_IFNAME", "").split(",")[0]):
        if ipv4.get(name):
            return ipv4[name][0]
    try:
        by_name = socket.gethostbyname(socket.gethostname())
        if not by_name.startswith("127."):
            return by_name
    except OSError:
        pass
    return next((a for addrs in ipv4.values() for a in addrs if not a.startswith("127.")), "127.0.0.1")


def _short(path):
    """A source path as a reader finds it: from the package folder on (site-packages/ or the repository)."""
    parts = Path(path).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    if "hvd_megdet" not in parts:
        return path
    package = len(parts) - 1 - parts[::-1].index("hvd_megdet")  # the last one: a checkout may be named so too
    return "/".join(parts[package:])


_FRAME = re.compile(r'  File "(.*)", line (\S+) in (.*)')


def _parse_stack(dump):
    """faulthandler's dump of one thread's stack as [(file, line, function)], innermost first."""
    return [frame.groups() for line in dump.splitlines() if (frame := _FRAME.match(line))]


def _collective_files():
    """The source files where a main thread waits for its peers, from the modules themselves: Horovod's torch
    collectives (mpi_ops: the ops and hvd.synchronize; functions: broadcast_parameters, allgather_object...;
    optimizer: DistributedOptimizer.synchronize) and sync_bn, the CGBN layers with their own polling wait.
    Loads torch: for the rank, not the monitor process."""
    from horovod.torch import functions, mpi_ops, optimizer

    from hvd_megdet import sync_bn

    return frozenset(module.__file__ for module in (mpi_ops, functions, optimizer, sync_bn))


def _collective_index(stack, files):
    """The index in `stack` of its outermost frame inside a collective, a frame of one of `files` (None when it
    waits in none)."""
    inside = [i for i, (path, _, _) in enumerate(stack) if path in files]
    return inside[-1] if inside else None


def _site(frame):
    path, line, function = frame
    return f"{_short(path)}:{line} {function}"


def _where(stack):
    """Where a stack runs: its two innermost frames of this package (innermost first; dist.py's wrappers of
    collectives skipped), and its innermost frame when that is in other code, e.g. "hvd_megdet/engine.py:54
    next_batch < hvd_megdet/train.py:210 run (in torch/utils/data/dataloader.py:1133 _try_get_data)"."""
    if not stack:
        return "outside Python code"
    ours = [f for f in stack if "hvd_megdet" in Path(f[0]).parts and Path(f[0]).name != "dist.py"][:2]
    where = " < ".join(map(_site, ours))
    if not ours or ours[0] is not stack[0]:
        where += f" (in {_site(stack[0])})" if ours else _site(stack[0])
    return where


def probe(address, port, timeout=_PROBE_TIMEOUT):
    """Read the JSON line that the server at (address, port) sends: ("ok", the object), or ("exited" |
    "unreachable" | "not responding", None). A reply that is cut off or garbled (not a JSON object) counts as
    not responding: the peer, or the network, failed mid-answer."""
    try:
        conn = socket.create_connection((address, port), timeout=timeout)
    except ConnectionRefusedError:
        return "exited", None
    except OSError:  # timeout, no route to host, network unreachable
        return "unreachable", None
    with conn:
        try:
            line = conn.makefile("rb").readline()
        except ConnectionResetError:
            return "exited", None
        except OSError:
            return "not responding", None
    if not line:
        return "exited", None
    try:
        reply = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        reply = None
    return ("ok", reply) if isinstance(reply, dict) else ("not responding", None)


def _serve(server, answer):
    """Send `answer()` as one JSON line to every connection of `server` (forever, on the calling thread)."""
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                conn.sendall((json.dumps(answer()) + "\n").encode())
            except OSError:
                pass


def _thread(target, *args):
    threading.Thread(target=target, args=args, name=f"hvd_megdet-{target.__name__}", daemon=True).start()


class Watchdog:
    """This rank's side: the status server and the monitor process (module docstring).
    `limit`: seconds one collective may wait before the job is ended (0 = never; lost peers are still named)."""

    def __init__(self, limit):
        self._server = socket.create_server(("127.0.0.1", 0))  # for this rank's monitor only
        # The monitor's request for every thread's Python stack before it ends a stalled rank: faulthandler
        # writes them from the signal handler itself, so it works while the rank blocks holding Python's lock.
        faulthandler.register(_STACKS_SIGNAL, file=sys.__stderr__, all_threads=True)
        self._main = threading.main_thread().ident
        self._stack_file = tempfile.TemporaryFile()  # where the main thread writes its stack (_main_stack)
        faulthandler.register(_WHERE_SIGNAL, file=self._stack_file, all_threads=False)
        self._lock = threading.Lock()
        self._waiting, self._since = None, time.monotonic()  # the main thread's wait seen last, and since when
        self._waits = {}  # thread ident -> (collective name, since when): CGBN's waits, told by its hook
        from hvd_megdet import sync_bn  # loads torch: the monitor process, which imports this module, must not
        sync_bn.register_collective_hook(self._collective_event)
        self._collective_files = _collective_files()
        self.rank, self.peers = None, []
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        # The rank's signals, as Python's C-level handler writes them (signal.set_wakeup_fd, in start): the monitor
        # learns of a SIGTERM at once, even while the rank's main thread is blocked in a collective.
        signals_read, self._signals = os.pipe()
        self._monitor = subprocess.Popen(
            [sys.executable, "-m", "hvd_megdet.watchdog", str(os.getpid()), str(self._server.getsockname()[1]),
             str(limit), str(signals_read)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
            pass_fds=(signals_read,))
        os.close(signals_read)
        ready, _, _ = select.select([self._monitor.stdout], [], [], 60)
        port = self._monitor.stdout.readline() if ready else ""
        if not port.strip().isdigit():
            self._monitor.kill()
            raise RuntimeError(f"the watchdog's monitor process did not start ({sys.executable} -m hvd_megdet.watchdog)")
        self._monitor_port = int(port)

    def card(self):
        """What peers need to reach this rank's monitor: host, pid, address, port."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "address": local_address(),
                "port": self._monitor_port}

    def start(self, rank, peers):
        """Serve status and watch the main thread, as rank `rank` of the ranks whose cards are `peers`."""
        self.rank, self.peers = rank, peers
        self._monitor.stdin.write(json.dumps({"rank": rank, "peers": peers}) + "\n")
        self._monitor.stdin.flush()
        _thread(_serve, self._server, self.status)
        # horovodrun SIGTERMs a failed job's ranks on its own host (not their children, the monitor among them)
        # as soon as it sees a rank's process end, often before the survivors' collectives fail and name it.
        os.set_blocking(self._signals, False)
        signal.set_wakeup_fd(self._signals, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, _die_of_sigterm)

    def _main_stack(self):
        """The main thread's stack, [(file, line, function)] innermost first, as the main thread itself writes
        it: faulthandler's handler of _WHERE_SIGNAL, in C, so also while it is blocked in native code. No other
        thread reads its frames: that can crash Python 3.11, through Python's frame objects (CPython gh-111363)
        or through faulthandler's dump of all threads (a thread state that Horovod's thread is creating)."""
        fd = self._stack_file.fileno()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        signal.pthread_kill(self._main, _WHERE_SIGNAL)
        dump, deadline = b"", time.monotonic() + 1.0
        while time.monotonic() < deadline:  # written once the main thread is scheduled: a few ms
            time.sleep(0.01)
            written = os.pread(fd, os.fstat(fd).st_size, 0)
            if written and written == dump and written.endswith(b"\n"):
                break
            dump = written
        return _parse_stack(dump.decode(errors="replace"))

    def _collective_event(self, name, event):
        """sync_bn's collective hook: which thread waits in which collective, since when (a new one resets)."""
        if event == "wait":
            self._waits[threading.get_ident()] = (name, time.monotonic())
        elif event == "end":
            self._waits.pop(threading.get_ident(), None)

    def status(self):
        """This rank now: {"collective": the longest wait of its threads in a collective or None, "waiting_s",
        "where": where its main thread runs}. The main thread's wait is read from its stack, the other threads'
        from sync_bn's collective hook."""
        from horovod.torch import mpi_ops  # loaded in the rank already; the monitor process must not load torch
        with self._lock:  # one dump at a time: the monitor and peers' surveys ask from the server's thread
            stack = self._main_stack()
            collective = _collective_index(stack, self._collective_files)
            # One wait: the same call site, and no collective started since (Horovod numbers every collective
            # it starts, and keeps the pending ones in _handle_map, the torch ops' table of handles).
            wait = None if collective is None else (stack[collective:], max(mpi_ops._handle_map, default=None))
            if wait != self._waiting:
                self._waiting, self._since = wait, time.monotonic()
            # A copy: the hook changes it from other threads. The main thread's own waits are left to its stack,
            # which says more.
            waits = [(since, f"{name} off the main thread") for thread, (name, since) in self._waits.copy().items()
                     if thread != self._main]
            if wait is not None:
                waits.append((self._since, f"{stack[collective][2]} from {_where(stack[collective + 1:])}"))
            status = {"collective": None, "waiting_s": None, "where": _where(stack)}
            if waits:
                since, status["collective"] = min(waits)
                status["waiting_s"] = round(time.monotonic() - since, 1)
        return status

    def lost_peers(self):
        """The ranks that exited, are stopped, unreachable or do not answer, e.g. "rank 1 has exited (host c2,
        pid 77)", joined by '; ' (empty when every other rank runs). Call it from the main thread, which then
        prints the line and exits: a SIGTERM meanwhile is ignored (see below), and the monitor ends the rank if
        it has not exited 10 s later."""
        # horovodrun SIGTERMs the survivors as soon as it sees a rank fail, while this may wait 2 s for a lost
        # host: ignoring SIGTERM until the caller has printed its line keeps the line (horovodrun SIGKILLs
        # after 5 s, so nothing is kept alive for long).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lost = "; ".join(_phrases(_survey(self.rank, self.peers, timeout=2.0), "gone"))
        self._monitor.stdin.write("ending\n")  # no stall line from the monitor for a rank on its way out
        self._monitor.stdin.flush()
        return lost


def _die_of_sigterm(signum, frame):
    """SIGTERM's default action, once the main thread runs Python again: the handler is there so that Python's
    C-level handler writes the signal to the monitor's pipe first."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _survey(rank, peers, timeout=_PROBE_TIMEOUT):
    """[(rank, phrase, kind)] for every rank but `rank`, from what its monitor says (asked in parallel). kind:
    "gone" (exited, stopped, unreachable or its monitor does not answer), "reported" (it printed an error line
    of its own), "terminated" (its launcher is ending it), "outside" (runs outside any collective: the phrase
    says where), "blocked" (holding Python's lock) or "waiting" (in a collective)."""
    others = [r for r in range(len(peers)) if r != rank]
    if not others:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(others))) as pool:
        answers = list(pool.map(lambda r: probe(peers[r]["address"], peers[r]["port"], timeout), others))
    found = []
    for r, (state, view) in zip(others, answers):
        who = f"(host {peers[r]['host']}, pid {peers[r]['pid']})"
        if state == "ok" and view.get("reported"):
            found.append((r, f"rank {r} reported an error {who}", "reported"))
        elif state == "ok" and view.get("terminated"):
            found.append((r, f"rank {r} is being ended by its launcher {who}", "terminated"))
        elif state != "ok":
            found.append((r, f"rank {r} {_GONE[state]} {who}", "gone"))
        elif view["state"] != "running":
            found.append((r, f"rank {r} {_GONE[view['state']]} {who}", "gone"))
        elif view["status"] is None:
            found.append((r, f"rank {r} has not answered its monitor for {view['silent_s']:.0f} s: blocked in "
                             f"native code holding Python's lock {who}", "blocked"))
        elif view["status"]["collective"] is None:
            found.append((r, f"rank {r} runs outside any collective {who} at {view['status']['where']}", "outside"))
        else:
            found.append((r, f"rank {r} waits in {view['status']['collective']} {who}", "waiting"))
    return found


def _phrases(found, kind):
    return [phrase for _, phrase, k in found if k == kind]


_GONE = {"exited": "has exited", "unreachable": "is unreachable: host down or network failed",
         "not responding": "does not respond: its host is frozen or overloaded",
         "stopped": "is stopped: SIGSTOP, or a debugger"}


def stall_message(rank, peers, what):
    """The one line for a stall of rank `rank` (`what`: how it waits), naming the ranks that hold it up: those
    gone or stopped, else those outside any collective, else those blocked holding Python's lock."""
    found = _survey(rank, peers)
    culprits = _phrases(found, "gone") or _phrases(found, "outside") or _phrases(found, "blocked")
    if culprits:
        return f"rank {rank}: stalled: {what}; holding it up: " + "; ".join(culprits)
    return f"rank {rank}: stalled: {what}; every rank waits in a collective: " + "; ".join(p for _, p, _ in found)


class State(enum.Enum):
    """What a monitor does about its rank (the transitions: `_StateMachine`)."""
    WATCHING = "watching"  # the rank runs: asked every tick, ended when stalled for `limit` s
    TERMINATED = "terminated"  # its launcher ends the rank (a SIGTERM, or nobody reads its output): watched still
    REPORTED = "reported"  # the monitor printed a stall line and ended the rank
    ENDING = "ending"  # the rank printed its own error line and exits: ended if still there _EXIT_GRACE s later


class _StateMachine:
    """A monitor's state, and one method per transition; pure (each takes the time, time.monotonic()), so it is
    tested without processes.

        WATCHING   --terminate, lose_output-->  TERMINATED   (TERMINATED --lose_output--> TERMINATED, again)
        WATCHING, TERMINATED  --report-->  REPORTED
        any state  --end-->  ENDING   (ENDING --end--> ENDING: its grace starts again)

    Peers read two facts (`told`): "reported" in REPORTED and ENDING (a line was printed for this rank), and
    "terminated" once the launcher ends the rank, which it may do in any state: in REPORTED or ENDING the state
    stays (peers read "reported" first), in WATCHING it becomes TERMINATED. After the rank has exited, the
    monitor keeps answering until _LINGER s after the last of these transitions (`lingers`), so that peers ended
    by the same launcher read what it tells, not "exited". Transitions come from several threads (the loop, the
    rank's pipes, the SIGTERM handler): a lock, reentrant since a SIGTERM may interrupt one on the main thread.
    """

    def __init__(self):
        self.state, self.since = State.WATCHING, None  # since: when it entered the state
        self.launcher_ends = False  # told by `terminate` or `lose_output`, in any state
        self._told_at = -math.inf  # the last transition that peers read
        self._lock = threading.RLock()

    def _enter(self, state, now):
        self.state, self.since, self._told_at = state, now, now

    def terminate(self, now):
        """The launcher SIGTERMed the rank (or the monitor). True the first time the launcher's end is told:
        the monitor then names the ranks gone before (`_Monitor._name_lost_ranks`)."""
        with self._lock:
            if self.launcher_ends:
                return False
            self.launcher_ends, self._told_at = True, now
            if self.state is State.WATCHING:
                self._enter(State.TERMINATED, now)
            return True

    def lose_output(self, now):
        """Nobody reads the rank's output (its ssh session closed: its launcher is gone); the monitor ends the
        rank. Peers read that its launcher ends it; there is nobody to name."""
        with self._lock:
            self.launcher_ends, self._told_at = True, now
            if self.state in (State.WATCHING, State.TERMINATED):
                self._enter(State.TERMINATED, now)

    def report(self, now):
        """The monitor printed a stall line for its rank and ends it."""
        with self._lock:
            self._told_at = now
            if self.state in (State.WATCHING, State.TERMINATED):
                self._enter(State.REPORTED, now)

    def end(self, now):
        """The rank printed its own error line and is exiting (Watchdog.lost_peers)."""
        with self._lock:
            self._enter(State.ENDING, now)

    @property
    def watching(self):
        """Whether a stall of the rank is to be reported."""
        return self.state in (State.WATCHING, State.TERMINATED)

    def overdue(self, now):
        """Whether the rank, ENDING, has had its _EXIT_GRACE s to exit: it hangs on its way out."""
        return self.state is State.ENDING and now - self.since >= _EXIT_GRACE

    def lingers(self, now):
        """Whether a monitor whose rank has exited still answers its peers (see the class docstring)."""
        return now - self._told_at < _LINGER

    def told(self):
        """What peers read besides the rank's state: {"terminated": bool, "reported": bool}."""
        return {"terminated": self.launcher_ends, "reported": self.state in (State.REPORTED, State.ENDING)}


class _Monitor:
    """The monitor process of one rank (module docstring): `python -m hvd_megdet.watchdog PID STATUS_PORT
    LIMIT [SIGNALS_FD]`; prints its own port, then reads {"rank", "peers"} from stdin, and the rank's signals
    (one byte each) from SIGNALS_FD."""

    def __init__(self, pid, status_port, limit, signals_fd=None):
        self.rank_process, self.status_port, self.limit = psutil.Process(pid), status_port, limit
        self.signals_fd = signals_fd
        self.view = {"state": "running", "status": None, "silent_s": 0.0}
        self.machine = _StateMachine()
        self._server = socket.create_server(("", 0))
        self.rank, self.peers = None, []
        signal.signal(signal.SIGTERM, lambda *_: self._terminated())
        print(self._server.getsockname()[1], flush=True)
        job = json.loads(sys.stdin.readline() or "null")
        if job is None:  # the rank ended before it started us
            sys.exit(0)
        self.rank, self.peers = job["rank"], job["peers"]

    def _read_rank(self):
        """The rank writes "ending" when it has printed its error line and exits."""
        for line in sys.stdin:
            if line.strip() == "ending":
                self.machine.end(time.monotonic())

    def _read_signals(self):
        """The rank's signals, one byte each, written by Python's C-level signal handler in the rank."""
        while chunk := os.read(self.signals_fd, 64):
            if signal.SIGTERM in chunk:
                self._terminated()

    def _terminated(self):
        # The survey starts at once: the launcher SIGKILLs what is left 5 s after its SIGTERM (horovodrun), and a
        # lost host's probe alone may take 2 s. The SIGTERMs of the rank (its pipe) and ours (the handler) come
        # together: the first one starts it.
        if self.machine.terminate(time.monotonic()):
            _thread(self._name_lost_ranks)

    def _rank_state(self):
        try:
            status = self.rank_process.status()
        except psutil.NoSuchProcess:
            return "exited"
        if status == psutil.STATUS_ZOMBIE or not self.rank_process.is_running():
            return "exited"
        return "stopped" if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP) else "running"

    def run(self):
        # The rank's state as of now: a rank that just died must not be reported running until the next tick.
        _thread(_serve, self._server, lambda: {**self.view, "state": self._rank_state(), **self.machine.told()})
        _thread(self._read_rank)
        if self.signals_fd is not None:
            _thread(self._read_signals)
        output = select.poll()
        output.register(sys.stderr.fileno(), 0)  # no events asked: it reports POLLERR/POLLHUP only
        tick = min(1.0, self.limit / 10) if self.limit else 1.0
        silent_since = None  # since when the rank, running, has not answered
        while True:
            time.sleep(tick)
            rank = self._rank_state()
            if rank == "exited":
                if self.machine.lingers(time.monotonic()):
                    continue  # still telling peers that the launcher ends this rank, or that it reported
                return
            if output.poll(0):  # nobody reads the rank's output: its launcher (ssh session) is gone
                self.machine.lose_output(time.monotonic())
                self._end_rank()
                continue
            answer, status = probe("127.0.0.1", self.status_port, timeout=1.0) if rank == "running" else (None, None)
            now = time.monotonic()
            silent_since = None if answer == "ok" or rank != "running" else (silent_since or now)
            silent_s = now - silent_since if silent_since else 0.0
            self.view = {"state": rank, "status": status, "silent_s": silent_s}
            if self.machine.state is State.ENDING:
                if self.machine.overdue(now):
                    return self._end_rank()  # it printed its line but hangs on its way out
            elif self.machine.watching and rank == "running":
                stalled = self._stalled(status, silent_s)
                if stalled:
                    self._report(stalled)

    def _report(self, stalled):
        """Print the stall line, then the rank's stacks, and end the rank."""
        print(f"error: {stall_message(self.rank, self.peers, stalled)}", file=sys.stderr, flush=True)
        self.machine.report(time.monotonic())
        self._print_rank_stacks()
        self._end_rank()

    def _name_lost_ranks(self):
        """The launcher ends our rank: print one line naming the ranks that were gone already (a lost host whose
        loss the launcher saw before the collectives failed), unless none is gone (a scheduler's cancel) or a
        line was printed already, by our rank or another."""
        if self.machine.state is State.ENDING:
            return
        found = _survey(self.rank, self.peers, timeout=2.0)
        gone = _phrases(found, "gone")
        if gone and not _phrases(found, "reported") and self.machine.state is not State.ENDING:
            print(f"error: rank {self.rank}: ended by the launcher; gone before: {'; '.join(gone)}", file=sys.stderr,
                  flush=True)

    def _stalled(self, status, silent_s):
        """How the rank is stalled ("waited 300 s ... in <collective>", "blocked 300 s ..."), or None."""
        if not self.limit:
            return None
        if status is not None and (status["waiting_s"] or 0) >= self.limit:
            return f"waited {status['waiting_s']:.0f} s (stall_limit {self.limit:g} s) in {status['collective']}"
        if silent_s >= self.limit:
            return (f"blocked {silent_s:.0f} s (stall_limit {self.limit:g} s) in native code holding Python's lock "
                    f"(a Horovod call waiting for another rank?)")
        return None

    def _print_rank_stacks(self):
        """Have the rank print where each of its threads is (after the error line: where it hangs, for a bug
        report), then give it a second to write them."""
        print(f"rank {self.rank}'s threads, from Python's faulthandler (most recent call first):", file=sys.stderr,
              flush=True)
        try:
            self.rank_process.send_signal(_STACKS_SIGNAL)
        except psutil.NoSuchProcess:
            return
        time.sleep(1.0)

    def _end_rank(self):
        try:
            self.rank_process.kill()  # SIGKILL: a rank blocked holding Python's lock runs no signal handler
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the rank, not for us
    signals_fd = int(sys.argv[4]) if len(sys.argv) > 4 else None
    _Monitor(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), signals_fd).run()
