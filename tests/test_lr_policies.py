from __future__ import annotations

import math

import pytest
import torch

from pat.engine.schedules import (
    composite_factor,
    create_schedule,
    list_schedules,
    multistep_milestones,
    warmup_steps,
)
from pat.errors import PatError
from tests.test_schedules import trace


def test_new_policies_are_registered():
    assert {"multistep", "warmup-cosine", "composite", "one-cycle"} <= set(list_schedules())


@pytest.mark.parametrize("total", [7, 50, 333])
def test_multistep_trace_equals_formula(total):
    lr = 0.2
    marks = [round(f * total) for f in (0.3, 0.6, 0.8)]
    expected = [lr * 0.2 ** sum(step >= m for m in marks) for step in range(total)]
    assert trace("multistep", total, lr=lr) == pytest.approx(expected, rel=1e-9)
    assert multistep_milestones(total) == [max(1, m) for m in marks]


def test_multistep_drops_by_five_three_times():
    lrs = trace("multistep", 100, lr=0.1)
    assert sorted(set(lrs), reverse=True) == pytest.approx([0.1, 0.02, 0.004, 0.0008])
    assert lrs[29] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.02)
    assert lrs[80] == pytest.approx(0.0008)


@pytest.mark.parametrize("total", [3, 20, 100, 999])
def test_warmup_cosine_trace_equals_formula(total):
    lr, start = 0.1, 1e-3
    w = max(1, round(0.05 * total))
    span = max(1, total - w)

    def formula(step: int) -> float:
        if step < w:
            return lr * (start + (1 - start) * step / w)
        return lr * (1 + math.cos(math.pi * (step - w) / span)) / 2

    assert warmup_steps(total) == w
    got = trace("warmup-cosine", total, lr=lr)
    assert got == pytest.approx([formula(s) for s in range(total)], rel=1e-6, abs=1e-12)
    assert got[0] == pytest.approx(lr * start)
    assert max(got) == pytest.approx(lr)


@pytest.mark.parametrize("total", [40, 200, 1001])
def test_composite_trace_equals_formula(total):
    lr = 1.0

    def formula(step: int) -> float:
        t = step / total
        k, lo, hi, n = (0, 0.0, 0.45, 3) if t < 0.45 else (1, 0.45, 0.9, 2) if t < 0.9 else (2, 0.9, 1.0, 1)
        c = ((t - lo) / (hi - lo) * n) % 1.0
        peak = 0.1**k
        return lr * (peak / 5 + (peak - peak / 5) * (1 + math.cos(math.pi * c)) / 2)

    got = trace("composite", total, lr=lr)
    assert got == pytest.approx([formula(s) for s in range(total)], rel=1e-9)
    assert got == pytest.approx([lr * composite_factor(s / total) for s in range(total)])


def test_composite_shape_peaks_floors_and_cycles():
    grid = [i / 10000 for i in range(10000)]
    f = [composite_factor(t) for t in grid]
    stage = [[v for t, v in zip(grid, f, strict=True) if lo <= t < hi] for lo, hi in ((0, 0.45), (0.45, 0.9), (0.9, 1))]
    for k, values in enumerate(stage):
        assert max(values) == pytest.approx(0.1**k)
        assert min(values) == pytest.approx(0.2 * 0.1**k, rel=1e-2)
        # restarts: number of upward jumps inside the stage = cycles - 1
        jumps = sum(b > a * 1.5 for a, b in zip(values, values[1:], strict=False))
        assert jumps == (3, 2, 1)[k] - 1


def test_bad_policy_options_raise():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(PatError, match="gamma"):
        create_schedule("multistep", opt, 10, gamma=0)
    with pytest.raises(PatError, match="warmup"):
        create_schedule("warmup-cosine", opt, 10, warmup=1.5)
    with pytest.raises(PatError, match="cycle count"):
        create_schedule("composite", opt, 10, cycles=(1, 2))
