"""Process trees and lifetimes: horovodrun starts each rank in its own session, so killing a launcher must reach
them all; a rank's data-loader processes must end with it."""
import os
import signal
import subprocess
import threading
import time

import psutil


def kill_tree(pid):
    """SIGKILL the process `pid` and all its descendants, then wait (up to 10 s) until they are gone."""
    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def run(cmd, timeout, stdout=subprocess.PIPE, **popen):
    """Run `cmd` in a session of its own with stderr into stdout (a pipe by default, or an open file); return
    (exit status, output text or None for a file). When it runs past `timeout` seconds the status is None and
    it and everything it started are killed, as they are if the caller is interrupted."""
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        return None, proc.communicate()[0]
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def exit_with(pid, *_):
    """Exit this process as soon as process `pid` is gone (checked every second, on a daemon thread).

    For DataLoader workers (`worker_init_fn=functools.partial(exit_with, os.getpid())`): with the forkserver
    start method their parent is the forkserver, not the rank, so torch's own check of the parent never fires;
    and the forkserver lives as long as a worker does. A rank ended by SIGTERM or SIGKILL would otherwise leave
    both behind, each holding the memory of a loaded torch.
    """
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        os._exit(1)

    def gone():
        try:  # is_running() also tells a new process that reuses the pid from the old one
            return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def wait():
        while not gone():
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=wait, name="exit_with", daemon=True).start()
