"""Faults on real Horovod ranks: errors one rank alone sees, non-finite steps, fp16 loss-scaling overflows, a
killed rank, --resume.

Several short trainings share one launch of 2 ranks (`scenarios`, each launch costs seconds); the tests then
check their parts. The uninterrupted run there is the reference the killed-and-resumed run must repeat.
"""
import hashlib
import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hvd_megdet import checkpoint
from hvd_megdet.data import CocoDetection
from hvd_megdet.data.sampler import TrainBatchSampler
from tests.harness import horovodrun, run_ranks
from tests.tiny_run import CONFIG, overrides, records, train_killed_when

pytestmark = pytest.mark.multirank
NAN_AT = 2  # the 0-based iteration at which rank 1's images become NaN
# fp16 runs start their GradScaler at 2**18 (not torch's 2**16), which makes iterations 0 and 1 overflow here.
FP16_INIT_SCALE = 2.0**18


def digest(state_dict):
    h = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _scenarios(runs):
    """On each rank: train every (name, argv, options) of `runs` in turn; returns {name: outcome}. options:
    "nan" (rank 1's images become NaN at iteration NAN_AT), "resume" (--resume)."""
    import horovod.torch as hvd

    from hvd_megdet import train as trainer
    from hvd_megdet.cli import USER_ERRORS
    from hvd_megdet.config import load_config

    build = trainer.detector_from_config
    trainer.grad_scaler = lambda device, amp: (torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE)
                                               if amp == "fp16" else None)

    def nan_on_rank_1(*args, **kwargs):
        model = build(*args, **kwargs)
        forward, calls = model.forward, itertools.count()

        def forward_with_nan(images, targets=None):
            if model.training and next(calls) == NAN_AT and hvd.rank() == 1:
                images = [img * float("nan") for img in images]
            return forward(images, targets)

        model.forward = forward_with_nan
        return model

    outcomes = {}
    for name, argv, options in runs:
        trainer.detector_from_config = nan_on_rank_1 if options.get("nan") else build
        try:
            model, _ = trainer.train(load_config(CONFIG, argv), resume=options.get("resume", False))
            outcomes[name] = {"digest": digest(model.state_dict())}
        except (FloatingPointError, *USER_ERRORS) as e:
            outcomes[name] = {"error": f"{e.__class__.__name__}: {e}"}
    return outcomes


@pytest.fixture(scope="module")
def bad_image(shapes, tmp_path_factory):
    """A copy of `shapes` whose image loaded by rank 1 (of 2) at iteration 1 is truncated; returns (root, path)."""
    root = tmp_path_factory.mktemp("bad") / "shapes"
    shutil.copytree(shapes, root)
    ds = CocoDetection(str(root / "train"), str(root / "annotations" / "instances_train.json"))
    batches = list(itertools.islice(TrainBatchSampler(ds.aspect_ratios, 2, 1, 2, seed=0), 2))
    rank0 = {i for b in itertools.islice(TrainBatchSampler(ds.aspect_ratios, 2, 0, 2, seed=0), 2) for i in b}
    index = next(i for i in batches[1] if i not in batches[0] and i not in rank0)
    path = Path(ds.image_path(index))
    path.write_bytes(path.read_bytes()[:200])
    return root, path


@pytest.fixture(scope="module")
def one_image(shapes, tmp_path_factory):
    """A copy of `shapes` whose training set is its first image with objects."""
    root = tmp_path_factory.mktemp("one") / "shapes"
    shutil.copytree(shapes, root)
    ann_file = root / "annotations" / "instances_train.json"
    coco = json.loads(ann_file.read_text())
    image_id = coco["annotations"][0]["image_id"]
    coco["images"] = [im for im in coco["images"] if im["id"] == image_id]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == image_id]
    ann_file.write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def bad_val_image(shapes, tmp_path_factory):
    """A copy of `shapes` whose last validation image (rank 1's shard of 2) is truncated; returns (root, path)."""
    root = tmp_path_factory.mktemp("bad_val") / "shapes"
    shutil.copytree(shapes, root)
    ds = CocoDetection(str(root / "val"), str(root / "annotations" / "instances_val.json"), keep_empty=True)
    path = Path(ds.image_path(len(ds) - 1))
    path.write_bytes(path.read_bytes()[:200])
    return root, path


@pytest.fixture(scope="module")
def scenarios(shapes, bad_image, one_image, bad_val_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    fp16 = {"amp": "fp16", "solver.nonfinite": "stop", "solver.max_iter": 4, "checkpoint_period": 2}
    # LARS under everything around the optimizer step: Horovod's averaging, gradient accumulation, fp16 loss
    # scaling, checkpoints and resume.
    lars = {**fp16, "solver.optimizer": "lars", "solver.lars_eta": 0.02, "solver.backward_passes_per_step": 2}
    val = {"data.val.images": bad_val_image[0] / "val",
           "data.val.annotations": bad_val_image[0] / "annotations" / "instances_val.json"}
    runs = [("reference", overrides(shapes, out / "reference"), {}),
            ("skip", overrides(shapes, out / "skip", **{"checkpoint_period": 1, "solver.max_iter": 4}), {"nan": True}),
            ("stop", overrides(shapes, out / "stop", **{"solver.nonfinite": "stop", "model.norm": "bn"}),
             {"nan": True}),
            ("bad_image", overrides(bad_image[0], out / "bad_image"), {}),
            ("one_image", overrides(one_image, out / "one_image"), {}),
            ("bad_val_image", overrides(bad_val_image[0], out / "bad_val_image", **val), {}),
            ("fp16", overrides(shapes, out / "fp16", **fp16), {}),
            ("fp16_first_half", overrides(shapes, out / "fp16_resumed", **{**fp16, "solver.max_iter": 2}), {}),
            ("fp16_resumed", overrides(shapes, out / "fp16_resumed", **fp16), {"resume": True}),
            ("lars", overrides(shapes, out / "lars", **lars), {}),
            ("lars_first_half", overrides(shapes, out / "lars_resumed", **{**lars, "solver.max_iter": 2}), {}),
            ("lars_resumed", overrides(shapes, out / "lars_resumed", **lars), {"resume": True})]
    results = run_ranks(_scenarios, np=2, args=(runs,), timeout=300)
    return out, results


def test_ranks_agree_after_an_uninterrupted_run(scenarios):
    out, (rank0, rank1) = scenarios
    assert rank0["reference"] == rank1["reference"] and "digest" in rank0["reference"]
    assert [r["iteration"] for r in records(out / "reference")] == [1, 2, 3, 4, 5, 6]


def test_a_non_finite_step_on_one_rank_is_skipped_on_both_and_leaves_no_trace(scenarios):
    out, (rank0, rank1) = scenarios
    assert rank0["skip"] == rank1["skip"] and "digest" in rank0["skip"]
    assert [r["skipped"] for r in records(out / "skip")] == [0, 0, 1, 1]
    before, after = (checkpoint.load(checkpoint.path_for(out / "skip", i)) for i in (NAN_AT, NAN_AT + 1))
    # The skipped step changed nothing: weights, CGBN running statistics and momentum are as before it.
    assert digest(before["model"]) == digest(after["model"])
    momentum = [(s["momentum_buffer"], t["momentum_buffer"]) for s, t in
                zip(before["optimizer"]["state"].values(), after["optimizer"]["state"].values())]
    assert all(torch.equal(a, b) for a, b in momentum)
    for i in range(1, 5):
        assert checkpoint.first_nonfinite(checkpoint.load(checkpoint.path_for(out / "skip", i))) is None


def test_a_non_finite_step_with_nonfinite_stop_stops_both_ranks_with_diagnostics(scenarios):
    out, (rank0, rank1) = scenarios
    assert rank0["stop"] == rank1["stop"]
    message = rank0["stop"]["error"]
    assert message.startswith(f"FloatingPointError: iteration {NAN_AT}: non-finite loss on rank 1;")
    diagnostics = json.loads((out / "stop" / f"nonfinite_{NAN_AT:07d}.json").read_text())
    assert diagnostics["iteration"] == NAN_AT and diagnostics["world_size"] == 2
    assert [r["loss_finite"] for r in diagnostics["ranks"]] == [True, False]
    assert all(checkpoint.first_nonfinite(checkpoint.load(p)) is None
               for p in (out / "stop" / "checkpoints").iterdir())
    assert len(records(out / "stop")) == NAN_AT  # nothing recorded for the failed iteration


def test_an_unreadable_image_in_one_shard_stops_every_rank_naming_it(scenarios, bad_image):
    out, (rank0, rank1) = scenarios
    assert rank0["bad_image"] == rank1["bad_image"]
    assert rank0["bad_image"]["error"] == f"DatasetError: rank 1: {bad_image[1]}: not a decodable image " \
                                          f"(corrupt, truncated or empty)"
    assert len(records(out / "bad_image")) == 1  # iteration 0 ran, iteration 1 stopped on both ranks


def test_an_unreadable_validation_image_stops_every_rank_naming_it_and_keeps_the_checkpoint(scenarios,
                                                                                              bad_val_image):
    out, (rank0, rank1) = scenarios
    assert rank0["bad_val_image"] == rank1["bad_val_image"]
    assert rank0["bad_val_image"]["error"] == (f"DatasetError: rank 1: evaluation: {bad_val_image[1]}: not a "
                                               f"decodable image (corrupt, truncated or empty)")
    assert checkpoint.first_nonfinite(checkpoint.load(checkpoint.path_for(out / "bad_val_image", 6))) is None


def test_fp16_overflows_are_counted_apart_and_never_stop_a_run(scenarios):
    out, (rank0, rank1) = scenarios
    assert rank0["fp16"] == rank1["fp16"] and "digest" in rank0["fp16"]  # nonfinite=stop, yet it finished
    fp16 = records(out / "fp16")
    assert [r["amp_overflows"] for r in fp16] == [1, 2, 2, 2]
    assert [r["skipped"] for r in fp16] == [0, 0, 0, 0]
    assert checkpoint.load(checkpoint.path_for(out / "fp16", 2))["scaler"]["scale"] == FP16_INIT_SCALE / 4


def test_a_resumed_fp16_run_continues_exactly(scenarios):
    out, (rank0, rank1) = scenarios
    assert rank0["fp16_resumed"] == rank0["fp16"] == rank1["fp16_resumed"]  # the loss scale came back too
    # The counters go on from the checkpoint's, as the loss scale does (no restart at 0).
    for key in ("loss", "amp_overflows", "skipped"):
        assert [r[key] for r in records(out / "fp16_resumed")] == [r[key] for r in records(out / "fp16")], key


def test_a_lars_run_with_accumulation_and_fp16_keeps_the_ranks_equal_and_resumes_exactly(scenarios):
    out, (rank0, rank1) = scenarios
    assert "digest" in rank0["lars"], rank0["lars"]
    assert rank0["lars"] == rank1["lars"] == rank0["lars_resumed"] == rank1["lars_resumed"]
    assert rank0["lars"] != rank0["fp16"]  # the optimizer did change the training
    assert [r["loss"] for r in records(out / "lars_resumed")] == [r["loss"] for r in records(out / "lars")]


def test_fewer_training_images_than_ranks_is_an_error_on_every_rank(scenarios):
    _, (rank0, rank1) = scenarios
    assert rank0["one_image"] == rank1["one_image"]
    assert rank0["one_image"]["error"].endswith("1 training images for 2 ranks: every rank needs at least one")


# Rank 1 kills itself when it is about to load the batch of iteration 4, right after the checkpoint of
# iteration 4: for its peers it is a rank that vanished mid-run.
KILL_RANK_1 = train_killed_when("hvd.rank() == 1 and calls[0] == 4")


def test_killed_rank_stops_the_job_and_resume_repeats_the_uninterrupted_run(scenarios, shapes, tmp_path):
    out, _ = scenarios
    run = tmp_path / "killed"
    args = ["--config", CONFIG, *overrides(shapes, run)]
    killed = horovodrun(2, [sys.executable, "-c", KILL_RANK_1, *args], timeout=150)
    assert killed.returncode != 0
    # horovodrun names the lost rank and stops the others; the survivor names it too, unless horovodrun's
    # SIGTERM reaches it before its own error does (both take about a second).
    assert "Process 1 exit with status code 137" in killed.stdout, killed.stdout[-3000:]
    assert "Terminating remaining workers after failure of Process" in killed.stdout
    assert ("error: rank 0: a collective failed: rank 1 has exited" in killed.stdout
            or "[0]<stderr>:Terminated" in killed.stdout), killed.stdout[-3000:]
    resumed = horovodrun(2, [sys.executable, "-m", "hvd_megdet.train", "--resume", *args], timeout=150)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    # The job ends with the same losses, iteration by iteration, as the run that was never interrupted.
    reference = records(out / "reference")
    assert [r["iteration"] for r in records(run)] == [r["iteration"] for r in reference]
    for mine, theirs in zip(records(run), reference):
        assert {k: mine[k] for k in ("loss", "lr", "skipped")} == {k: theirs[k] for k in ("loss", "lr", "skipped")}
    final = checkpoint.load(checkpoint.path_for(run, 6))["model"]
    assert digest(final) == digest(checkpoint.load(checkpoint.path_for(out / "reference", 6))["model"])
