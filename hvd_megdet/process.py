"""Process trees: horovodrun starts each rank in its own session, so killing a launcher must reach them all."""
import signal
import subprocess

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
