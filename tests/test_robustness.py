"""Bad input through the trainer's command line, files it writes, and a scan of the package for unsafe calls.

The command-line cases run one after another in one process (`cli`), a world of 1: each must end in one line
`error: ...` naming the file, key or value (exit status 1); the last case trains for real, and the test of
written files checks that it wrote nothing outside its output_dir. docs/robustness.md lists every case.
"""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvd_megdet import checkpoint
from hvd_megdet.data.synthetic import make_dataset
from hvd_megdet.model import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_shapes.yaml"
TINY = {"backbone": "resnet_tiny", "anchor_sizes": (16, 32, 64, 128, 256)}

RUN_CASES = """
import json, sys
from hvd_megdet.train import main
outcomes = {}
for name, argv in json.loads(sys.argv[1]):
    try:
        main(argv)
        outcomes[name] = None
    except SystemExit as e:
        outcomes[name] = str(e.code)
print("OUTCOMES " + json.dumps(outcomes))
"""


class NotWeights:
    """A custom object: torch.load(weights_only=True) must refuse to unpickle it."""


def tiny_overrides(data_root, out, **extra):
    items = {"model.backbone": "resnet_tiny", "model.norm": "cgbn", "model.bn_group_size": 0,
             "model.anchor_sizes": "[16, 32, 64, 128, 256]", "device": "cpu", "solver.base_lr": 0.02,
             "data.train.images": data_root / "train",
             "data.train.annotations": data_root / "annotations" / "instances_train.json",
             "data.val.images": data_root / "val",
             "data.val.annotations": data_root / "annotations" / "instances_val.json",
             "data.num_workers": 0, "output_dir": out, "input.min_size": "[96]", "input.max_size": 128,
             "model.rpn_pre_nms_top_n_train": 100, "model.rpn_post_nms_top_n_train": 50,
             "model.rpn_pre_nms_top_n_test": 50, "model.rpn_post_nms_top_n_test": 50,
             "model.box_batch_size_per_image": 32, "solver.ims_per_gpu": 2, "solver.max_iter": 2,
             "solver.warmup_iters": 1, "solver.steps": "[1]", "checkpoint_period": 1, "log_period": 1}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


# name -> (extra overrides or a full argv builder, expected one-line message; None = trains successfully)
def cases(root, data, files):
    base = lambda out, **kw: ["--config", str(CONFIG), *tiny_overrides(data, root / "out" / out, **kw)]
    return {
        "config file missing": (["--config", str(root / "nope.yaml")],
                                r"error: config file \S*nope\.yaml: cannot read \(No such file or directory\)"),
        "bn_group_size does not divide the world size": (
            base("bn", **{"model.bn_group_size": 2}), r"error: model\.bn_group_size=2 does not divide the world size 1"),
        "annotation file missing": (base("ann", **{"data.train.annotations": root / "missing.json"}),
                                    r"error: \S*missing\.json: annotation file not found"),
        "weights missing": (base("w1", **{"model.weights": root / "none.pth"}),
                            r"error: model\.weights: model weights file not found: \S*none\.pth"),
        "weights truncated": (base("w2", **{"model.weights": files["truncated"]}),
                              r"error: model\.weights: \S*truncated\.pth: not a weights file "
                              r"torch\.load\(weights_only=True\) accepts: .* \(truncated, or not written by torch\.save\?\)"),
        "weights of another architecture": (
            base("w3", **{"model.weights": files["frozen"]}),
            r"error: model\.weights: \S*frozen\.pth: weights do not fit the detector; "
            r"missing \(\d+\): \['backbone\.fpn\.inner_blocks\.0\.1\.weight', .*\]; unexpected \(\d+\): \[.*\]"),
        "weights holding a pickled object": (
            base("w4", **{"model.weights": files["evil"]}),
            r"error: model\.weights: \S*evil\.pth: not a weights file torch\.load\(weights_only=True\) accepts: "
            r"it holds objects other than tensors and plain containers"),
        "resume from a checkpoint of another architecture": (
            ["--resume", *base("resume")],
            r"error: checkpoint \S*model_0000003\.pth: does not fit the model \(another architecture or config\?\): "
            r"missing \(\d+\): \['backbone\.fpn\.inner_blocks\.0\.1\.weight', .*\]; unexpected \(\d+\): \[.*\]"),
        "--elastic outside an elastic job": (["--elastic", *base("el")],
                                             r"error: --elastic needs an elastic horovodrun: .*"),
        "a short training run": (base("ok"), None),
    }


def snapshot(root):
    return {p for p in Path(root).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Run every case of `cases` in one process; returns (root, cases, outcomes, files written by the run)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "shapes"
    make_dataset(str(data), num_train=8, num_val=2, seed=3)
    frozen = build_model(5, norm="frozen", **TINY)  # 4 shape categories + background, but no BN in FPN/head
    files = {"frozen": root / "frozen.pth", "truncated": root / "truncated.pth", "evil": root / "evil.pth"}
    torch.save(frozen.state_dict(), files["frozen"])
    files["truncated"].write_bytes(files["frozen"].read_bytes()[:5000])
    torch.save({"model": frozen.state_dict(), "extra": NotWeights()}, files["evil"])
    checkpoint.save({"model": frozen.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "iteration": 3},
                    checkpoint.path_for(root / "out" / "resume", 3))
    all_cases = cases(root, data, files)
    home, cwd = root / "home", root / "cwd"
    for d in (home, cwd, root / "tmp"):
        d.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(root / "tmp"), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=str(REPO))
    before = snapshot(root)
    proc = subprocess.run([sys.executable, "-c", RUN_CASES, json.dumps([(k, v[0]) for k, v in all_cases.items()])],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("OUTCOMES ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, all_cases, json.loads(line[len("OUTCOMES "):]), snapshot(root) - before


@pytest.mark.parametrize("name", list(cases(Path("r"), Path("d"), {"frozen": "", "truncated": "", "evil": ""})))
def test_bad_input_ends_in_one_line_naming_the_culprit(cli, name):
    _, all_cases, outcomes, _ = cli
    expected = all_cases[name][1]
    if expected is None:
        assert outcomes[name] is None
    else:
        assert outcomes[name] is not None and "\n" not in outcomes[name], outcomes[name]
        assert re.fullmatch(expected, outcomes[name]), outcomes[name]


def test_a_training_run_writes_only_under_its_output_dir(cli):
    root, _, outcomes, written = cli
    assert outcomes["a short training run"] is None
    out = root / "out" / "ok"
    outside = sorted(str(p) for p in written if out not in p.parents)
    assert not outside, outside
    names = {str(p.relative_to(out)) for p in written if out in p.parents}
    assert {"config.yaml", "metrics.jsonl", "checkpoints/model_0000001.pth", "checkpoints/model_0000002.pth",
            "eval/latest.json", "eval/metrics_0000002.json"} <= names


def test_dropped_annotations_are_counted_in_the_log(tmp_path):
    """Boxes the dataset drops (crowd, degenerate) and images left without a box are counted, not silent."""
    from hvd_megdet.data.coco import CocoDetection
    images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 10} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [30, 1, 5, 5], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1}]
    ann_file = tmp_path / "a.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 3}]}))
    ds = CocoDetection(str(tmp_path), str(ann_file))
    assert len(ds) == 1
    assert ds.dropped == {"crowd boxes": 1, "degenerate boxes": 2, "images without a usable box": 1}


def test_non_finite_weights_are_found_by_name():
    state = {"model": {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])},
             "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([float("nan")])}}, "step": [torch.ones(1)]},
             "iteration": 7, "ids": torch.tensor([1, 2])}
    assert checkpoint.first_nonfinite(state) == "model.b"
    del state["model"]["b"]
    assert checkpoint.first_nonfinite(state) == "optimizer.state.0.momentum_buffer"
    state["optimizer"]["state"][0]["momentum_buffer"].zero_()
    assert checkpoint.first_nonfinite(state) is None


# Forks a writer that saves checkpoint 1 over and over (the iteration in every element), SIGKILLs it after a
# random 0-200 ms, checks that checkpoint 1 loads whole, and counts the kills that landed mid-write (the
# writer's temporary file was left behind). Prints {"trials", "loadable", "mid_write"}.
KILL_DURING_SAVE = """
import json, os, random, signal, sys, time
import torch
from hvd_megdet import checkpoint
torch.set_num_threads(1)
out, trials = sys.argv[1], int(sys.argv[2])
path = checkpoint.path_for(out, 1)
checkpoint.save({"model": {"w": torch.zeros(1_000_000)}, "iteration": 0}, path)
rng, loadable, mid_write = random.Random(0), 0, 0
for trial in range(trials):
    pid = os.fork()
    if pid == 0:
        for i in range(1, 1_000_000):
            checkpoint.save({"model": {"w": torch.full((1_000_000,), float(i))}, "iteration": i}, path)
    time.sleep(rng.uniform(0.0, 0.2))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    mid_write += any(path.parent.glob(".*.write_atomic-*"))
    try:
        state = checkpoint.load(path)
        loadable += bool((state["model"]["w"] == state["iteration"]).all())
    except checkpoint.CheckpointError:
        pass
print(json.dumps({"trials": trials, "loadable": loadable, "mid_write": mid_write}))
"""


def test_a_writer_killed_mid_save_always_leaves_a_loadable_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path), "20"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loadable"] == result["trials"] == 20, result
    assert result["mid_write"] > 0, result  # the kills did land during saves


# Calls that run code or build objects from data: never in the package (issue "Security").
FORBIDDEN_NAMES = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                        ("marshal", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                        ("importlib", "import_module"), ("os", "system")}


def unsafe_calls(source, filename):
    """[(line, description)] of forbidden calls in `source`, and torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_NAMES:
            found.append((node.lineno, f"{func.id}()"))
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            pair = (func.value.id, func.attr)
            if pair in FORBIDDEN_ATTRIBUTES:
                found.append((node.lineno, ".".join(pair) + "()"))
            if pair == ("torch", "load") and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords):
                found.append((node.lineno, "torch.load() without weights_only=True"))
    return found


def test_the_scan_finds_what_it_looks_for():
    source = "import yaml, torch\neval('1')\nyaml.load(s)\ntorch.load(p)\ntorch.load(p, weights_only=True)\n"
    assert [d for _, d in unsafe_calls(source, "x.py")] == ["eval()", "yaml.load()", "torch.load() without weights_only=True"]


def test_package_source_has_no_unsafe_calls():
    found = [f"{path.relative_to(REPO)}:{line}: {what}"
             for path in sorted((REPO / "hvd_megdet").rglob("*.py"))
             for line, what in unsafe_calls(path.read_text(), str(path))]
    assert not found, found
