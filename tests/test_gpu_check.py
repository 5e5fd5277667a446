"""The GPU check (scripts/gpu_check.sh, hvd_megdet.bench.gpu) on the CPU: its dry run end to end, the judge of the
BN comparison, and the set-up's refusal of a bad local Horovod sdist. On a machine with a GPU the dry run also
runs the CUDA steps, at tiny sizes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hvd_megdet.bench import gpu

REPO = Path(__file__).resolve().parents[1]


def _script(args, env, timeout):
    return subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHON": sys.executable, **env}, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.multirank  # its BN comparison at np=2 runs two Horovod ranks
def test_dry_run_writes_one_json_with_every_step(tmp_path):
    out = tmp_path / "check" / "gpu_check.json"
    proc = _script(["scripts/gpu_check.sh", "--dry-run", "--out", str(out)], {}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())

    setup = result["setup"]  # the set-up ran install_horovod.sh, which found Horovod installed
    assert setup["horovod_setup_status"] == "ok" and setup["horovod_setup_seconds"] >= 0
    assert "already installed" in (tmp_path / "check" / "gpu_check_setup.log").read_text()
    assert result["meta"]["dry_run"] and result["meta"]["total_seconds"] > 0
    assert result["environment"]["status"] == "ok" and result["environment"]["horovod_built"]["gloo"]

    cuda = torch.cuda.is_available()
    if not cuda:
        assert result["cuda_tests"] == {"status": "skipped", "seconds": 0.0,
                                        "reason": gpu._no_cuda_reason()}
        assert result["cuda_tests"]["reason"].startswith("no CUDA device")
    for np_key in ("np1", "np2"):
        bn = result["bn"][np_key]
        assert bn["status"] == "ok", bn
        cases = {(r["dtype"], r["fused"], r["two_phase"], r["channels_last"]) for r in bn["rows"]}
        assert cases == set(gpu.bn_cases(torch.device("cuda" if cuda else "cpu")))
        for row in bn["rows"]:
            assert set(row["cgbn"]) == set(row["batchnorm"]) == set(gpu.QUANTITIES)
            assert all(0 <= e < 0.05 for e in row["cgbn"].values()), row
        if not cuda:
            assert bn["fused_kernels"].startswith("not run")

    t = result["throughput"]
    assert t["status"] == "ok" and t["image_size"] == [128, 192]
    expected = set(gpu.VARIANTS) if cuda else set(gpu.VARIANTS) - {"hvd_megdet_cgbn_fused"}
    assert set(t["variants"]) == expected
    for v in t["variants"].values():
        assert v["images_per_s"] > 0 and math.isfinite(v["loss"]) and len(v["per_round"]) == t["rounds"]
    assert t["ratio_vs_torchvision"]["torchvision"] == 1.0
    if not cuda:
        assert t["note"].startswith("dry run on the CPU") and "target_met" not in t
    summary = "\n".join(result["summary"])
    for step in ("environment: ok", "cuda_tests: ", "bn np1: ok", "bn np2: ok", "throughput (", "judged on this row"):
        assert step in summary, summary


def _judged(layer_class, monkeypatch):
    """compare_bn's verdict when CGBN is replaced by `layer_class` (a world of 1 without Horovod collectives)."""
    monkeypatch.setattr(gpu, "_force_collectives", lambda module: module)
    monkeypatch.setattr("hvd_megdet.sync_bn.SyncBatchNorm", layer_class)
    return gpu.compare_bn(torch.device("cpu"), torch.float32, False, True, False, shape=(4, 5, 6))


def test_bn_comparison_passes_batchnorm_and_fails_a_wrong_layer(monkeypatch):
    class Right(nn.BatchNorm2d):
        def __init__(self, channels, two_phase, cuda_kernels=False):
            super().__init__(channels)

    class WrongEps(Right):  # normalizes with eps 0.5: outputs and input gradients off
        def forward(self, x):
            self.eps = 0.5
            return super().forward(x)

    class WrongMomentum(nn.BatchNorm2d):  # right outputs and gradients, running statistics moved too far
        def __init__(self, channels, two_phase, cuda_kernels=False):
            super().__init__(channels, momentum=0.5)

    right = _judged(Right, monkeypatch)
    assert right["ok"] and all(right["within"].values())
    wrong = _judged(WrongEps, monkeypatch)
    assert not wrong["ok"] and not wrong["within"]["output"] and not wrong["within"]["grad_input"]
    moved = _judged(WrongMomentum, monkeypatch)
    assert not moved["ok"] and moved["within"]["output"] and moved["within"]["grad_weight"]
    assert not moved["within"]["running_mean"] and not moved["within"]["running_var"]


def test_setup_notes_and_pytest_outcomes(tmp_path):
    (tmp_path / "notes").write_text("started_epoch=1764630000.25\nnproc=16\ngpu=NVIDIA H200, 580.1, 143771 MiB\n"
                                    "horovod_setup_status=failed (exit 1), see x.log\nno separator\n")
    assert gpu.read_setup(tmp_path / "notes") == {
        "started_epoch": 1764630000.25, "nproc": 16, "gpu": "NVIDIA H200, 580.1, 143771 MiB",
        "horovod_setup_status": "failed (exit 1), see x.log"}
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="boom">x</failure>'
        '</testcase><testcase name="c"><skipped message="no CUDA"/></testcase></testsuite></testsuites>')
    assert gpu._junit_outcomes(tmp_path / "junit.xml") == {
        "a": {"outcome": "passed", "message": ""}, "b": {"outcome": "failed", "message": "boom"},
        "c": {"outcome": "skipped", "message": "no CUDA"}}
    assert "two GPUs" in gpu._known_cause("NCCL WARN Duplicate GPU detected : rank 1 and rank 0 both on CUDA")
    assert gpu._known_cause("some other error") is None


def test_the_check_needs_no_package_missing_on_the_gpu_machine():
    # A GPU machine set up for the check alone may lack pycocotools and albumentations (README.md, "GPU check");
    # the check must not import them.
    code = ("import sys; sys.modules.update(pycocotools=None, albumentations=None)\n"
            "import hvd_megdet.bench.gpu, hvd_megdet.model, hvd_megdet.sync_bn, hvd_megdet.process\n"
            "import tests.test_sync_bn, torchvision.models.detection\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_install_horovod_refuses_a_local_sdist_with_the_wrong_checksum(tmp_path):
    bad = tmp_path / "horovod-0.28.1.tar.gz"
    bad.write_bytes(b"not Horovod")
    # another architecture list: a build key that is not installed, so the script goes on to the sdist
    env = {"HOROVOD_SDIST": str(bad), "HOROVOD_BUILD_CUDA_CC_LIST": "00", "PIP_NO_INDEX": "1",
           "HOROVOD_WHEEL_CACHE": str(tmp_path / "cache")}
    proc = _script(["scripts/install_horovod.sh"], env, timeout=120)
    assert proc.returncode == 1 and "sha256 mismatch for horovod-0.28.1.tar.gz" in proc.stdout, proc.stdout
    proc = _script(["scripts/install_horovod.sh"], {**env, "HOROVOD_SDIST": str(tmp_path / "missing.tar.gz")}, 120)
    assert proc.returncode == 1 and "cannot read it" in proc.stdout, proc.stdout
    assert not list((tmp_path / "cache").rglob("*.whl"))
