"""The ablation runner: grid expansion, resume, divergence detection, the table, and a tiny real grid."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hvd_megdet.config import ConfigError
from hvd_megdet.experiments import ablation, report
from hvd_megdet.experiments import runs as runner  # `runs` names lists of runs here
from hvd_megdet.experiments.grid import expand, load_grid

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "configs" / "demo_shapes.yaml")


def write_grid(tmp_path, **fields):
    grid = {"base": BASE, "epochs": 2, "ims_per_gpu": 2, "warmup_epochs": 0.5, "steps_epochs": [1.5],
            "train_images": 48, "overrides": {"solver.base_lr": 0.02}, "axes": {"batch": [2, 4, 8], "norm": ["frozen", "bn", "cgbn"],
                                         "warmup": [True, False], "bn_group_size": [0, 2, 3]}}
    grid.update(fields)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def expand_file(path):
    return expand(load_grid(path))


def test_expansion_merges_duplicates_and_skips_invalid_bn_groups(tmp_path):
    runs, notes, blocks = expand_file(write_grid(tmp_path))
    names = [r.name for r in runs]
    # batch 2 = 1 rank: CGBN over one rank is per-rank BN (merged with bn); group 2 or 3 does not divide 1.
    # batch 4 = 2 ranks: group 0 (all) and 2 are the same run; 3 does not divide 2.
    # batch 8 = 4 ranks: groups of 4 and 2; 3 does not divide 4.
    expected = []
    for batch, ranks, cgbn in ((2, 1, []), (4, 2, [4]), (8, 4, [8, 4])):
        for warmup in ("_warmup", "_nowarmup"):
            expected += [f"b{batch}_{ranks}x2_frozen{warmup}_s0", f"b{batch}_{ranks}x2_bn2{warmup}_s0"]
            expected += [f"b{batch}_{ranks}x2_cgbn{size}{warmup}_s0" for size in cgbn]
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))
    assert sum("does not divide" in n for n in notes) == 8  # (b2: 2, 3; b4: 3; b8: 3) x warmup on / off
    assert blocks == [("axes[0]", [r.setting for r in runs])]

    by_name = {r.name: r for r in runs}
    r = by_name["b8_4x2_cgbn4_warmup_s0"]
    # 48 images / batch 8 = 6 iterations per epoch; 2 epochs; warmup 0.5 epoch; lr 0.02 x 8 / 16.
    assert (r.ranks, r.bn_group_size, r.bn_images, r.iters_per_epoch, r.max_iter, r.warmup_iters) == (4, 2, 4, 6, 12, 3)
    assert (r.setting, r.seed, r.passes, r.lr_scaling) == ("b8_4x2_cgbn4_warmup", 0, 1, "linear")
    assert r.lr == pytest.approx(0.01)
    assert {"model.norm=cgbn", "model.bn_group_size=2", "solver.max_iter=12", "solver.steps=[9]",
            "solver.warmup_iters=3", "eval_period=6", "solver.ims_per_gpu=2", "solver.backward_passes_per_step=1",
            "seed=0"} <= set(r.overrides)
    r = by_name["b2_1x2_bn2_nowarmup_s0"]
    assert (r.ranks, r.norm, r.bn_images, r.iters_per_epoch, r.max_iter, r.warmup_iters) == (1, "bn", 2, 24, 48, 0)
    assert r.lr == pytest.approx(0.0025)
    assert by_name["b4_2x2_frozen_warmup_s0"].bn_images == 0


def test_seeds_layouts_accumulation_and_the_unscaled_control(tmp_path):
    runs, notes, blocks = expand_file(write_grid(tmp_path, overrides={"solver.base_lr": 0.02, "solver.base_batch": 8},
                                                 axes=[
        # 2 ranks whatever the batch; lr scaled and unscaled (at batch 8 = base_batch they are one run)
        {"title": "scaling", "batch": [8, 32], "ranks": 2, "lr_scaling": ["linear", "none"], "seed": [0, 1]},
        # BN size at batch 32 on 4 ranks x 2 images x 4 passes: groups of 1, 2 and 4 ranks
        {"title": "bn size", "batch": [32], "ranks": 4, "backward_passes_per_step": 4, "norm": ["cgbn"],
         "bn_group_size": [1, 2, 0], "seed": [0]},
        {"batch": [32], "ranks": 2, "seed": [1]}]))  # already in the first block: no new run
    assert [r.name for r in runs] == [  # every setting's first seed first
        "b8_2x4_cgbn8_warmup_s0", "b32_2x16_cgbn32_warmup_s0", "b32_2x16_cgbn32_warmup_unscaled_s0",
        "b32_4x2x4_bn2_warmup_s0", "b32_4x2x4_cgbn4_warmup_s0", "b32_4x2x4_cgbn8_warmup_s0",
        "b8_2x4_cgbn8_warmup_s1", "b32_2x16_cgbn32_warmup_s1", "b32_2x16_cgbn32_warmup_unscaled_s1"]
    assert blocks == [("scaling", ["b8_2x4_cgbn8_warmup", "b32_2x16_cgbn32_warmup", "b32_2x16_cgbn32_warmup_unscaled"]),
                      ("bn size", ["b32_4x2x4_bn2_warmup", "b32_4x2x4_cgbn4_warmup", "b32_4x2x4_cgbn8_warmup"]),
                      ("axes[2]", ["b32_2x16_cgbn32_warmup"])]
    by_name = {r.name: r for r in runs}
    scaled, unscaled = by_name["b32_2x16_cgbn32_warmup_s1"], by_name["b32_2x16_cgbn32_warmup_unscaled_s1"]
    assert scaled.lr == pytest.approx(0.08) and unscaled.lr == pytest.approx(0.02)
    assert "solver.base_batch=32" in unscaled.overrides and "solver.base_batch=32" not in scaled.overrides
    assert "seed=1" in scaled.overrides and scaled.iters_per_epoch == 2  # 48 images / 32
    r = by_name["b32_4x2x4_cgbn4_warmup_s0"]
    assert (r.ranks, r.ims_per_gpu, r.passes, r.bn_group_size, r.bn_images) == (4, 2, 4, 2, 4)
    assert {"solver.ims_per_gpu=2", "solver.backward_passes_per_step=4", "model.bn_group_size=2"} <= set(r.overrides)
    # the trainer gets the lr the table shows: base_lr x batch / base_batch with the run's own overrides
    from hvd_megdet.config import load_config
    for r in (scaled, unscaled, by_name["b8_2x4_cgbn8_warmup_s0"]):
        cfg = load_config(BASE, r.overrides)
        assert cfg.solver.base_lr * r.batch / cfg.solver.base_batch == pytest.approx(r.lr)


def test_optimizer_base_lr_and_warmup_length_axes(tmp_path):
    """A block can vary the optimizer, the base lr and the warmup length in epochs; names say what differs from
    the grid's defaults, so a block repeating a default merges with the run it repeats."""
    runs, _, blocks = expand_file(write_grid(tmp_path, overrides={"solver.base_lr": 0.02, "solver.base_batch": 8},
                                             axes=[
        {"batch": [8, 32], "ranks": 2},
        {"title": "lars", "batch": [32], "ranks": 2, "optimizer": ["lars"], "base_lr": [0.02, 1.5]},
        {"title": "warmup", "batch": [32], "ranks": 2, "warmup_epochs": [0.5, 1.5], "warmup": [True, False]}]))
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == sorted([
        "b8_2x4_cgbn8_warmup_s0", "b32_2x16_cgbn32_warmup_s0", "b32_2x16_cgbn32_warmup_lars_s0",
        "b32_2x16_cgbn32_warmup_lars_lr1.5_s0", "b32_2x16_cgbn32_warmup1.5ep_s0", "b32_2x16_cgbn32_nowarmup_s0"])
    assert blocks[2] == ("warmup", ["b32_2x16_cgbn32_warmup", "b32_2x16_cgbn32_warmup1.5ep",
                                    "b32_2x16_cgbn32_nowarmup"])
    lars = by_name["b32_2x16_cgbn32_warmup_lars_lr1.5_s0"]
    assert (lars.optimizer, lars.lr) == ("lars", pytest.approx(1.5 * 32 / 8))
    assert {"solver.optimizer=lars", "solver.base_lr=1.5"} <= set(lars.overrides)
    assert "solver.optimizer=sgd" in by_name["b32_2x16_cgbn32_warmup_s0"].overrides
    # 48 images / batch 32 = 2 iterations per epoch: warmup 0.5 epoch = 1 iteration, 1.5 epochs = 3
    long, short = by_name["b32_2x16_cgbn32_warmup1.5ep_s0"], by_name["b32_2x16_cgbn32_warmup_s0"]
    assert (long.warmup_epochs, long.warmup_iters, short.warmup_epochs, short.warmup_iters) == (1.5, 3, 0.5, 1)
    assert by_name["b32_2x16_cgbn32_nowarmup_s0"].warmup_epochs == 0
    from hvd_megdet.config import load_config
    cfg = load_config(BASE, lars.overrides)
    assert (cfg.solver.optimizer, cfg.solver.base_lr * lars.batch / cfg.solver.base_batch) == ("lars",
                                                                                                pytest.approx(lars.lr))


def test_commands_use_the_launcher_for_several_ranks_only(tmp_path):
    grid = load_grid(write_grid(tmp_path, launcher=["mpirun", "-n", "{np}"]))
    runs, _, _ = expand(grid)
    by_name = {r.name: r for r in runs}
    one = runner.command(by_name["b2_1x2_bn2_warmup_s0"], tmp_path / "a", grid)
    four = runner.command(by_name["b8_4x2_cgbn8_warmup_s0"], tmp_path / "b", grid)
    assert one[1:4] == ["-m", "hvd_megdet.train", "--config"] and one[-1] == f"output_dir={tmp_path / 'a'}"
    assert four[:3] == ["mpirun", "-n", "4"] and four[3:] == runner.command(by_name["b8_4x2_cgbn8_warmup_s0"],
                                                                           tmp_path / "b", grid)[3:]


@pytest.mark.parametrize("fields, message", [
    ({"epoch": 3}, "unknown key epoch"),
    ({"axes": {"batch": [2], "norms": ["bn"]}}, "unknown key axes[0].norms"),
    ({"axes": {"batch": [3]}}, "batch 3 is not a positive multiple of ims_per_gpu 2 x 1 passes"),
    ({"axes": {"batch": [4], "backward_passes_per_step": 4}}, "multiple of ims_per_gpu 2 x 4 passes"),
    ({"axes": {"batch": [6], "ranks": 4}}, "batch 6 is not a positive multiple of 4 ranks x 1 passes"),
    ({"axes": {"batch": [4], "ranks": -1}}, "ranks must be >= 0"),
    ({"axes": {"batch": [4], "backward_passes_per_step": 0}}, "backward_passes_per_step >= 1"),
    ({"axes": {"batch": [2], "norm": ["gn"]}}, "norm must be among"),
    ({"axes": {"batch": [2], "lr_scaling": ["sqrt"]}}, "lr_scaling must be among linear, none"),
    ({"axes": {"batch": [2], "seed": [-1]}}, "seed must be >= 0"),
    ({"overrides": {"solver.max_iter": 5}}, "overrides.solver.max_iter is set by the grid"),
    ({"overrides": {"seed": 5}}, "overrides.seed is set by the grid"),
    ({"launcher": ["horovodrun", "-np", "4"]}, "launcher must contain"),
])
def test_bad_grid_files_name_the_key(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_grid(write_grid(tmp_path, **fields))


def test_bad_trainer_override_names_the_run(tmp_path):
    grid = load_grid(write_grid(tmp_path, overrides={"solver.base_lrr": 0.1}))
    with pytest.raises(ConfigError, match="unknown key solver.base_lrr"):
        expand(grid)
    # A step at 0.05 epochs is iteration 1 at batch 2 and 4 (24 and 12 iterations per epoch) but iteration 0,
    # which the trainer refuses, at batch 8 (6 per epoch): the first run at batch 8 is named.
    grid = load_grid(write_grid(tmp_path, steps_epochs=[0.05]))
    with pytest.raises(ConfigError, match=r"run b8_4x2_frozen_warmup_s0: .*solver.steps must be positive"):
        expand(grid)


def test_paper_grid_expands_to_the_paper_setting():
    grid = load_grid(REPO / "configs" / "ablation" / "coco_paper.yaml")
    grid.train_images = 117266  # not counted here: the COCO annotations are not on this machine
    runs, _, _ = expand(grid)
    assert {r.batch for r in runs} == {16, 32, 64, 128, 256}
    for r in runs:
        assert r.ranks * 2 == r.batch and r.lr == pytest.approx(0.02 * r.batch / 16)
        assert "--config" in runner.command(r, Path("x"), grid)


def test_divergence_detection():
    falling = [2.0 - 1.5 * i / 99 for i in range(100)]
    assert runner.divergence(falling, skipped=0) is None
    spike = falling[:50] + [40.0] + falling[51:]
    assert "exploded: 40 at iteration 51" in runner.divergence(spike, skipped=0)
    assert runner.divergence(spike, skipped=0, explode_factor=100) is None
    rising = [1.0 + 0.01 * i for i in range(100)]
    assert "did not decrease" in runner.divergence(rising, skipped=0)
    with_nan = falling[:10] + [math.nan] + falling[11:]
    assert "1 non-finite steps skipped" in runner.divergence(with_nan, skipped=1)
    assert runner.divergence(with_nan, skipped=1, max_skipped=1) is None
    assert runner.divergence([math.nan, math.inf], skipped=2, max_skipped=5) == "no finite loss"


def fake_result(name, batch, norm, bn_images, status, ap, reason=None, warmup=True, seed=0, scaling="linear",
                optimizer="sgd"):
    return {"name": f"{name}_s{seed}", "setting": name, "seed": seed, "batch": batch, "ranks": batch // 2,
            "ims_per_gpu": 2, "passes": 1, "norm": norm, "bn_images": bn_images, "lr_scaling": scaling,
            "lr": 0.02 * (batch if scaling == "linear" else 16) / 16, "warmup": warmup, "optimizer": optimizer,
            "warmup_epochs": 1.0 if warmup else 0.0, "warmup_iters": 100 if warmup else 0, "AP": ap, "AP50": None if ap is None else ap + 20,
            "final_loss": None if ap is None else 0.5, "train_time_s": 5400.0, "status": status, "reason": reason,
            "ap_by_epoch": [] if ap is None else [{"epoch": 1.0, "AP": ap / 2, "AP50": ap / 2 + 10},
                                                  {"epoch": 2.0, "AP": ap, "AP50": ap + 20}]}


def test_table_has_the_papers_columns_and_pools_the_seeds():
    results = [fake_result("a", 16, "frozen", 0, "converged", 30.0),
               fake_result("a", 16, "frozen", 0, "converged", 31.0, seed=1),
               fake_result("b", 256, "cgbn", 256, "converged", 37.0),
               fake_result("u", 256, "cgbn", 256, "converged", 20.0, scaling="none"),
               fake_result("c", 128, "frozen", 0, "diverged", None, reason="loss exploded | at 3"),
               fake_result("c", 128, "frozen", 0, "converged", 1.0, seed=1),
               fake_result("d", 64, "bn", 2, "failed", None, reason="exit status 1", warmup=False),
               fake_result("l", 256, "cgbn", 256, "converged", 38.0, optimizer="lars")]
    lines = report.table(results).splitlines()
    assert lines[0] == ("| batch | ranks x images | BN | BN size | optimizer | lr | warmup | seeds | AP | AP50 "
                        "| spread AP / AP50 | loss | converged | time |")
    assert len(lines) == 2 + 6
    assert lines[2] == ("| 16 | 8 x 2 | frozen | - | SGD | 0.02 | 1 ep (100 it) | 0, 1 | 30.5 | 50.5 | 1.0 / 1.0 "
                        "| 0.5 | 2/2 | 1.50 h |")
    assert lines[3] == ("| 256 | 128 x 2 | CGBN | 256 | SGD | 0.32 | 1 ep (100 it) | 0 | 37.0 | 57.0 | - / - | 0.5 "
                        "| 1/1 | 1.50 h |")
    assert lines[4].startswith("| 256 | 128 x 2 | CGBN | 256 | SGD | 0.02 (unscaled) | 1 ep (100 it) | 0 | 20.0 |")
    assert lines[5] == ("| 128 | 64 x 2 | frozen | - | SGD | 0.16 | 1 ep (100 it) | 0, 1 | 1.0 | 21.0 | - / - | 0.5 "
                        "| 1/2; s0 loss exploded / at 3 | 1.50 h |")
    assert lines[6] == ("| 64 | 32 x 2 | BN | 2 | SGD | 0.08 | no | 0 | - | - | - / - | - | 0/1; s0 failed: exit "
                        "status 1 | 1.50 h |")
    assert lines[7].startswith("| 256 | 128 x 2 | CGBN | 256 | LARS | 0.32 | 1 ep (100 it) | 0 | 38.0 |")

    stopped = ("[1]<stderr>:error: FloatingPointError: iteration 7: non-finite loss on rank 0, 1; stopping "
               "(solver.nonfinite=stop); diagnostics in out/nonfinite_0000007.json")
    assert report.brief(stopped) == "non-finite at iteration 7: non-finite loss on rank 0, 1"
    assert report.brief("exit status 1") == "exit status 1" and report.brief(None) is None

    epochs = report.epoch_table(results).splitlines()
    assert epochs[0] == "| setting | 1 | 2 |"
    assert epochs[2] == "| a | 15.2 / 25.2 | 30.5 / 50.5 |"
    assert epochs[-2] == "| d | - | - |" and epochs[-3] == "| c | - | - |"  # c: only epochs all seeds reached
    runs = report.run_table(results).splitlines()
    assert runs[0] == "| run | AP | AP50 | loss | time | outcome |" and len(runs) == 2 + len(results)
    assert runs[2] == "| a_s0 | 30.0 | 50.0 | 0.5 | 1.50 h | converged |"
    assert runs[6] == "| c_s0 | - | - | - | 1.50 h | diverged: loss exploded / at 3 |"


class FakeTrainer:
    """Stands in for `execute`: writes what the trainer would (falling loss, one eval per epoch)."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cmd, output_path, timeout):
        out = Path(cmd[-1].split("=", 1)[1])
        args = dict(a.split("=", 1) for a in cmd if "=" in a)
        max_iter, ipe = int(args["solver.max_iter"]), int(args["eval_period"])
        self.calls.append(out.name)
        if out.name in self.fail:
            output_path.write_text("Traceback\nRuntimeError: boom\n")
            return 1
        with open(out / "metrics.jsonl", "w") as f:
            for i in range(1, max_iter + 1):
                f.write(json.dumps({"iteration": i, "epoch": i / ipe, "lr": 0.01, "loss": 2.0 - i / max_iter,
                                    "skipped": 0, "time": 0.5}) + "\n")
        (out / "eval").mkdir()
        for it in range(ipe, max_iter + 1, ipe):
            (out / "eval" / f"metrics_{it:07d}.json").write_text(json.dumps(
                {"iteration": it, "bbox": {"AP": it / max_iter * 10, "AP50": it / max_iter * 20}}))
        output_path.write_text("done\n")
        return 0


def test_resume_runs_only_what_is_not_done(tmp_path):
    grid_path = write_grid(tmp_path, axes=[{"batch": [2, 4], "norm": ["frozen", "cgbn"], "title": "norms"},
                                           {"batch": [4], "norm": ["cgbn"], "title": "batch 4"}])
    grid = load_grid(grid_path)
    runs, _, blocks = expand(grid)
    names = [r.name for r in runs]
    assert names == ["b2_1x2_frozen_warmup_s0", "b2_1x2_bn2_warmup_s0", "b4_2x2_frozen_warmup_s0",
                     "b4_2x2_cgbn4_warmup_s0"]
    out = tmp_path / "out"

    first = FakeTrainer(fail={"b4_2x2_frozen_warmup_s0"})
    results = ablation.run_grid(runs[:3], grid, out, grid_path, execute=first, log=lambda *a: None)
    assert first.calls == names[:3]
    assert [r["status"] for r in results] == ["converged", "converged", "failed"]
    assert "RuntimeError: boom" in results[2]["log_tail"]
    # every result names the commit of the code that ran it, "+changes" when tracked files differ from it
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    expected = head + ("+changes" if dirty else "") if head else "unknown"  # "unknown": not a git checkout
    assert all(r["commit"] == expected for r in results)
    # An interrupted run: trainer outputs but no result.json.
    (out / names[3]).mkdir()
    (out / names[3] / "metrics.jsonl").write_text('{"iteration": 1, "loss": 1.0, "skipped": 0, "time": 1}\n')

    second = FakeTrainer()
    results = ablation.run_grid(runs, grid, out, grid_path, execute=second, log=lambda *a: None, blocks=blocks)
    assert second.calls == names[2:]  # the failed and the interrupted run; the done ones are kept
    assert [r["status"] for r in results] == ["converged"] * 4
    assert [e["epoch"] for e in results[3]["ap_by_epoch"]] == [1.0, 2.0]
    assert results[3]["iterations_done"] == runs[3].max_iter  # the stale metrics line is gone

    # Changing a setting (here the epochs) makes every run a new one.
    grid.epochs = 1
    third = FakeTrainer()
    ablation.run_grid(expand(grid)[0], grid, out, grid_path, execute=third, log=lambda *a: None)
    assert third.calls == names

    saved = json.loads((out / "results.json").read_text())["results"]
    assert [r["name"] for r in saved] == names
    assert (out / "results.md").read_text().count("\n| ") == 3 * (1 + len(names))  # settings, epochs, runs
    for png in ("ap_by_epoch.png", "loss.png", "lr.png"):
        assert (out / png).stat().st_size > 1000


def test_a_resumed_grid_reports_every_done_run_before_it_reaches_it(tmp_path):
    """Resuming after runs were added to a grid: the reports written while the first new run trains already
    hold the done runs that come after it, so a results.json copied mid-grid loses nothing."""
    grid_path = write_grid(tmp_path, axes={"batch": [2, 4], "norm": ["frozen", "cgbn"]})
    grid = load_grid(grid_path)
    runs, _, _ = expand(grid)
    out = tmp_path / "out"
    ablation.run_grid([runs[0], runs[2]], grid, out, grid_path, execute=FakeTrainer(), log=lambda *a: None)
    seen = {}

    def trainer(cmd, output_path, timeout):
        name = Path(cmd[-1].split("=", 1)[1]).name
        seen[name] = [r["name"] for r in json.loads((out / "results.json").read_text())["results"]]
        return FakeTrainer()(cmd, output_path, timeout)

    ablation.run_grid(runs, grid, out, grid_path, execute=trainer, log=lambda *a: None)
    assert seen[runs[1].name] == [runs[0].name, runs[2].name]
    assert seen[runs[3].name] == [runs[0].name, runs[1].name, runs[2].name]


def test_finished_runs_of_another_copy_of_the_grid_are_imported_not_trained_again(tmp_path):
    """A grid spread over machines: the results.json of one copy (e.g. committed beside a doc) makes another
    skip the runs it finished with the same settings; failed and changed runs are trained."""
    grid_path = write_grid(tmp_path, axes={"batch": [2, 4], "norm": ["frozen", "cgbn"]})
    grid = load_grid(grid_path)
    runs, _, _ = expand(grid)
    first = FakeTrainer(fail={runs[1].name})
    ablation.run_grid(runs[:2], grid, tmp_path / "first", grid_path, execute=first, log=lambda *a: None)
    done = json.loads((tmp_path / "first" / "results.json").read_text())
    done["results"][0]["lr"] += 1  # as if the copy had other settings for run 0: not imported
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(done))
    out = tmp_path / "second"
    assert ablation.import_results(changed, runs, out, log=lambda *a: None) == []
    imported = ablation.import_results(tmp_path / "first" / "results.json", runs, out, log=lambda *a: None)
    assert imported == [runs[0].name]  # run 1 failed there
    second = FakeTrainer()
    results = ablation.run_grid(runs, grid, out, grid_path, execute=second, log=lambda *a: None)
    assert second.calls == [r.name for r in runs[1:]]
    assert results[0] == json.loads((tmp_path / "first" / runs[0].name / "result.json").read_text())
    with pytest.raises(ConfigError, match="not a grid's results.json"):
        ablation.import_results(grid_path, runs, out)


def test_outcomes_of_a_finished_process(tmp_path):
    grid = load_grid(write_grid(tmp_path, axes={"batch": [2], "norm": ["bn"]}))
    (run,), _, _ = expand(grid)

    def collect(returncode, output, losses, skipped=0):
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        (run_dir / "output.txt").write_text(output)
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"iteration": i + 1, "loss": x, "skipped": skipped, "time": 1.0}) + "\n"
            for i, x in enumerate(losses)))
        return runner.collect(run, run_dir, returncode, 1.0, grid)

    falling = [2.0 - i / run.max_iter for i in range(run.max_iter)]
    assert collect(0, "", falling)["status"] == "converged"
    r = collect(0, "", falling[:-1] + [1e3])
    assert (r["status"], r["converged"]) == ("diverged", False) and "exploded" in r["reason"]
    r = collect(1, "[0]<stderr>:FloatingPointError: non-finite loss or gradient at iteration 3\n", falling[:3], 1)
    assert r["status"] == "diverged" and "iteration 3" in r["reason"]
    r = collect(None, "slow\n", falling[:3])
    assert r["status"] == "failed" and "timed out" in r["reason"] and r["converged"] is None
    r = collect(0, "", falling[:3])
    assert r["status"] == "failed" and f"3 of {run.max_iter}" in r["reason"]


TRAINER = """
import sys, time
out = sys.argv[-1].split("=", 1)[1]
for i in range(1, 4):
    with open(out + "/log.txt", "a") as log:  # as logs.log_to_file: appended, line by line
        log.write(f"[stamp] iteration {i}\\n")
    print(f"iteration {i}", flush=True)
    print(f"warning: iteration {i}: slow", file=sys.stderr, flush=True)
    time.sleep(0.05)
sys.exit("error: FloatingPointError: iteration 3: non-finite loss on rank 0; stopping")
"""


def test_a_run_keeps_the_trainers_log_whole_and_what_it_printed(tmp_path):
    """The runner captures the trainer's output beside its log.txt, not into it."""
    grid = load_grid(write_grid(tmp_path, axes={"batch": [2], "norm": ["bn"]}))
    (run,), _, _ = expand(grid)

    def trainer(cmd, output_path, timeout):  # the real execute, with a stand-in for the trainer's command
        return runner.execute([sys.executable, "-c", TRAINER, cmd[-1]], output_path, timeout)

    result = runner.train_run(run, tmp_path / "run", grid, execute=trainer)
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert log == [f"[stamp] iteration {i}" for i in range(1, 4)]
    printed = (tmp_path / "run" / "output.txt").read_text().splitlines()
    assert printed[:2] == ["iteration 1", "warning: iteration 1: slow"] and len(printed) == 7
    assert result["status"] == "diverged" and result["reason"] == printed[-1]


@pytest.mark.multirank
def test_tiny_real_grid_end_to_end(tmp_path):
    """Two real trainings (1 rank with BN, 2 ranks with CGBN), 2 epochs each, then a resume that trains nothing."""
    from hvd_megdet.data.synthetic import make_dataset
    data = tmp_path / "shapes"
    make_dataset(str(data), num_train=8, num_val=4, seed=3)
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump({
        "base": BASE, "epochs": 2, "ims_per_gpu": 2, "warmup_epochs": 0.5, "timeout": 240,
        "divergence": {"max_skipped": 0, "explode_factor": 1000},  # a handful of steps: only a crash counts
        "overrides": {"data.train.images": str(data / "train"),
                      "data.train.annotations": str(data / "annotations" / "instances_train.json"),
                      "data.val.images": str(data / "val"),
                      "data.val.annotations": str(data / "annotations" / "instances_val.json"),
                      "data.num_workers": 0, "input.min_size": [96], "input.max_size": 128,
                      "checkpoint_period": 1000, "log_period": 1},
        "axes": {"batch": [2, 4], "norm": ["cgbn"]}}))
    out = tmp_path / "out"
    assert ablation.main(["--grid", str(grid_path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["name"], r["ranks"]) for r in results] == [("b2_1x2_bn2_warmup_s0", 1), ("b4_2x2_cgbn4_warmup_s0", 2)]
    for r in results:
        assert r["status"] in ("converged", "diverged"), r
        assert r["iterations_done"] == r["max_iter"] == 2 * r["iters_per_epoch"]
        assert [e["epoch"] for e in r["ap_by_epoch"]] == [1.0, 2.0]
        assert r["AP"] == r["ap_by_epoch"][-1]["AP"] and r["train_time_s"] > 0
    stamps = {r["name"]: (out / r["name"] / "result.json").stat().st_mtime_ns for r in results}
    assert ablation.main(["--grid", str(grid_path), "--out", str(out)]) == 0  # resume: all done
    assert stamps == {r["name"]: (out / r["name"] / "result.json").stat().st_mtime_ns for r in results}
