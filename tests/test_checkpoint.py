"""Checkpoints: atomic writes, safe loads, newest loadable one found."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hvd_megdet import checkpoint
from hvd_megdet.checkpoint import CheckpointError


def state(i):
    return {"model": {"w": torch.full((3,), float(i))}, "iteration": i}


def test_save_and_load_round_trip(tmp_path):
    path = checkpoint.path_for(tmp_path, 12)
    checkpoint.save(state(12), path)
    assert path.name == "model_0000012.pth"
    loaded = checkpoint.load(path)
    assert loaded["iteration"] == 12 and torch.equal(loaded["model"]["w"], torch.full((3,), 12.0))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_latest_skips_truncated_newest(tmp_path):
    checkpoint.save(state(10), checkpoint.path_for(tmp_path, 10))
    checkpoint.save(state(20), checkpoint.path_for(tmp_path, 20))
    newest = checkpoint.path_for(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:100])
    warnings = []
    path, loaded = checkpoint.latest(tmp_path, warnings.append)
    assert path == checkpoint.path_for(tmp_path, 10) and loaded["iteration"] == 10
    assert "model_0000020.pth" in warnings[0]


def test_latest_with_nothing(tmp_path):
    assert checkpoint.latest(tmp_path) == (None, None)


def test_missing_and_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pth: no such file"):
        checkpoint.load(tmp_path / "nothing.pth")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="evil.pth: cannot load: refused"):
        checkpoint.load(bad)


HANGING_WRITER = """
import sys, time
from hvd_megdet import checkpoint
checkpoint.write_atomic(sys.argv[1], lambda f: (f.write(b"partial"), f.flush(), time.sleep(120)))
"""


def start_hanging_writer(path):
    """A process inside write_atomic(path), its temporary file written and flushed; (process, that file)."""
    before = set(path.parent.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, str(path)])
    deadline = time.monotonic() + 60
    while not (new := set(path.parent.iterdir()) - before) or not next(iter(new)).stat().st_size:
        assert proc.poll() is None and time.monotonic() < deadline, "the writer did not start writing"
        time.sleep(0.1)
    return proc, new.pop()


# A user's file, another program's temporary files, and one of a writer on another host (same folder over NFS).
FOREIGN = (".notes.tmp42", ".model_0000005.pth.tmp7", ".x.write_atomic", ".y.write_atomic-elsewhere-999999999")


def test_write_atomic_deletes_only_the_leftovers_of_dead_writers(tmp_path):
    """Another program's hidden files stay, and so does a live writer's temporary file; a killed writer's goes."""
    target = checkpoint.path_for(tmp_path, 5)
    target.parent.mkdir()
    for name in FOREIGN:
        (target.parent / name).write_text("someone else's")
    killed, leftover = start_hanging_writer(target)
    killed.kill()
    killed.wait()
    live, in_progress = start_hanging_writer(target.with_name("other.pth"))
    try:
        checkpoint.save(state(5), target)
        assert checkpoint.load(target)["iteration"] == 5
        assert not leftover.exists()
        assert in_progress.read_bytes() == b"partial"
    finally:
        live.kill()
        live.wait()
    for name in FOREIGN:
        assert (target.parent / name).read_text() == "someone else's"


WRITER = """
import sys, torch
from hvd_megdet import checkpoint
out = sys.argv[1]
i = 0
while True:
    i += 1
    checkpoint.save({"model": {"w": torch.full((2_000_000,), float(i))}, "iteration": i},
                    checkpoint.path_for(out, 1))
"""


def test_killed_writer_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a process repeatedly while it overwrites a checkpoint: the file always loads, whole."""
    checkpoint.save({"model": {"w": torch.zeros(2_000_000)}, "iteration": 0}, checkpoint.path_for(tmp_path, 1))
    for trial in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
        time.sleep(1.0 + 0.37 * trial)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = checkpoint.load(checkpoint.path_for(tmp_path, 1))
        w = loaded["model"]["w"]
        assert w.numel() == 2_000_000 and bool((w == w[0]).all())
        assert float(w[0]) == loaded["iteration"]


def test_a_resumed_optimizer_keeps_the_configs_settings_and_says_which_changed():
    """The checkpoint brings the momentum buffers; weight decay and momentum stay what the config says now."""
    model = torch.nn.Linear(2, 1)
    groups = lambda wd: [{"params": [model.weight], "weight_decay": wd}, {"params": [model.bias], "weight_decay": 0.0}]
    before = torch.optim.SGD(groups(5e-4), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    before.step()
    saved = {"model": model.state_dict(), "optimizer": before.state_dict(), "iteration": 1}
    now = torch.optim.SGD(groups(1e-4), lr=0.02, momentum=0.8)
    changed = checkpoint.restore(model, now, saved, "model_0000001.pth")
    assert changed == ["param group 0 weight_decay 0.0001, was 0.0005", "param group 0 momentum 0.8, was 0.9",
                       "param group 1 momentum 0.8, was 0.9"]
    assert [(g["weight_decay"], g["momentum"], g["lr"]) for g in now.param_groups] == [(1e-4, 0.8, 0.02),
                                                                                       (0.0, 0.8, 0.02)]
    assert torch.equal(now.state[model.weight]["momentum_buffer"], before.state[model.weight]["momentum_buffer"])
    assert checkpoint.restore(model, now, {**saved, "optimizer": now.state_dict()}, "model_0000001.pth") == []
