"""Process trees: horovodrun starts each rank in its own session, so killing a launcher must reach them all."""
import signal

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
