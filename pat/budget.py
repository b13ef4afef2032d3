"""One training budget, split between a parent and its children by a stated rule.

A budget is given in epochs over the training split, in optimizer steps or in training FLOPs
(``budget: {epochs: 48}`` in a run config, :class:`BudgetConfig` in Python). It is converted
to *parent epochs* — one pass of the dense network over the training split — and allocated:

1. the parent gets ``parent_share`` of it (rounded to whole epochs, at least one): by default
   half for masked children and a quarter for physical ones (:func:`parent_share_for`);
2. the rest is shared by the children in whole epochs each. A child pass over a bagged share
   of the data costs that share of an epoch, so bagged children get more epochs;
3. a child needs optimizer steps to recover from its pruning: when the rest would give each
   of the requested children fewer than ``min_child_steps`` steps, fewer children are made
   (never fewer than two), each getting more steps;
4. what whole epochs leave over goes back to the parent, so the parts add up to the budget
   (up to one child pass of rounding).

With ``trunk`` (the default) the parent is a *trunk*: it trains at its LR held constant and
each child does the annealing, a one-cycle schedule peaking at the parent's LR, so every
child converges on its own way down from the same high-LR point. Measured on digits, this
is what brought the ensemble level with one model trained for the whole budget (a tie over
10 seeds at 48 epochs; docs/benchmarks.md); an annealed parent's children stay at its
minimum and average to little more than it.

Masked children cost a dense step (their zeros are multiplied). Physical children cost less:
``child_cost`` is a child step's share of a dense one (its FLOPs over the parent's), and a
budget in epochs or FLOPs charges them that share, so cheaper children get more epochs. A
budget in steps counts optimizer steps, whatever each costs.

A child with BatchNorm has its running statistics recomputed after tuning (one forward pass
over its training share, ``tune.recompute_bn``). A forward pass is a third of a training pass
(:data:`TRAIN_FLOPS_PER_FORWARD`), so with ``recompute_bn`` a budget in epochs
or FLOPs charges each child a third of one of its epochs on top of its tuning; a budget in
steps does not (the pass takes no optimizer step). The parent's own pass at the end of its
training (``TrainConfig.recompute_bn``) is outside the budget, as the pass of the one model
trained for the whole budget is: both arms of the comparison pay it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pat.errors import PatError, check

__all__ = ["BudgetConfig", "Allocation", "allocate_budget", "parent_share_for", "TRAIN_FLOPS_PER_FORWARD"]

# a training pass (forward + backward) costs about three forwards (Kaplan et al., 2020); the
# budget's unit and pat.engine.cost's FLOP counts both rest on it
TRAIN_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class BudgetConfig:
    """A total training budget; exactly one of ``epochs``, ``steps`` and ``flops``."""

    epochs: float | None = None  # passes of the dense parent over the training split
    steps: int | None = None  # optimizer steps of batch_size samples
    flops: float | None = None  # training FLOPs (3 x forward, pat.engine.cost)
    parent_share: float | None = None  # share of the budget the parent trains for; None: parent_share_for
    min_child_steps: int = 10  # fewer children, each with at least this many steps
    # the parent trains at a constant LR (its share of the budget is all exploration) and
    # every child anneals from it: a one-cycle peaking at the parent's LR (docs/benchmarks.md)
    trunk: bool = True

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("epochs", self.epochs), ("steps", self.steps), ("flops", self.flops))
                 if v is not None}
        check(len(given) == 1, "budget needs exactly one of epochs, steps, flops. Got "
                               f"{', '.join(given) or 'none'}.")
        (unit, value), = given.items()
        check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
              f"budget.{unit} must be a positive number. Got {value!r}.")
        check(self.parent_share is None or (isinstance(self.parent_share, (int, float))
                                            and not isinstance(self.parent_share, bool) and 0 < self.parent_share < 1),
              f"budget.parent_share must be in (0, 1). Got {self.parent_share!r}.")
        check(isinstance(self.trunk, bool), f"budget.trunk must be true or false. Got {self.trunk!r}.")
        check(isinstance(self.min_child_steps, int) and self.min_child_steps >= 1,
              f"budget.min_child_steps must be a positive integer. Got {self.min_child_steps!r}.")

    @property
    def unit(self) -> str:
        """The unit the budget is given in: ``epochs``, ``steps`` or ``flops``."""
        return "epochs" if self.epochs is not None else "steps" if self.steps is not None else "flops"


@dataclass(frozen=True)
class Allocation:
    """How a budget was spent: parent epochs, number of children and epochs per child."""

    budget_epochs: float  # the budget, in parent epochs
    parent_epochs: int
    children: int
    child_epochs: int
    steps_per_epoch: int  # parent steps per epoch
    child_steps_per_epoch: int  # a child's steps per epoch (fewer when bagged)
    child_cost: float = 1.0  # a child step's cost in dense parent steps (physical children: < 1)
    recompute_bn: bool = False  # each child charged a forward pass over its data (BatchNorm statistics)
    parent_share: float = 0.5  # the share the parent's epochs were rounded from

    @property
    def child_passes(self) -> float:
        """A child's cost in its own epochs: its tuning plus the BatchNorm recomputation, if charged."""
        return self.child_epochs + (1 / TRAIN_FLOPS_PER_FORWARD if self.recompute_bn else 0.0)

    @property
    def spent_epochs(self) -> float:
        """Parent epochs spent: the parent's plus each child's, scaled by its share of the data and its cost."""
        share = self.child_steps_per_epoch / self.steps_per_epoch
        return self.parent_epochs + self.children * self.child_passes * share * self.child_cost

    @property
    def steps(self) -> int:
        """Optimizer steps taken in all, parent and children."""
        return self.parent_epochs * self.steps_per_epoch + self.children * self.child_epochs * self.child_steps_per_epoch

    def as_dict(self) -> dict[str, float | int]:
        """The allocation as a plain dict, for a run's metrics and config files."""
        return {"budget_epochs": self.budget_epochs, "parent_epochs": self.parent_epochs,
                "children": self.children, "child_epochs": self.child_epochs,
                "steps": self.steps, "spent_epochs": round(self.spent_epochs, 4),
                "child_cost": round(self.child_cost, 4), "recompute_bn": self.recompute_bn,
                "parent_share": self.parent_share}

    def describe(self) -> str:
        """One line for a person: the budget and how it was split, in epochs and steps."""
        cost = f"; a child step costs {self.child_cost:.2f} of the parent's" if self.child_cost != 1 else ""
        if self.recompute_bn:
            cost += "; a child's BatchNorm recomputation costs a third of its epoch"
        return (f"budget {self.budget_epochs:g} epochs → parent {self.parent_epochs} + "
                f"{self.children} children × {self.child_epochs} "
                f"({self.steps} optimizer steps, {self.child_epochs * self.child_steps_per_epoch} a child{cost})")


def allocate_budget(
    budget: BudgetConfig,
    *,
    train_size: int,
    batch_size: int,
    children: int,
    bagging: float | None = None,
    flops_per_sample: float | None = None,
    child_cost: float = 1.0,
    recompute_bn: bool = False,
    physical: bool = False,
) -> Allocation:
    """Split ``budget`` between a parent and at most ``children`` children (see the module doc).

    Args:
        budget: the total budget and the rule that splits it.
        train_size: samples in the training split.
        batch_size: samples per optimizer step.
        children: children asked for; fewer are made if they would not get
            ``budget.min_child_steps`` steps each.
        bagging: each child's share of the training split (``None``: all of it).
        flops_per_sample: training FLOPs of one sample through the dense model, needed for a
            budget in FLOPs (:func:`pat.engine.cost.forward_flops` x 3).
        child_cost: what one child step costs in dense parent steps (a physical child's FLOPs
            over the parent's; :func:`pat.pipeline.physical_child_cost`). Ignored for a budget
            in steps, which counts steps.
        recompute_bn: charge each child the forward pass over its training share that
            recomputes its BatchNorm statistics after tuning (a third of one of its epochs;
            ignored for a budget in steps).
        physical: the children are physical (neuron level, pruned channels removed); it sets
            the parent's share when the budget does not (:func:`parent_share_for`).
    """
    check(train_size > 0 and batch_size > 0, f"train_size and batch_size must be positive. Got {train_size}, {batch_size}.")
    check(children >= 1, f"children must be at least 1. Got {children}.")
    check(0 < child_cost <= 1, f"child_cost must be in (0, 1]. Got {child_cost!r}.")
    if budget.steps is not None:
        child_cost, recompute_bn = 1.0, False
    steps_per_epoch = math.ceil(train_size / batch_size)
    child_samples = round(bagging * train_size) if bagging is not None and bagging < 1 else train_size
    child_steps_per_epoch = math.ceil(child_samples / batch_size)
    if budget.epochs is not None:
        total = float(budget.epochs)
    elif budget.steps is not None:
        total = budget.steps / steps_per_epoch
    else:
        if not flops_per_sample:
            raise PatError("a budget in flops needs the model's FLOPs per sample; give epochs or steps instead.")
        total = float(budget.flops) / (flops_per_sample * train_size)
    share = parent_share_for(budget, physical=physical)
    parent = max(1, round(total * share))
    # in child steps: what the parent leaves, at what a child step costs (a hair of slack so
    # that an exact fit is not lost to rounding)
    rest = (total - parent) * steps_per_epoch / child_cost * (1 + 1e-9)
    setup = child_steps_per_epoch / TRAIN_FLOPS_PER_FORWARD if recompute_bn else 0.0  # in child steps
    if rest < child_steps_per_epoch + setup:
        raise PatError(f"budget {budget_text(budget)} leaves no child a single epoch after the parent's "
                       f"{parent}; raise the budget or lower parent_share.")
    m = children
    per_child = int((rest / m - setup) // child_steps_per_epoch)
    if per_child * child_steps_per_epoch < budget.min_child_steps and m > 2:
        affordable = int(rest // (max(budget.min_child_steps, child_steps_per_epoch) + setup))
        m = max(2, min(m, affordable))
        per_child = int((rest / m - setup) // child_steps_per_epoch)
    if per_child < 1:
        m = max(1, int(rest // (child_steps_per_epoch + setup)))
        per_child = 1
    leftover = (rest - m * (per_child * child_steps_per_epoch + setup)) * child_cost  # in parent steps
    parent += int(leftover // steps_per_epoch)
    return Allocation(budget_epochs=round(total, 4), parent_epochs=parent, children=m, child_epochs=per_child,
                      steps_per_epoch=steps_per_epoch, child_steps_per_epoch=child_steps_per_epoch,
                      child_cost=child_cost, recompute_bn=recompute_bn, parent_share=share)


def parent_share_for(budget: BudgetConfig, *, physical: bool) -> float:
    """The share of ``budget`` the parent trains for: ``budget.parent_share`` if given, else by the children.

    Masked children cost a dense step and get a few epochs each: half the budget goes to the
    parent. Physical children cost a fraction of one and get several times the epochs, enough
    to do much of the learning themselves: a quarter goes to the parent. Chosen on seeds 0-2
    at three budgets and confirmed on fresh seeds (docs/decisions.md, 74).
    """
    if budget.parent_share is not None:
        return float(budget.parent_share)
    return 0.25 if physical else 0.5


def budget_text(budget: BudgetConfig) -> str:
    value = getattr(budget, budget.unit)
    return f"{value:g} {budget.unit}"
