from __future__ import annotations

import pytest
import torch

from pat.engine.schedules import create_schedule, list_schedules, one_cycle_lr, parent_factor
from pat.errors import PatError


def trace(name: str, total: int, lr: float = 0.1, **kw) -> list[float]:
    """The LR each of ``total`` optimizer steps used under policy ``name``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    sched = create_schedule(name, opt, total_steps=total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("total", [10, 100, 1000])
def test_parent_trace_equals_formula(total):
    lrs = trace("parent", total)
    assert lrs == pytest.approx([0.1 * parent_factor(i / total) for i in range(total)])
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[int(0.5 * total) - 1] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.001)


def test_parent_factor_shape():
    assert parent_factor(0.0) == 1.0 and parent_factor(0.49) == 1.0
    assert parent_factor(0.7) == pytest.approx((1 + 0.01) / 2)
    assert parent_factor(0.9) == pytest.approx(0.01) and parent_factor(1.0) == pytest.approx(0.01)


@pytest.mark.parametrize("total", [100, 1000])
def test_one_cycle_trace_equals_formula(total):
    lrs = trace("one-cycle", total, max_lr=0.1)
    expected = [one_cycle_lr(i, total, 0.1) for i in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert lrs[0] == pytest.approx(0.1 / 100)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == int(0.1 * total) - 1
    assert lrs[-1] == pytest.approx(1e-7, rel=1e-3)


def test_one_cycle_leaves_momentum_alone_by_default():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched = create_schedule("one-cycle", opt, total_steps=50)
    for _ in range(20):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["momentum"] == 0.9


def test_constant_is_constant():
    assert set(trace("constant", 30, lr=0.01)) == {0.01}


def test_unknown_schedule_names_the_choices():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(PatError, match="unknown schedule 'nope'; choose one of: .*one-cycle"):
        create_schedule("nope", opt, total_steps=10)
    assert {"constant", "cosine", "one-cycle", "parent"} <= set(list_schedules())


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5])
def test_one_cycle_survives_tiny_runs(total):
    lrs = trace("one-cycle", total, max_lr=0.1)
    assert len(lrs) == total and max(lrs) <= 0.1 + 1e-12 and all(lr > 0 for lr in lrs)
