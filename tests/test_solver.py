"""The lr schedule against numbers computed by hand."""
import math

import pytest
import torch

from hvd_megdet.config import SolverConfig
from hvd_megdet.solver import (build_optimizer, describe_scaling, global_batch, lr_at, param_groups, scaled_lr,
                               warmup_multiplier)


def solver(**kw):
    base = dict(ims_per_gpu=2, base_lr=0.02, base_batch=16, max_iter=1000, steps=[600, 800], gamma=0.1,
                warmup_iters=100, warmup_factor=0.001)
    base.update(kw)
    return SolverConfig(**base)


def test_linear_scaling_rule():
    assert scaled_lr(0.02, 16, 16) == pytest.approx(0.02)
    assert scaled_lr(0.02, 16, 256) == pytest.approx(0.32)
    assert scaled_lr(0.02, 16, 4) == pytest.approx(0.005)


def test_lr_at_iteration_zero_is_warmup_factor_times_scaled_lr():
    # 8 ranks x 2 images = 16 = base batch: scaled lr 0.02
    assert lr_at(0, solver(), 8) == pytest.approx(0.02 * 0.001)


def test_lr_during_warmup_is_linear():
    # halfway: 0.001 * 0.5 + 0.5 = 0.5005
    assert lr_at(50, solver(), 8) == pytest.approx(0.02 * 0.5005)
    assert lr_at(99, solver(), 8) == pytest.approx(0.02 * (0.001 * 0.01 + 0.99))
    assert lr_at(100, solver(), 8) == pytest.approx(0.02)


def test_lr_steps_divide_by_ten_at_each_step():
    s = solver()
    assert lr_at(599, s, 8) == pytest.approx(0.02)
    assert lr_at(600, s, 8) == pytest.approx(0.002)
    assert lr_at(799, s, 8) == pytest.approx(0.002)
    assert lr_at(800, s, 8) == pytest.approx(0.0002)
    assert lr_at(999, s, 8) == pytest.approx(0.0002)


def test_lr_follows_the_world_size():
    s = solver()
    assert lr_at(300, s, 128) == pytest.approx(0.32)  # 256 images
    assert lr_at(300, s, 1) == pytest.approx(0.0025)  # 2 images
    assert lr_at(0, s, 128) == pytest.approx(0.32 * 0.001)


def test_cosine_schedule():
    s = solver(schedule="cosine", warmup_iters=0)
    assert lr_at(0, s, 8) == pytest.approx(0.02)
    assert lr_at(500, s, 8) == pytest.approx(0.01)
    assert lr_at(250, s, 8) == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(1000, s, 8) == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_when_warmup_iters_is_zero():
    assert warmup_multiplier(0, 0, 0.001) == 1.0


def test_weight_decay_norm_applies_to_norm_layers_only_and_biases_decay_like_weights():
    """detectron2's groups: SOLVER.WEIGHT_DECAY_NORM on norm weights and biases, WEIGHT_DECAY on the rest."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, norm = param_groups(model, solver(weight_decay=1e-4, weight_decay_norm=0.0))
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[0].bias), id(model[2].weight),
                                                 id(model[2].bias)}
    assert {id(p) for p in norm["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert (decay["weight_decay"], norm["weight_decay"]) == (1e-4, 0.0)
    opt = build_optimizer(model, solver(momentum=0.9), lr=0.1)
    assert all(g["lr"] == 0.1 and g["momentum"] == 0.9 for g in opt.param_groups)


def test_gradient_accumulation_scales_the_lr_by_the_images_of_all_passes():
    # 8 ranks x 2 images x 4 passes = 64 images: 4 x 0.02
    s = solver(backward_passes_per_step=4)
    assert global_batch(s, 8) == 64
    assert lr_at(300, s, 8) == pytest.approx(0.08)
    assert describe_scaling(s, 8, 10).startswith(
        "world size 8 x 2 images x 4 backward passes = global batch 64; lr 0.02 x 64/16 = 0.08")


def test_frozen_parameters_are_not_optimized():
    model = torch.nn.Linear(2, 2)
    model.weight.requires_grad_(False)
    groups = param_groups(model, solver())
    assert sum(len(g["params"]) for g in groups) == 1
