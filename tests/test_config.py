"""Config: defaults, YAML, overrides, strict keys and types, range checks."""
import warnings

import pytest
import yaml

from hvd_megdet.config import ConfigError, ConfigWarning, load_config, save_config, to_dict


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert (cfg.solver.base_lr, cfg.solver.base_batch, cfg.solver.ims_per_gpu) == (0.02, 16, 2)
    assert (cfg.input.min_size, cfg.input.max_size) == ([800], 1333)
    assert cfg.model.norm == "cgbn"


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "solver:\n  base_lr: 0.01\n  max_iter: 50\n  warmup_iters: 5\n  steps: [30, 40]\n"
                        "model:\n  norm: bn\n")
    cfg = load_config(p, ["solver.max_iter=60", "input.min_size=[400, 500]", "model.weights=/w.pth", "seed=3"])
    assert cfg.solver.base_lr == 0.01 and cfg.solver.max_iter == 60
    assert cfg.input.min_size == [400, 500] and cfg.model.weights == "/w.pth" and cfg.seed == 3
    assert cfg.model.norm == "bn"


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["solver.base_lr=1"])
    assert cfg.solver.base_lr == 1.0 and isinstance(cfg.solver.base_lr, float)


@pytest.mark.parametrize("text, match", [
    ("solver:\n  base_lrr: 0.1\n", "unknown key solver.base_lrr"),
    ("bogus: 1\n", "unknown key bogus"),
    ("solver:\n  max_iter: ten\n", "solver.max_iter must be int"),
    ("input:\n  min_size: big\n", "input.min_size must be int"),
    ("input:\n  min_size: [800, big]\n", r"input.min_size\[1\] must be int"),
    ("solver:\n  max_iter: true\n", "solver.max_iter must be int"),
    ("solver: 3\n", "solver must be a mapping"),
    ("solver:\n  base_lr: -0.1\n", "solver.base_lr must be positive"),
    ("solver:\n  ims_per_gpu: 0\n", "solver.ims_per_gpu must be positive"),
    ("solver:\n  max_iter: 0\n", "solver.max_iter must be positive"),
    ("solver:\n  max_iter: 100\n  warmup_iters: 10\n  steps: [60, 50]\n", "solver.steps must be positive and strictly increasing"),
    ("model:\n  norm: groupnorm\n", "model.norm must be one of frozen, bn, cgbn, got 'groupnorm'"),
    ("model:\n  backbone: vgg\n", "model.backbone must be one of"),
    ("model:\n  bn_group_size: -2\n", "model.bn_group_size must be >= 0"),
])
def test_bad_values_name_the_file_and_key(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(p)
    assert str(p) in str(info.value)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML at line \d+"):
        load_config(write(tmp_path, "solver:\n  base_lr: [0.1\n"))


def test_bad_overrides():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["solver.max_iter"])
    with pytest.raises(ConfigError, match="unknown key solver.maxiter"):
        load_config(None, ["solver.maxiter=3"])
    with pytest.raises(ConfigError, match="override: solver.base_lr must be float"):
        load_config(None, ["solver.base_lr=abc"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["solver.max_iter=77", "solver.warmup_iters=7", "model.norm=frozen"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["solver"]["max_iter"] == 77


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)


def test_one_value_where_a_list_is_expected_is_a_list_of_one(tmp_path):
    """detectron2 accepts INPUT.MIN_SIZE_TRAIN=800 as well as (800,): so do we, from YAML and overrides."""
    assert load_config(write(tmp_path, "input:\n  min_size: 800\n")).input.min_size == [800]
    cfg = load_config(None, ["input.min_size=400", "solver.steps=70000"])
    assert cfg.input.min_size == [400] and cfg.solver.steps == [70000]
    save_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["input"]["min_size"] == [400]


def test_warmup_longer_than_the_run_warns_and_loads(tmp_path):
    p = write(tmp_path, "solver:\n  max_iter: 2\n  warmup_iters: 50\n  steps: [1]\n")
    with pytest.warns(ConfigWarning, match=r"c.yaml: solver.warmup_iters \(50\) is not smaller than solver.max_iter "
                                           r"\(2\): the run ends before the lr reaches its full value"):
        cfg = load_config(p)
    assert (cfg.solver.max_iter, cfg.solver.warmup_iters) == (2, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warmup shorter than the run says nothing
        load_config(p, ["solver.warmup_iters=1"])
