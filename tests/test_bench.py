"""The benchmarks' pure parts: summaries, tables, the scaling model on hand-computed numbers, and the data
benchmark's two pipelines producing the same thing (no timing is asserted)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvd_megdet.bench import data as bench_data
from hvd_megdet.bench import knobs, scaling, train_iter
from hvd_megdet.engine import to_device
from tests.harness import horovodrun


def _phases(step, forward):
    return {"step": step, "forward": forward, "backward": 0.0, "allreduce": 0.0, "checks": 0.0, "optimizer": 0.0}


def test_summarize_medians():
    # rank 0 / rank 1 per iteration; slowest per iteration, then median over 3 iterations.
    rank0 = {"data": [0.1, 0.3, 0.2], "cgbn": [_phases(2.0, 1.0), _phases(2.2, 1.0), _phases(9.0, 1.0)],
             "cgbn_1phase": [_phases(1.5, 1.0)] * 3, "bn": [_phases(1.0, 0.5)] * 3, "frozen": [_phases(0.5, 0.1)] * 3}
    rank1 = {"data": [0.2, 0.1, 0.1], "cgbn": [_phases(2.4, 1.5), _phases(1.0, 1.0), _phases(1.0, 1.0)],
             "cgbn_1phase": [_phases(1.5, 1.0)] * 3, "bn": [_phases(1.2, 0.5)] * 3, "frozen": [_phases(0.4, 0.1)] * 3}
    result = train_iter.summarize([rank0, rank1])
    # data: max per iteration 0.2, 0.3, 0.2 -> 0.2; cgbn step: 2.4, 2.2, 9.0 -> 2.4;
    # forward, mean over ranks: 1.25, 1.0, 1.0 -> 1.0
    assert result["cgbn"]["data"] == pytest.approx(0.2)
    assert result["cgbn"]["step"] == pytest.approx(2.4)
    assert result["cgbn"]["forward"] == pytest.approx(1.0)
    assert result["bn"]["total"] == pytest.approx(1.4)
    assert result["cgbn"]["ratio_vs_bn"] == pytest.approx(2.6 / 1.4)
    assert result["frozen"]["ratio_vs_bn"] == pytest.approx(0.7 / 1.4)
    table = train_iter.format_table(result, {"np": 2})
    assert table.splitlines()[0] == "np=2"
    assert "| cgbn | 2600.0 | 1.86 | 200.0 | 2400.0 | 1000.0 |" in table


def test_ring_and_small_allreduce():
    # ring over 4 ranks, 1 GB at 1 GB/s, 1 ms per hop: 6 hops + 2 * 3/4 s
    assert scaling.ring_allreduce_s(4, 1e9, 1e9, 1e-3) == pytest.approx(0.006 + 1.5)
    assert scaling.ring_allreduce_s(1, 1e9, 1e9, 1e-3) == 0.0
    # 8 ranks: overhead + 2 * 3 hops
    assert scaling.small_allreduce_s(8, 1e-3, 1e-5) == pytest.approx(1e-3 + 6e-5)
    assert scaling.small_allreduce_s(1, 1e-3, 1e-5) == 0.0


def test_iteration_time_hand_computed():
    # 16 GPUs on 2 nodes: inter-node ring at 1e9 B/s, 1e-5 s per hop; 3e8 bytes in fused buffers of 2e8 + 1e8.
    t = scaling.iteration_time(16, compute_s=0.3, grad_bytes=3e8, cgbn_syncs=10, allreduces_per_layer=3,
                               bw_intra=1e10, bw_inter=1e9, hop_intra=1e-6, hop_inter=1e-5, overhead_s=1e-3,
                               fusion_bytes=2e8, backward_fraction=0.5)
    grad = (30 * 1e-5 + 30 / 16 * 2e8 / 1e9) + (30 * 1e-5 + 30 / 16 * 1e8 / 1e9)
    assert t["grad_allreduce"] == pytest.approx(grad)  # 0.563
    assert t["grad_exposed"] == pytest.approx(grad - 0.15)
    cgbn = 10 * 3 * (1e-3 + 2 * 4 * 1e-5)
    assert t["cgbn"] == pytest.approx(cgbn)
    assert t["total"] == pytest.approx(0.3 + grad - 0.15 + cgbn)
    # BN groups of 8 inside a node: the intra-node hop and log2(8) = 3 levels
    grouped = scaling.iteration_time(16, compute_s=0.3, grad_bytes=3e8, cgbn_syncs=10, allreduces_per_layer=3,
                                     bw_intra=1e10, bw_inter=1e9, hop_intra=1e-6, hop_inter=1e-5,
                                     overhead_s=1e-3, bn_group=8, fusion_bytes=2e8, backward_fraction=0.5)
    assert grouped["cgbn"] == pytest.approx(10 * 3 * (1e-3 + 6e-6))


def test_scaling_table_and_paper():
    rows = scaling.scaling_table(scaling.SCENARIOS["V100 + IB EDR x1"], gpus=(8, 128))
    assert rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[0]["total"] / rows[1]["total"])
    assert rows[1]["images_per_s"] == pytest.approx(256 / rows[1]["total"])
    assert scaling.paper_efficiency(33.0, 8, 4.0, 128) == pytest.approx(33 / 4 / 16)


def test_r50_fpn_figures_match_the_model():
    counted = scaling.count_model()
    assert counted["cgbn_syncs"] == scaling.R50_FPN["cgbn_syncs"]
    assert counted["params"] == pytest.approx(scaling.R50_FPN["params"], rel=1e-3)


def test_workers_needed():
    assert bench_data.workers_needed(10.0, 4.0) == math.ceil(12.5 / 4)
    assert bench_data.workers_needed(10.0, 100.0) == 1


def test_data_pipelines_produce_the_same_sizes(tmp_path):
    datasets = bench_data.pipelines(*bench_data.make_jpegs(str(tmp_path), 2))
    flips = datasets["hvd_megdet"].transforms  # shared with hvd_megdet_float32: reseed for the same flip
    for i in range(2):
        flips.reseed(i)
        (ours, t_ours), (ref, t_ref) = datasets["hvd_megdet"][i], datasets["torchvision"][i]
        # torchvision floors the resized width (1066), we round (1067): the same work to within a column
        assert ours.shape == (3, 800, 1067) and ref.shape[:2] == (3, 800) and abs(ref.shape[2] - 1067) <= 1
        # uint8 from the loader, float in [0, 1] after to_device; the float32 variant converts in the loader
        (as_float,), _ = to_device([ours], [], torch.device("cpu"))
        assert ours.dtype == torch.uint8 and as_float.dtype == ref.dtype == torch.float32
        flips.reseed(i)
        assert torch.equal(datasets["hvd_megdet_float32"][i][0], as_float)
        assert len(t_ours["boxes"]) == len(t_ref["boxes"]) > 0
        # both in pixels of the resized image
        assert float(t_ours["boxes"].max()) <= 1067 and float(t_ref["boxes"].max()) <= 1067


def test_knobs_summary_is_relative_to_horovods_defaults():
    runs = {(0.1, 1024): [{"allreduce_us": 300.0, "cgbn_ms": 3.0, "compute_ms": 2.0},
                          {"allreduce_us": 500.0, "cgbn_ms": 5.0, "compute_ms": 4.0}],
            knobs.DEFAULT: [{"allreduce_us": 1000.0, "cgbn_ms": 8.0, "compute_ms": 2.0}]}
    summary = knobs.summarize(runs)
    assert summary[(0.1, 1024)]["allreduce_us"] == 400.0 and summary[(0.1, 1024)]["compute_ms"] == 3.0
    assert summary[(0.1, 1024)]["allreduce_us_vs_default"] == pytest.approx(0.4)
    assert summary[(0.1, 1024)]["compute_ms_vs_default"] == pytest.approx(1.5)
    assert summary[knobs.DEFAULT]["cgbn_ms_vs_default"] == 1.0
    assert "| 0.1 | 1024 | 400 | 0.40 | 4.00 | 0.50 | 3.00 | 1.50 |" in knobs.format_table(summary, {"np": 2})


@pytest.mark.multirank
def test_knobs_probe_runs_under_horovodrun(tmp_path, capsys):
    knobs.main(["--cycle-ms", "2", "--cache", "16", "--rounds", "1", "--iters", "10", "--timeout", "120",
                "--json", str(tmp_path / "knobs.json")])
    assert "| 2 | 16 |" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "knobs.json").read_text())["runs"]["2.0ms/16"]
    assert set(row) == set(knobs.COLUMNS) and all(v > 0 for v in row.values())


def test_collectives_split_into_skew_and_latency_after_all_arrived():
    # two ranks, two iterations of one layer: [name, start, end]
    rank0 = [["sync_bn.0.sum", 1.0, 1.5], ["sync_bn.0.grad", 2.0, 2.2], ["sync_bn.0.sum", 3.0, 3.4],
             ["sync_bn.0.grad", 4.0, 4.3]]
    rank1 = [["sync_bn.0.sum", 1.2, 1.5], ["sync_bn.0.grad", 2.1, 2.2], ["sync_bn.0.sum", 3.0, 3.5],
             ["sync_bn.0.grad", 4.3, 4.3]]
    result = train_iter.summarize_collectives([rank0, rank1], iters=2)
    assert result["sum"]["per_iteration"] == 1
    assert result["sum"]["skew"] == pytest.approx(0.1)  # median of 0.2 and 0.0
    assert result["sum"]["after_all"] == pytest.approx(0.4)  # median of 0.3 and 0.5
    assert result["grad"]["skew"] == pytest.approx(0.2) and result["grad"]["after_all"] == pytest.approx(0.05)
    assert "| sum | 1 | 100.00 | 400.00 |" in train_iter.format_collectives(result)


def test_bench_ab_runs_the_command_on_each_tree_in_turn():
    repo = Path(__file__).resolve().parents[1]
    script = "import hvd_megdet, pathlib; print('tree', pathlib.Path(hvd_megdet.__file__).parents[1])"
    proc = subprocess.run([str(repo / "scripts" / "bench_ab.sh"), "HEAD", "2", "python", "-c", script],
                          capture_output=True, text=True, timeout=120, check=True)
    trees = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("tree ")]
    assert len(trees) == 4 and trees[1] == trees[3] == str(repo)
    assert trees[0] != str(repo) and trees[2] != str(repo)  # a worktree of HEAD, removed at the end
    assert not Path(trees[0]).exists()
    assert [line.split(",")[0] for line in proc.stdout.splitlines() if line.startswith("==")] == \
        ["== before (HEAD)", "== after (working tree)"] * 2


def _bench_on_two_ranks(name, args, tmp_path, timeout):
    """The JSON written by `python -m hvd_megdet.bench.<name> ARGS --json FILE` under horovodrun -np 2."""
    out = tmp_path / f"{name}.json"
    proc = horovodrun(2, [sys.executable, "-m", f"hvd_megdet.bench.{name}", *args, "--json", out], timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return json.loads(out.read_text())


@pytest.mark.multirank
def test_sync_bn_benchmark_runs_on_two_ranks_and_counts_collectives(tmp_path):
    result = _bench_on_two_ranks("sync_bn", ["--shapes", "2x8x4x6", "--iters", "2", "--warmup", "0"], tmp_path, 180)
    rows = {row["layer"]: row for row in result["rows"]}
    collectives = {name: row.get("collectives") for name, row in rows.items()}
    assert collectives == {"CGBN two_phase=True": 3, "CGBN two_phase=False": 2, "CGBN two_phase=True, spin wait": 3,
                           "CGBN two_phase=True, arithmetic only": 0, "local nn.BatchNorm2d": 0,
                           "naive sync BN (torch.distributed)": 2, "torch.nn.SyncBatchNorm": None,
                           "hvd.SyncBatchNorm": None}
    assert all(row["ms"] > 0 for row in rows.values() if "ms" in row)


@pytest.mark.multirank
def test_train_iter_benchmark_runs_on_two_ranks(tmp_path):
    result = _bench_on_two_ranks("train_iter", ["--iters", "1", "--warmup", "0", "--images", "8"], tmp_path, 300)
    assert set(result["result"]) == set(train_iter.NORMS) and result["result"]["bn"]["ratio_vs_bn"] == 1.0
    # demo model (two-fc box head): 20 CGBN layers in 11 synchronizations; two_phase=True 2 forward + 1
    # backward, False 1 + 1
    assert {k: v["per_iteration"] for k, v in result["collectives"].items()} == \
        {"sum": 11, "sqdev": 11, "moments": 11, "grad": 22}


def test_timeline_splits_a_cgbn_wait_into_gradients_and_the_rest():
    from hvd_megdet.bench import timeline

    def allreduce(pid, name, asked, begin, end):
        return [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}},
                {"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": asked[0], "pid": pid},
                *({"ph": "X", "name": str(r), "ts": t, "pid": pid, "dur": 0} for r, t in enumerate(asked)),
                {"ph": "E", "ts": asked[-1] + 1, "pid": pid},
                {"ph": "B", "name": "ALLREDUCE", "ts": begin - 1, "pid": pid},
                {"ph": "B", "name": "GLOO_ALLREDUCE", "ts": begin, "pid": pid}, {"ph": "E", "ts": end, "pid": pid},
                {"ph": "E", "ts": end + 1, "pid": pid}]

    # The CGBN backward sums: both ranks asked by t=1000 us, executed at 4000-4500; a gradient allreduce ran
    # 500-3000 (2000 us of it after t=1000), another CGBN one 3200-3400.
    events = (allreduce(1, "allreduce.grad.conv.weight", [400, 500], 500, 3000)
              + allreduce(2, "sync_bn.0.grad", [200, 1000], 4000, 4500)
              + allreduce(3, "sync_bn.1.sum", [3100, 3150], 3200, 3400))
    summary = timeline.summarize(timeline.parse(events))
    assert summary["grad"] == {"count": 1, "ready_to_execute_ms": 3.0, "behind_gradients_ms": 2.0,
                               "behind_cgbn_ms": 0.2, "execute_ms": 0.5}
    assert summary["sum"]["behind_gradients_ms"] == 0.0 and "weight" not in summary
