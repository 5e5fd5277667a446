"""End-to-end training on real Horovod ranks: ranks stay in lockstep, the loss falls, outputs are written."""
import json
import sys
from pathlib import Path

import pytest

from hvd_megdet.data.synthetic import make_dataset
from tests.harness import horovodrun, run_ranks

pytestmark = pytest.mark.multirank
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(str(root), num_train=24, num_val=6, seed=1)
    return root


def overrides(data_root, out, **extra):
    items = {
        "data.train.images": data_root / "train",
        "data.train.annotations": data_root / "annotations" / "instances_train.json",
        "data.val.images": data_root / "val",
        "data.val.annotations": data_root / "annotations" / "instances_val.json",
        "data.num_workers": 0, "output_dir": out, "solver.ims_per_gpu": 2, "solver.max_iter": 8,
        "solver.warmup_iters": 2, "solver.steps": "[6]", "checkpoint_period": 4, "log_period": 1,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def _train_and_digest(argv):
    import hashlib

    from hvd_megdet.config import load_config
    from hvd_megdet.train import train
    cfg = load_config(REPO / "configs" / "demo_shapes.yaml", argv)
    model, metrics = train(cfg)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest(), metrics


def read_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_losses(out):
    return [r["loss"] for r in read_records(out)]


def test_two_ranks_train_in_lockstep_with_cgbn(shapes, tmp_path):
    out = tmp_path / "run"
    results = run_ranks(_train_and_digest, np=2, args=(overrides(shapes, out, **{"model.norm": "cgbn"}),),
                        timeout=300)
    (digest0, metrics0), (digest1, metrics1) = results
    assert digest0 == digest1, "parameters and buffers differ between ranks after training"
    assert repr(metrics0) == repr(metrics1) and set(metrics0) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    losses = read_losses(out)
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2]), f"loss did not fall: {losses}"
    latest = json.loads((out / "eval" / "latest.json").read_text())
    assert latest["iteration"] == 8 and set(latest["bbox"]) == set(metrics0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["model_0000004.pth", "model_0000008.pth"]
    assert (out / "config.yaml").is_file()


def test_horovodrun_command_line_and_evaluate(shapes, tmp_path):
    """The documented commands: train under horovodrun, then evaluate the checkpoint alone (channels_last)."""
    out = tmp_path / "cli"
    args = overrides(shapes, out, **{"solver.max_iter": 3, "checkpoint_period": 100, "model.norm": "bn",
                                     "channels_last": "true"})
    proc = horovodrun(2, [sys.executable, "-m", "hvd_megdet.train", "--config", "configs/demo_shapes.yaml", *args],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # 2 ranks x 2 images = global batch 4: lr 0.08 x 4/16 = 0.02 (linear scaling rule), after a linear warmup
    # from 0.01 x that over 2 iterations.
    records = read_records(out)
    assert [r["world_size"] for r in records] == [2, 2, 2]
    assert [r["lr"] for r in records] == pytest.approx([0.02 * 0.01, 0.02 * 0.505, 0.02])
    ckpt = out / "checkpoints" / "model_0000003.pth"
    assert ckpt.is_file()
    eval_out = tmp_path / "eval_only"
    proc = horovodrun(2, [sys.executable, "-m", "hvd_megdet.evaluate", "--config", "configs/demo_shapes.yaml",
                          *overrides(shapes, eval_out, **{"model.norm": "bn", "model.weights": ckpt,
                                                          "channels_last": "true"})],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((eval_out / "eval" / "latest.json").read_text())["iteration"] == 3


def _train_twice_and_compare(argv, precise_bn_iters):
    """Train per `argv` without and with PreciseBN; the largest parameter difference, and whether the buffers
    differ (PreciseBN is meant to change the running statistics, and only them)."""
    from hvd_megdet.config import load_config
    from hvd_megdet.train import train
    models = [train(load_config(REPO / "configs" / "demo_shapes.yaml",
                                [*argv[n], f"test.precise_bn_iters={iters}"]))[0]
              for n, iters in enumerate((0, precise_bn_iters))]
    params = [dict(m.named_parameters()) for m in models]
    largest = max((params[0][k] - params[1][k]).abs().max().item() for k in params[0])
    buffers = [dict(m.named_buffers()) for m in models]
    return largest, any(not buffers[0][k].equal(buffers[1][k]) for k in buffers[0] if "running" in k)


def test_precise_bn_leaves_the_training_run_as_it_was(shapes, tmp_path):
    """PreciseBN's forward passes before a checkpoint draw from the random number generators (the RPN's and
    RoI heads' samplers): the run after them must still be the run without PreciseBN, parameter for parameter."""
    argv = [overrides(shapes, tmp_path / name, **{"data.val.annotations": "", "input.min_size": "[96]",
                                                   "input.max_size": 128})
            for name in ("ema", "precise")]
    ranks = run_ranks(_train_twice_and_compare, np=2, args=(argv, 2), timeout=300)
    assert ranks[0] == ranks[1] == (0.0, True)


def _detections(path):
    """{image_id: [(category, score, box), ...] sorted by score} of a COCO results file."""
    by_image = {}
    for d in json.loads(Path(path).read_text()):
        by_image.setdefault(d["image_id"], []).append((d["category_id"], d["score"], d["bbox"]))
    return {k: sorted(v, key=lambda d: -d[1]) for k, v in by_image.items()}


@pytest.mark.parametrize("norm", [{"model.norm": "bn"},
                                  {"model.norm": "cgbn", "model.bn_group_size": 1,
                                   "solver.backward_passes_per_step": 2}], ids=["bn", "cgbn_groups_of_1"])
def test_the_model_evaluated_in_training_is_the_model_saved(shapes, tmp_path, norm):
    """With BN statistics per rank (or per group), the training's final evaluation and `hvd_megdet.evaluate` of
    the final checkpoint in one process give the same detections, image by image: the ranks' running
    statistics are made one model's (averaged) before both."""
    out = tmp_path / "train"
    args = overrides(shapes, out, **{"solver.max_iter": 4, "checkpoint_period": 100, "solver.base_lr": 0.02,
                                     "input.min_size": "[96]", "input.max_size": 128, **norm})
    proc = horovodrun(2, [sys.executable, "-m", "hvd_megdet.train", "--config", "configs/demo_shapes.yaml", *args],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    if "solver.backward_passes_per_step" in norm:
        # 2 ranks x 2 images x 2 backward passes = global batch 8: lr 0.02 x 8/16 = 0.01, after the warmup.
        records = read_records(out)
        assert [r["world_size"] for r in records] == [2, 2, 2, 2]
        assert [r["lr"] for r in records] == pytest.approx([0.01 * 0.01, 0.01 * 0.505, 0.01, 0.01])
    ckpt = out / "checkpoints" / "model_0000004.pth"
    alone = tmp_path / "evaluate"
    proc = horovodrun(1, [sys.executable, "-m", "hvd_megdet.evaluate", "--config", "configs/demo_shapes.yaml",
                          *overrides(shapes, alone, **{"model.weights": ckpt, "input.min_size": "[96]",
                                                       "input.max_size": 128, **norm})], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    in_training, evaluated = (_detections(d / "eval" / "detections_0000004.json") for d in (out, alone))
    assert in_training.keys() == evaluated.keys() and sum(map(len, in_training.values())) > 0
    for image_id, dets in in_training.items():
        assert len(dets) == len(evaluated[image_id]), image_id
        for (cat, score, box), (cat2, score2, box2) in zip(dets, evaluated[image_id]):
            assert cat == cat2 and score == pytest.approx(score2, abs=1e-4), image_id
            assert box == pytest.approx(box2, abs=1e-2), image_id

