"""GroupedAdam against torch.optim.Adam (an independent implementation of the same update)."""
import copy
import math

import pytest
import torch

from lowbit.optim import GroupedAdam

SHAPES = [(5, 7), (3,), (4, 4), (2, 3, 2), ()]
RATES = [1e-2, 3e-3, 5e-2, 1e-3, 2e-2]


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=g).requires_grad_(True) for s in SHAPES]


def _grads(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    # gradient scales far apart: Adam's update does not depend on them, but eps and rounding do
    return [torch.randn(s, dtype=dtype, generator=g) * 10.0 ** (i - 2) for i, s in enumerate(SHAPES)]


def _factor(step, total):
    return 0.5 * (1 + math.cos(math.pi * step / total)) * min(1.0, (step + 1) / 4)


def _run(ref_opt, ref_params, opt, params, steps, start=0, total=30):
    for step in range(start, start + steps):
        f = _factor(step, total)
        for g, rate in zip(ref_opt.param_groups, RATES):
            g["lr"] = rate * f
        opt.set_lr_factor(f)
        for p, q, grad in zip(ref_params, params, _grads(step)):
            p.grad, q.grad = grad.clone(), grad.clone()
        ref_opt.step()
        opt.step()


def _detached(ts):
    return [t.detach() for t in ts]


def _rel(a, b):
    return max(float((p - q).abs().max() / p.abs().max().clamp_min(1e-300)) for p, q in zip(_detached(a), _detached(b)))


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.8, 0.999)])
def test_matches_torch_adam_with_a_group_per_parameter(betas):
    ref = _params()
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    ref_opt = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(ref, RATES)], betas=betas, foreach=False)
    opt = GroupedAdam([{"params": [p], "lr": r} for p, r in zip(mine, RATES)], betas=betas)
    _run(ref_opt, ref, opt, mine, 25)
    moved = _rel([p.detach() for p in _params()], [p.detach() for p in ref])
    assert moved > 1e-3  # the parameters did move
    assert _rel(ref, mine) < 1e-12
    for p, q in zip(ref, mine):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][k], ref_opt.state[p][k], rtol=1e-13, atol=0)
        assert float(opt.state[q]["step"]) == 25


def test_groups_of_several_parameters_and_the_rate_accessor():
    ref = _params()
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    ref_opt = torch.optim.Adam([{"params": ref[:2], "lr": 1e-2}, {"params": ref[2:], "lr": 4e-3}],
                               betas=(0.9, 0.95), foreach=False)
    opt = GroupedAdam([{"params": mine[:2], "lr": 1e-2}, {"params": mine[2:], "lr": 4e-3}], betas=(0.9, 0.95))
    for step in range(10):
        f = _factor(step, 10)
        ref_opt.param_groups[0]["lr"], ref_opt.param_groups[1]["lr"] = 1e-2 * f, 4e-3 * f
        opt.set_lr_factor(f)
        assert opt.lr_of(opt.param_groups[1]) == pytest.approx(4e-3 * f, rel=1e-15)
        for p, q, grad in zip(ref, mine, _grads(step)):
            p.grad, q.grad = grad.clone(), grad.clone()
        ref_opt.step()
        opt.step()
    assert _rel(ref, mine) < 1e-12


def test_continues_a_torch_adam_state():
    """A checkpoint of torch.optim.Adam (same state keys) loads and the run continues as Adam's."""
    ref = _params()
    ref_opt = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(ref, RATES)], betas=(0.9, 0.95),
                               foreach=False)
    other = [p.detach().clone().requires_grad_(True) for p in ref]
    other_opt = GroupedAdam([{"params": [p], "lr": r} for p, r in zip(other, RATES)], betas=(0.9, 0.95))
    _run(ref_opt, ref, other_opt, other, 8)
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    opt = GroupedAdam([{"params": [p], "lr": r} for p, r in zip(mine, RATES)], betas=(0.9, 0.95))
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (loading shares the tensors)
    for g, r in zip(opt.param_groups, RATES):
        g["lr"] = r  # Adam's groups hold the scheduled rate; GroupedAdam's the base one
    _run(ref_opt, ref, opt, mine, 8, start=8)
    assert _rel(ref, mine) < 1e-12
    assert float(opt.state[mine[0]]["step"]) == 16


def test_capturable_keeps_its_state_on_the_device_and_agrees():
    ref = _params(torch.float32)
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    ref_opt = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(ref, RATES)], betas=(0.9, 0.95),
                               foreach=False)
    opt = GroupedAdam([{"params": [p], "lr": r} for p, r in zip(mine, RATES)], betas=(0.9, 0.95), capturable=True)
    assert torch.is_tensor(opt._lr_factor)
    for step in range(12):
        f = _factor(step, 12)
        for g, rate in zip(ref_opt.param_groups, RATES):
            g["lr"] = rate * f
        opt.set_lr_factor(f)
        for p, q, grad in zip(ref, mine, _grads(step, torch.float32)):
            p.grad, q.grad = grad.clone(), grad.clone()
        ref_opt.step()
        opt.step()
    assert _rel(ref, mine) < 1e-5
    assert opt.state[mine[0]]["step"].device == mine[0].device


def test_refuses_what_it_cannot_step():
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = GroupedAdam([{"params": [p], "lr": 1e-2}, {"params": [q], "lr": 1e-3}])
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="no gradient"):
        opt.step()
    assert float(p.detach().abs().sum()) == 0.0  # nothing was updated
    with pytest.raises(TypeError, match="set_lr_factor"):
        GroupedAdam([{"params": [p], "lr": torch.tensor(1e-2)}])
    with pytest.raises(ValueError, match="betas"):
        GroupedAdam([p], betas=(1.0, 0.9))
