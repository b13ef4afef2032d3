"""LR policies by name, all stepped once per optimizer step (per batch).

Each policy is built from ``torch.optim.lr_scheduler``; where a shape has no scheduler of its
own, the LR factor is a pure function of training progress ``t = step / total_steps`` wrapped in
``LambdaLR``, so it can be unit-tested over a grid. ``docs/schedules.md`` gives the formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from pat.errors import check
from pat.registry import SCHEDULES

__all__ = [
    "register_schedule",
    "list_schedules",
    "create_schedule",
    "parent_factor",
    "one_cycle_lr",
]

ScheduleFactory = Callable[..., LRScheduler]


def register_schedule(name: str) -> Callable[[ScheduleFactory], ScheduleFactory]:
    """Register ``factory(optimizer, total_steps, **kwargs) -> LRScheduler`` under ``name``."""
    return SCHEDULES.register(name)


def list_schedules() -> list[str]:
    """The names :func:`create_schedule` accepts."""
    return SCHEDULES.names()


def create_schedule(name: str, optimizer: Optimizer, total_steps: int, **kwargs: Any) -> LRScheduler:
    """Build the per-step scheduler ``name`` for a run of ``total_steps`` optimizer steps.

    The optimizer's ``lr`` is the base (peak) LR unless the policy says otherwise.
    """
    factory = SCHEDULES.get(name)
    check(total_steps > 0, f"total_steps must be positive. Got {total_steps}.")
    return factory(optimizer, total_steps, **kwargs)


# -- pure LR factors ------------------------------------------------------------------------


def parent_factor(t: float, *, hold: float = 0.5, end: float = 0.9, final: float = 0.01) -> float:
    """Prune-and-Tune parent recipe as a multiple of the base LR (0.1 in the paper).

    Constant 1 until ``hold`` of training, linear down to ``final`` at ``end``, then constant:
    with base 0.1 that is 0.1 → 0.001 between 50% and 90% of training.
    """
    if t < hold:
        return 1.0
    if t < end:
        return 1.0 + (final - 1.0) * (t - hold) / (end - hold)
    return final


def one_cycle_lr(step: int, total_steps: int, max_lr: float, *, pct_start: float = 0.1,
                 div_factor: float = 100.0, final_lr: float = 1e-7) -> float:
    """Closed form of the one-cycle policy that :class:`OneCycleLR` follows (cosine both ways).

    Warm up from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of steps,
    then cosine-anneal to ``final_lr``. Used by tests to check the scheduler's trace.
    """
    start = max_lr / div_factor
    peak_step = float(pct_start * total_steps) - 1
    end_step = float(total_steps) - 1

    def cos(a: float, b: float, frac: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * frac) + 1)

    if step <= peak_step:
        return cos(start, max_lr, step / peak_step)
    return cos(max_lr, final_lr, (step - peak_step) / (end_step - peak_step))


# -- registered policies ----------------------------------------------------------------------


def _lambda(optimizer: Optimizer, total_steps: int, factor: Callable[[float], float]) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: factor(min(step, total_steps) / total_steps))


@register_schedule("constant")
def _constant(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda step: 1.0)


@register_schedule("parent")
def _parent(optimizer: Optimizer, total_steps: int, *, hold: float = 0.5, end: float = 0.9,
            final: float = 0.01) -> LRScheduler:
    return _lambda(optimizer, total_steps, partial(parent_factor, hold=hold, end=end, final=final))


@register_schedule("one-cycle")
def _one_cycle(optimizer: Optimizer, total_steps: int, *, max_lr: float | None = None,
               pct_start: float = 0.1, div_factor: float = 100.0, final_lr: float = 1e-7,
               cycle_momentum: bool = False) -> LRScheduler:
    max_lr = max_lr if max_lr is not None else optimizer.param_groups[0]["lr"]
    check(max_lr > 0, f"max_lr must be positive. Got {max_lr}.")
    if total_steps < 4:
        # too short for a warm-up and an annealing phase: anneal from the peak only
        from torch.optim.lr_scheduler import CosineAnnealingLR

        for group in optimizer.param_groups:
            group["lr"] = max_lr
        return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=final_lr)
    # OneCycleLR needs pct_start*total_steps >= 2 steps to have a warm-up phase at all.
    pct_start = max(pct_start, 2.0 / total_steps)
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy="cos",
        div_factor=div_factor,
        final_div_factor=(max_lr / div_factor) / final_lr,
        cycle_momentum=cycle_momentum,
    )


@register_schedule("cosine")
def _cosine(optimizer: Optimizer, total_steps: int, *, final_lr: float = 0.0) -> LRScheduler:
    from torch.optim.lr_scheduler import CosineAnnealingLR

    return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=final_lr)


# -- LR-policy pool (LREnsemble) ----------------------------------------------------------------
# Jin & Wu, "Boosting Deep Ensembles with Learning Rate Tuning" (LREnsemble, 2024): the same
# network trained under several policies and peak LRs makes a diverse pool of members.

__all__ += ["multistep_milestones", "warmup_steps", "composite_factor"]


def multistep_milestones(total_steps: int, fractions: tuple[float, ...] = (0.3, 0.6, 0.8)) -> list[int]:
    """Steps at which ``multistep`` multiplies the LR by gamma: ``round(f · total_steps)``."""
    return [max(1, round(f * total_steps)) for f in fractions]


def warmup_steps(total_steps: int, warmup: float = 0.05) -> int:
    """Length W of ``warmup-cosine``'s linear warm-up: ``max(1, round(warmup · total_steps))``."""
    return max(1, round(warmup * total_steps))


def composite_factor(t: float, *, splits: tuple[float, ...] = (0.45, 0.9),
                     cycles: tuple[int, ...] = (3, 2, 1), floor: float = 0.2,
                     decay: float = 0.1) -> float:
    """The ``composite`` policy as a multiple of the base LR, at progress ``t`` in [0, 1].

    Stage k (boundaries ``0, *splits, 1``) repeats ``cycles[k]`` cosine cycles that each fall
    from the stage peak ``decay**k`` to the floor ``floor · decay**k``::

        s = (t - b_k) / (b_{k+1} - b_k),   c = frac(s · cycles[k])
        factor = decay**k · (floor + (1 - floor) · (1 + cos(pi · c)) / 2)
    """
    bounds = (0.0, *splits, 1.0)
    k = sum(1 for b in splits if t >= b)
    k = min(k, len(cycles) - 1)
    s = (t - bounds[k]) / (bounds[k + 1] - bounds[k])
    c = (s * cycles[k]) % 1.0
    return decay**k * (floor + (1.0 - floor) * (1.0 + math.cos(math.pi * c)) / 2.0)


@register_schedule("multistep")
def _multistep(optimizer: Optimizer, total_steps: int, *, gamma: float = 0.2,
               milestones: tuple[float, ...] = (0.3, 0.6, 0.8)) -> LRScheduler:
    from torch.optim.lr_scheduler import MultiStepLR

    check(0 < gamma <= 1, f"gamma must be in (0, 1]. Got {gamma}.")
    return MultiStepLR(optimizer, milestones=multistep_milestones(total_steps, tuple(milestones)),
                       gamma=gamma)


@register_schedule("warmup-cosine")
def _warmup_cosine(optimizer: Optimizer, total_steps: int, *, warmup: float = 0.05,
                   start_factor: float = 1e-3, final_lr: float = 0.0) -> LRScheduler:
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    check(0 <= warmup < 1, f"warmup must be in [0, 1). Got {warmup}.")
    check(0 < start_factor <= 1, f"start_factor must be in (0, 1]. Got {start_factor}.")
    w = warmup_steps(total_steps, warmup)
    return SequentialLR(optimizer, [
        LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=w),
        CosineAnnealingLR(optimizer, T_max=max(1, total_steps - w), eta_min=final_lr),
    ], milestones=[w])


@register_schedule("composite")
def _composite(optimizer: Optimizer, total_steps: int, *, splits: tuple[float, ...] = (0.45, 0.9),
               cycles: tuple[int, ...] = (3, 2, 1), floor: float = 0.2,
               decay: float = 0.1) -> LRScheduler:
    check(len(cycles) == len(splits) + 1,
          f"composite needs one cycle count per stage ({len(splits) + 1}). Got {list(cycles)}.")
    check(0 <= floor <= 1, f"floor must be in [0, 1]. Got {floor}.")
    return _lambda(optimizer, total_steps, partial(
        composite_factor, splits=tuple(splits), cycles=tuple(cycles), floor=floor, decay=decay))
