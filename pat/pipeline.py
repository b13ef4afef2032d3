"""End to end: parent → split → tune → evaluate. The function behind ``pat run`` and ``pat demo``.

An output directory holds ``config.yaml`` (the resolved config), ``parent.pt``, ``children/``
(an ensemble directory), ``metrics.json`` and, with ``baseline``, ``independent.pt`` (one
model trained for the whole budget). Every stage is skipped when its output is already
there, so an interrupted run continues where it stopped when started again. Under
``torchrun`` the same call runs on every rank (:func:`run`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pat.budget import TRAIN_FLOPS_PER_FORWARD, Allocation, allocate_budget
from pat.comparison import Comparison, baseline_trend
from pat.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    TuneConfig,
    load_yaml,
    run_split,
    save_yaml,
    to_dict,
)
from pat.data import Dataset, load_dataset
from pat.engine.batchnorm import has_batchnorm
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint
from pat.engine.distributed import Ranks, init_ranks
from pat.errors import PatError, check, first_line
from pat.io import atomic_write, ensure_folder_writable
from pat.parent import train_parent
from pat.splitting import split_footprint, split_to_directory
from pat.tuner import tune_directory

__all__ = ["RunResult", "run", "demo_config", "split_to_directory", "split_footprint", "resolve_budget",
           "physical_child_cost", "recomputes_bn"]

Progress = Callable[[str], Iterable[Callback]]


@dataclass
class RunResult:
    """What :func:`run` measured, as rank 0 returns it (also written to ``metrics.json``)."""

    out: Path
    rows: list[dict[str, Any]]  # one per parent, child and the ensemble: name, accuracy, nll, ece, brier
    diversity: dict[str, Any]
    seconds: float
    validation: dict[str, Any] = field(default_factory=dict)  # parent_check: ensemble vs parent
    allocation: Allocation | None = None  # how config.budget was spent, if it was given
    baseline_trend: dict[str, Any] | None = None  # baseline: true only; see baseline_trend()


def demo_config(out: str = "runs/demo", seed: int = 0) -> RunConfig:
    """The ``pat demo`` run: digits, LeNet-S, a 48-epoch budget, and the model it must beat.

    ``pat run``'s defaults throughout — a quarter of the budget to a trunk at a constant LR, the rest
    to two physical children that partition its channels, each tuned (one-cycle, peak at the
    trunk's LR) for as many epochs as its FLOPs allow (:func:`pat.config.run_split`) — plus an
    independent LeNet-S trained for the whole 48 epochs with the parent's recipe, so the
    ensemble is shown against its parent and against one model of the same budget.
    ``seed`` seeds the parent's and the one model's initialisation, the split and the tuning;
    the data split stays the same, so runs of several seeds are scored on the same test images.
    """
    from pat.budget import BudgetConfig

    data = DataConfig(dataset="digits", batch_size=128)
    return RunConfig(
        parent=TrainConfig(model="lenet-s", lr=0.03, seed=seed, data=data),
        split=dataclasses.replace(run_split(), seed=seed),
        tune=TuneConfig(seed=seed, data=data),
        budget=BudgetConfig(epochs=48),
        baseline=True,
        out=out,
    )


def resolve_budget(config: RunConfig, data: Dataset) -> tuple[RunConfig, Allocation | None]:
    """Apply ``config.budget`` (if any): parent epochs, number of children and child epochs.

    The result is a plain config (its ``budget`` kept) whose stages spend the allocation; a
    config without a budget is returned unchanged. Physical children are charged their FLOPs
    (:func:`physical_child_cost`), and children with BatchNorm the pass that recomputes its
    statistics (:func:`recomputes_bn`), unless the budget is in steps.
    """
    if config.budget is None:
        return config, None
    check(config.parent.data.batch_size == config.tune.data.batch_size,
          f"a budget needs one batch size for parent and children. Got parent.data.batch_size="
          f"{config.parent.data.batch_size} and tune.data.batch_size={config.tune.data.batch_size}.")
    flops = None
    if config.budget.flops is not None:
        from pat.engine.cost import example_input, forward_flops

        model = _fresh_model(config, data)
        flops = TRAIN_FLOPS_PER_FORWARD * forward_flops(model, example_input(data))

    recompute_bn = recomputes_bn(config, data)

    def allocate(children: int) -> Allocation:
        cost = 1.0
        if config.split.physical and config.budget.unit != "steps":
            cost = physical_child_cost(config, data, children)
        return allocate_budget(config.budget, train_size=len(data.train.y),
                               batch_size=config.tune.data.batch_size, children=children,
                               bagging=config.tune.bagging, flops_per_sample=flops, child_cost=cost,
                               recompute_bn=recompute_bn, physical=config.split.physical)

    # a partition's children are larger when fewer: when the budget affords fewer children
    # than asked for, their cost is measured again at that number (it only ever goes down)
    allocation = allocate(config.split.children)
    while allocation.children != config.split.children and config.split.physical:
        fewer = allocation.children
        allocation = allocate(fewer)
        if allocation.children == fewer:
            break
    parent = dataclasses.replace(config.parent, epochs=allocation.parent_epochs)
    tune = dataclasses.replace(config.tune, epochs=allocation.child_epochs)
    if config.budget.trunk:  # the parent explores at a constant LR; each child anneals from there
        parent = dataclasses.replace(parent, schedule="constant")
        if tune.max_lr is None:
            tune = dataclasses.replace(tune, max_lr=parent.lr)
    resolved = dataclasses.replace(config, parent=parent, tune=tune,
                                   split=dataclasses.replace(config.split, children=allocation.children))
    return resolved, allocation


def _fresh_model(config: RunConfig, data: Dataset) -> Any:
    from pat.models import create_model

    with torch.random.fork_rng(devices=[]):  # building it must not move the run's seeded RNG
        return create_model(config.parent.model, num_classes=data.num_classes, in_channels=data.in_channels,
                            **config.parent.model_kwargs)


def recomputes_bn(config: RunConfig, data: Dataset) -> bool:
    """Whether the run's children get their BatchNorm statistics recomputed after tuning.

    ``tune.recompute_bn`` applies to models with BatchNorm layers only; the model is built
    fresh (splitting keeps every BatchNorm layer, so the children have them if it does).
    """
    if not config.tune.recompute_bn:
        return False
    return has_batchnorm(_fresh_model(config, data))


def physical_child_cost(config: RunConfig, data: Dataset, children: int | None = None) -> float:
    """What one step of the run's physical children costs, as a share of a dense parent step.

    The mean over ``children`` children (default ``config.split.children``) of a child's
    forward FLOPs over the parent's, measured by splitting a freshly built model with
    ``config.split``: which channels a split removes depends on its seed, not on the trained
    weights, so the count (and so the FLOPs) is the trained parent's children's too.
    """
    from pat.children import iter_split
    from pat.engine.cost import example_input, forward_flops

    sp = config.split
    check(sp.physical, "physical_child_cost needs split.physical=true.")
    with torch.random.fork_rng(devices=[]):  # nothing here may move the run's seeded RNG
        model, x = _fresh_model(config, data), example_input(data)
        dense = forward_flops(model, x)
        kids = iter_split(model, children or sp.children, method=sp.method, sparsity=sp.sparsity, level=sp.level,
                          scope=sp.scope, physical=True, seed=sp.seed, example_inputs=x,
                          include_first=sp.include_first, include_classifier=sp.include_classifier)
        costs = [forward_flops(kid, x) / dense for kid in kids]
    return min(1.0, sum(costs) / len(costs))


def _check_output(out: Path, force: bool) -> None:
    """Refuse an output directory pat cannot write, or one that holds files but no run.

    A folder of other things (an ensemble from ``pat split``, a project's data) would get a
    run's files mixed in among its own; hidden files do not count. ``force`` still writes
    there, and, as for a run, it removes only the files a run writes.
    """
    ensure_folder_writable(out, argument="out")
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if others and not force and not (out / "config.yaml").exists():
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise PatError(f"out {str(out)!r} holds other files ({shown}) and no run; choose an empty or new "
                       "directory, or pass --force to write the run's files beside them.")


def _claim_output(config: RunConfig, force: bool, allocation: Allocation | None = None) -> Path:
    """Refuse an output directory that holds a different run; remember this run's config."""
    out = Path(config.out)
    saved = out / "config.yaml"
    if saved.exists() and not force and load_yaml(saved) != to_dict(config):
        raise PatError(f"out {str(out)!r} holds a run with a different config; pass --force to "
                       "replace it or choose another directory.")
    if force and out.exists():
        for name in ("parent.pt", "parent.pt.partial", "independent.pt", "independent.pt.partial", "children",
                     "metrics.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# {allocation.describe()}\n# allocation: {json.dumps(allocation.as_dict())}\n" if allocation else ""
    save_yaml(config, saved, header=header)
    return out


def run_epochs(config: RunConfig, child_cost: float = 1.0, recompute_bn: bool = False) -> int:
    """The run's whole budget in parent epochs.

    A bagged child epoch costs its share of one, and each child step ``child_cost`` of a
    parent step (physical children: :func:`physical_child_cost`); with ``recompute_bn`` each
    child also pays the forward pass that recomputes its BatchNorm statistics.
    """
    share = config.tune.bagging if config.tune.bagging is not None else 1.0
    passes = config.tune.epochs + (1 / TRAIN_FLOPS_PER_FORWARD if recompute_bn else 0.0)
    return max(1, round(config.parent.epochs + config.split.children * passes * share * child_cost))


def run(config: RunConfig, *, force: bool = False, progress: Progress = lambda stage: (),
        announce: Callable[[str], None] = lambda line: None, ranks: Ranks | None = None) -> RunResult | None:
    """Run (or continue) the whole Prune-and-Tune pipeline described by ``config``.

    With ``config.budget`` the stages' lengths and the number of children come from
    :func:`pat.budget.allocate_budget` (and, with ``budget.trunk``, the parent trains at a
    constant LR and the children peak at it); the resolved config is what ``config.yaml`` keeps.
    ``announce`` receives the lines that describe the run before training starts: its split,
    and its allocation when it has a budget.

    Under ``torchrun`` (``ranks``, default read from its environment) every rank calls this:
    the parent and the baseline train data-parallel (:func:`pat.parent.train_parent`), the
    children are tuned sharded across the ranks (:func:`pat.tuner.tune_directory`), and rank 0
    alone claims the output, splits, evaluates and writes ``metrics.json``; it returns the
    result and every other rank returns None. ``announce`` is called on rank 0 only;
    ``progress`` on every rank (a callback may steer training). ``force`` applies to the first
    attempt only: a group restarted by ``torchrun --max-restarts`` continues what that attempt
    started instead of deleting it.
    """
    start = time.perf_counter()
    ranks = ranks if ranks is not None else init_ranks()
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        force = False  # the first attempt already cleared the directory; keep what it finished
    if ranks.is_main:
        _check_output(Path(config.out), force)  # before the data loads
    pdata = config.parent.data
    data = load_dataset(pdata.dataset, data_dir=pdata.data_dir, val_fraction=pdata.val_fraction, seed=pdata.seed)
    recipe = config.parent  # the baseline trains with the user's recipe, not the trunk's constant LR
    config, allocation = resolve_budget(config, data)
    if ranks.is_main:
        announce(f"split: {config.split.describe()}")
        if allocation is not None:
            announce(allocation.describe())
    out = Path(config.out)
    _on_main(ranks, lambda: _claim_output(config, force, allocation))
    parent_path, children_dir = out / "parent.pt", out / "children"
    if not parent_path.exists():
        train_parent(config.parent, data=data, callbacks=progress("parent"), out=parent_path, ranks=ranks)
    if not (children_dir / "ensemble.json").exists():
        _on_main(ranks, lambda: split_to_directory(parent_path, children_dir, config.split))
    tune = dataclasses.replace(config.tune, device=ranks.device(config.tune.device))  # one GPU per local rank
    tune_directory(str(children_dir), data, tune, ranks=ranks, callbacks=progress)
    baseline = None
    if config.baseline:
        if allocation is not None:  # the whole budget, even where whole epochs left pat a little short of it
            epochs = max(1, round(allocation.budget_epochs))
        else:
            epochs = run_epochs(config, physical_child_cost(config, data) if config.split.physical else 1.0,
                                recomputes_bn(config, data))
        baseline = (f"independent ({epochs} ep)", out / "independent.pt")
        if not baseline[1].exists():
            train_parent(dataclasses.replace(recipe, epochs=epochs), data=data,
                         callbacks=progress("independent"), out=baseline[1], ranks=ranks)
    if not ranks.is_main:
        return None
    compared = Comparison(children_dir, data, parent_path=parent_path, baseline=baseline, device=tune.device)
    rows, diversity = compared.rows()
    validation = compared.parent_check()  # on the validation probabilities the rows' temperatures used
    trend = baseline_trend(load_checkpoint(baseline[1], argument="baseline", mmap=True).get("history") or []) if baseline else None
    seconds = time.perf_counter() - start
    record = {"test": rows, "diversity": diversity, "validation": validation, "seconds": seconds,
              "allocation": allocation.as_dict() if allocation else None, "baseline_trend": trend}
    text = json.dumps(record, indent=2)
    atomic_write(out / "metrics.json", lambda f: f.write(text.encode()))
    return RunResult(out=out, rows=rows, diversity=diversity, seconds=seconds, validation=validation,
                     allocation=allocation, baseline_trend=trend)


def _on_main(ranks: Ranks, work: Callable[[], Any]) -> None:
    """Do ``work`` on rank 0 while the other ranks wait for it; its failure is raised on every rank.

    Without this a refusal on rank 0 (a directory holding another run) would leave the
    other ranks waiting at the next collective for the process group's 24-hour timeout
    wherever no torchrun agent is there to stop them.
    """
    if not ranks.distributed:
        work()
        return
    import torch.distributed as dist

    failure: list[Any] = [None]
    if ranks.is_main:
        try:
            work()
        except Exception as e:
            failure = [(isinstance(e, PatError), first_line(e))]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        refused, line = failure[0]
        raise PatError(line) if refused else RuntimeError(f"rank 0 failed: {line}")
