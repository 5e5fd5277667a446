"""The lr schedule and the optimizers against numbers computed by hand."""
import math

import pytest
import torch

from hvd_megdet.config import SolverConfig
from hvd_megdet.solver import (LARS, build_optimizer, describe_scaling, global_batch, init_optimizer_state, lr_at,
                               param_groups, scaled_lr, trust_ratio, warmup_multiplier)


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


def _conv_bn_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    return model


def test_lars_trust_ratio_is_eta_times_the_weight_norm_over_the_update_norm():
    w, d = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5])  # norms 5 and 0.5
    assert float(trust_ratio(w, d, 0.001)) == pytest.approx(0.001 * 5 / 0.5)
    assert float(trust_ratio(torch.zeros(2), d, 0.001)) == 1.0  # a zero-initialised layer takes plain steps
    assert float(trust_ratio(w, torch.zeros(2), 0.001)) == 1.0


def test_lars_steps_a_weight_by_lr_eta_and_its_norm_whatever_its_gradient():
    """You et al.'s update, by hand: d = g + wd w; the step is lr x eta x ||w|| / ||d|| x d, with momentum
    as SGD's (buf = m buf + d; w -= lr buf)."""
    w0, g = torch.tensor([3.0, 4.0]), torch.tensor([10.0, -2.0])
    lr, eta, wd, m = 0.5, 0.01, 0.1, 0.9
    p = torch.nn.Parameter(w0.clone())
    opt = LARS([p], lr=lr, momentum=m, weight_decay=wd, eta=eta)
    steps = []
    for scale in (1.0, 1000.0):  # the gradient's size does not change the step's size
        p.grad = g * scale
        before = p.detach().clone()
        opt.step()
        steps.append(p.detach() - before)
    d = g + wd * w0
    first = -lr * eta * w0.norm() / d.norm() * d
    torch.testing.assert_close(steps[0], first, rtol=1e-4, atol=1e-7)
    w1 = w0 + first
    d1 = g * 1000 + wd * w1
    buf = m * (eta * w0.norm() / d.norm() * d) + eta * w1.norm() / d1.norm() * d1
    torch.testing.assert_close(steps[1], -lr * buf, rtol=1e-4, atol=1e-7)
    assert float(steps[0].norm()) == pytest.approx(lr * eta * 5.0, rel=1e-5)


def test_lars_leaves_biases_and_norm_layers_to_plain_sgd():
    """Norm parameters and biases are excluded from the trust ratio: they step exactly as SGD's, and the
    conv and linear weights do not."""
    s = solver(optimizer="lars", lars_eta=0.001, weight_decay=1e-4, weight_decay_norm=0.0, momentum=0.9)
    lars_model, sgd_model = _conv_bn_linear(), _conv_bn_linear()
    lars = build_optimizer(lars_model, s, lr=0.1)
    sgd = build_optimizer(sgd_model, solver(weight_decay=1e-4, weight_decay_norm=0.0, momentum=0.9), lr=0.1)
    assert [g["trust"] for g in lars.param_groups] == [True, False, False]
    assert {id(p) for p in lars.param_groups[0]["params"]} == {id(lars_model[0].weight), id(lars_model[3].weight)}
    for _ in range(2):
        lars.step()
        sgd.step()
    named_sgd = dict(sgd_model.named_parameters())
    for name, p in lars_model.named_parameters():
        same = torch.allclose(p, named_sgd[name])
        assert same == (p.ndim <= 1), name


def test_lars_keeps_sgds_momentum_state_so_checkpoints_and_init_work_alike():
    model = _conv_bn_linear()
    opt = build_optimizer(model, solver(optimizer="lars"), lr=0.1)
    init_optimizer_state(opt)
    before = model[0].weight.detach().clone()
    opt.step()  # zero buffers from init_optimizer_state: the same step as a lazily created buffer
    fresh_model = _conv_bn_linear()
    fresh = build_optimizer(fresh_model, solver(optimizer="lars"), lr=0.1)
    fresh.step()
    assert torch.equal(model[0].weight, fresh_model[0].weight) and not torch.equal(model[0].weight, before)
    restored = build_optimizer(_conv_bn_linear(), solver(optimizer="lars"), lr=0.1)
    restored.load_state_dict(opt.state_dict())
    assert all(torch.equal(restored.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
               for p, q in zip(restored.param_groups[0]["params"], opt.param_groups[0]["params"]))


def test_lars_refuses_a_non_positive_eta():
    with pytest.raises(ValueError, match="eta"):
        LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, eta=0.0)


def _lars_step_on_two_ranks(inputs, eta):
    """On each rank: one LARS step of a linear layer under hvd.DistributedOptimizer, on this rank's input."""
    import horovod.torch as hvd

    hvd.init()
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2, bias=False)
    opt = hvd.DistributedOptimizer(LARS(layer.parameters(), lr=1.0, momentum=0.0, eta=eta),
                                   named_parameters=layer.named_parameters())
    layer(inputs[hvd.rank()]).pow(2).sum().backward()
    opt.step()
    return layer.weight.detach()


@pytest.mark.multirank
def test_lars_takes_its_trust_ratio_on_the_gradient_averaged_over_the_ranks():
    from tests.harness import run_ranks

    inputs = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[-30.0, 5.0, 0.5]])]
    rank0, rank1 = run_ranks(_lars_step_on_two_ranks, np=2, args=(inputs, 0.01), timeout=120)
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2, bias=False)
    grads = []
    for x in inputs:
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        grads.append(layer.weight.grad.clone())
    w, mean = layer.weight.detach(), (grads[0] + grads[1]) / 2
    expected = w - 0.01 * w.norm() / mean.norm() * mean
    assert torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0, expected)
    local = w - 0.01 * w.norm() / grads[0].norm() * mean  # the ratio of rank 0's own gradient: not it
    assert not torch.allclose(rank0, local)
