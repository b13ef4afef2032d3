"""The LR-policy pool: one architecture trained under several LR policies and peak LRs.

Every (policy, LR) pair of the grid becomes one member of one ensemble directory; all are
kept, not only the best, and a selector (:mod:`pat.ensemble.select`) picks a team later.
Members may also serve as parents for Prune and Tune.

References:
    Jin & Wu, "Boosting Deep Ensembles with Learning Rate Tuning" (LREnsemble), 2024.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pat.config import DataConfig, check_field_types
from pat.data import BatchData, Dataset, as_data
from pat.engine.distributed import Ranks, init_ranks
from pat.engine.loop import fit, resolve_device
from pat.engine.optim import recipe
from pat.engine.schedules import create_schedule
from pat.errors import check
from pat.jobs import Job, JobContext, Trained, member_seed, run_in_memory
from pat.models import create_model
from pat.producers.common import (
    CallbackFactory,
    as_members,
    finished,
    load_data,
    produce,
)
from pat.registry import OPTIMIZERS, SCHEDULES
from pat.store import EnsembleDir

__all__ = ["PAPER_GRID", "PoolConfig", "pool_jobs", "train_pool", "pool_members", "plot_policies"]

PRODUCER = "pool"

# The paper's 16 models: four policies x four starting / peak LRs.
PAPER_GRID: dict[str, tuple[float, ...]] = {
    "multistep": (0.2, 0.1, 0.05, 0.01),  # starting LR, x0.2 at 30/60/80%
    "one-cycle": (0.4, 0.2, 0.1, 0.05),  # peak LR
    "warmup-cosine": (0.2, 0.1, 0.05, 0.01),  # LR after the warm-up
    "composite": (1.0, 0.5, 0.25, 0.05),  # first stage's peak
}
_ALIASES = {"onecycle": "one-cycle", "warmupcosine": "warmup-cosine", "cosine-warmup": "warmup-cosine"}


@dataclass(frozen=True)
class PoolConfig:
    """An LR-policy pool. LRs are per batch of ``data.batch_size``."""

    model: str = "lenet-s"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 10  # every member trains this many epochs
    policies: tuple[str, ...] = tuple(PAPER_GRID)
    lrs: tuple[float, ...] | None = None  # one LR list for every policy; None = PAPER_GRID
    optimizer: str = "sgd"  # sgd (Nesterov) | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # member k of the grid: init and data order seeded by pat.jobs.member_seed(seed, k)
    device: str = "auto"
    amp: bool | None = None
    recompute_bn: bool = True  # BatchNorm statistics recomputed on the unaugmented training split (finished())

    def __post_init__(self) -> None:
        check_field_types(self)  # recompute_bn: true or false, epochs: an integer, ...
        check(self.epochs > 0, f"epochs must be positive. Got {self.epochs}.")
        policies = tuple(_ALIASES.get(p.strip().lower(), p.strip().lower()) for p in self.policies)
        check(len(policies) > 0, "policies must name at least one LR policy. Got none.")
        for p in policies:
            SCHEDULES.get(p, argument="policy")
        check(len(set(policies)) == len(policies), f"policies lists a policy twice. Got {list(policies)}.")
        object.__setattr__(self, "policies", policies)
        if self.lrs is not None:
            lrs = tuple(float(v) for v in self.lrs)
            check(len(lrs) > 0, "lrs must hold at least one LR. Got an empty list.")
            check(all(v > 0 for v in lrs), f"lrs must all be positive. Got {list(lrs)}.")
            check(len(set(lrs)) == len(lrs), f"lrs lists an LR twice. Got {list(lrs)}.")
            object.__setattr__(self, "lrs", lrs)
        else:
            missing = [p for p in policies if p not in PAPER_GRID]
            check(not missing, f"policy {missing[0] if missing else ''!r} has no default LR grid; "
                               "give the LRs with --lrs.")
        OPTIMIZERS.get(self.optimizer)


def member_name(policy: str, lr: float) -> str:
    return f"{policy}-lr{lr:g}"


def pool_jobs(config: PoolConfig) -> list[tuple[str, str, float]]:
    """The grid as ``(member name, policy, lr)``, policy-major, in a fixed order."""
    return [(member_name(p, lr), p, lr) for p in config.policies
            for lr in (config.lrs if config.lrs is not None else PAPER_GRID[p])]


def train_member(config: PoolConfig, data: Dataset, policy: str, lr: float, index: int, *,
                 device: torch.device, callbacks: CallbackFactory | None = None,
                 resume_path: str | os.PathLike | None = None,
                 resume_extra: Mapping[str, Any] | None = None) -> Trained:
    """Train member ``index`` of the grid (``policy`` at ``lr``) from a fresh initialisation."""
    seed = member_seed(config.seed, index)
    torch.manual_seed(seed)
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                         **config.model_kwargs).to(device)
    train = data.loader("train", batch_size=config.data.batch_size, device=device, seed=seed)
    optimizer, scheduler = recipe(model, config, lr=lr, schedule=policy, total_steps=config.epochs * len(train))
    name = member_name(policy, lr)
    state = fit(model, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                callbacks=callbacks(name) if callbacks else (), amp=config.amp, device=device,
                resume_path=resume_path, resume_extra=resume_extra)
    return finished(model, state, data, config, device,
                    recipe={"policy": policy, "lr": lr, "epochs": config.epochs, "seed": seed})


def train_pool(
    config: PoolConfig,
    out: str | os.PathLike,
    *,
    data: Dataset | None = None,
    force: bool = False,
    callbacks: CallbackFactory | None = None,
    on_member: Callable[[Mapping[str, Any], bool], None] | None = None,
    ranks: Ranks | None = None,
) -> EnsembleDir:
    """Train every (policy, LR) member of ``config`` into the ensemble directory ``out``.

    The members are independent jobs of :func:`pat.jobs.run_jobs`: finished ones are skipped on
    a rerun with the same config, an interrupted one resumes from its last epoch, and under
    ``torchrun`` each rank trains its share.

    Args:
        config: the grid, the model and the recipe every member shares.
        out: the ensemble directory to write (or to resume).
        data: the loaded dataset; default ``config.data``'s.
        force: replace an ensemble of other settings in ``out`` instead of refusing it.
        callbacks: ``name -> callbacks`` for each member's training (progress bars).
        on_member: called with ``(record, skipped)`` after each of this rank's members.
        ranks: the torchrun ranks; default read from its environment.

    Returns:
        The ensemble directory (its manifest as written by rank 0).
    """
    ranks = ranks or init_ranks()
    device = resolve_device(ranks.device(config.device))
    data = data or load_data(config)
    spec = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        **config.model_kwargs).pat_spec  # fails fast on a bad model name
    return produce(out, producer=PRODUCER, config=config, arch=spec, data=data, force=force, ranks=ranks,
                   jobs=lambda: _jobs(config, data, device, callbacks), on_member=on_member)


def pool_members(config: PoolConfig, *, data: Dataset | BatchData | None = None,
                 callbacks: CallbackFactory | None = None) -> list[torch.nn.Module]:
    """Train the pool in this process and return its members (the Python API; nothing is written).

    The members are those :func:`train_pool` writes, seed for seed, in grid order; each
    carries its :class:`pat.records.Member` record as ``pat_member``. ``data`` may also be
    batches (a ``DataLoader``, or :class:`pat.data.BatchData` with validation and test ones).
    """
    data = as_data(data) if data is not None else load_data(config)
    trained = run_in_memory(_jobs(config, data, resolve_device(config.device), callbacks))
    return as_members(trained, PRODUCER)


def _jobs(config: PoolConfig, data: Dataset, device: torch.device, callbacks: CallbackFactory | None) -> list[Job]:
    """One independent job per (policy, LR) member."""
    def job(index: int, name: str, policy: str, lr: float) -> Job:
        def train(ctx: JobContext) -> list[Trained]:
            return [train_member(config, data, policy, lr, index, device=device, callbacks=callbacks,
                                 resume_path=ctx.partial, resume_extra=ctx.extra)]
        return Job(name, train)

    return [job(k, *grid) for k, grid in enumerate(pool_jobs(config))]


def plot_policies(config: PoolConfig, path: str | os.PathLike, *, steps: int = 1000) -> Path:
    """Draw every member's LR against training progress into a PNG (one panel per policy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    jobs = pool_jobs(config)
    fig = Figure(figsize=(3.2 * len(config.policies), 3.0), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(config.policies), squeeze=False)[0]
    for ax, policy in zip(axes, config.policies, strict=True):
        for _, p, lr in jobs:
            if p != policy:
                continue
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
            sched = create_schedule(policy, opt, total_steps=steps)
            trace = []
            for _ in range(steps):
                trace.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            ax.plot([i / steps for i in range(steps)], trace, label=f"{lr:g}")
        ax.set_title(policy)
        ax.set_xlabel("training progress")
        ax.legend(fontsize=7, title="LR")
    axes[0].set_ylabel("learning rate")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
