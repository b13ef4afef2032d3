"""SharpBalance: members that are each flat, but flat on different samples.

Two phases over one training run per member (one schedule across all ``epochs``):

1. every member trains with SAM for ``initial_epochs``; then each scores every training
   sample by its per-sample sharpness, the squared norm of the sample's loss gradient
   (:func:`pat.engine.sam.per_sample_sharpness`);
2. once **all** members have scores, member i gets a SAM subset chosen from the *other*
   members' scores (:func:`sam_subsets`) and trains the remaining epochs with the mixed step:
   SAM on its subset, plain SGD on the rest (:class:`pat.engine.sam.MixedSAMStep`).

The phases are two waves of jobs for :func:`pat.jobs.run_jobs`, not processes waiting on each
other: member i's phase 1 is a *stage* job whose result — its training state after
``initial_epochs`` and its scores — is saved like a member (``<out>/.work/phase1-member-i.pt``),
and member i's phase 2 is a job that reads every member's stage, continuing its own. An
interrupted run continues where it stopped; a missing stage is trained again.
``mode="sam"`` (SAM throughout) and ``mode="plain"`` (SGD throughout) are the baselines.

References:
    Li et al., "Achieving Flat and Diverse Minima: SharpBalance", 2024 (arXiv:2407.12996).
    Foret et al., "Sharpness-Aware Minimization", ICLR 2021.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pat.config import DataConfig, check_field_types
from pat.data import Dataset
from pat.data.loader import seeded_generator
from pat.engine.callbacks import FitState
from pat.engine.distributed import Ranks, init_ranks
from pat.engine.loop import fit, resolve_device, train_state
from pat.engine.optim import recipe
from pat.engine.sam import MixedSAMStep, SAMStep, per_sample_sharpness
from pat.engine.steps import sgd_step
from pat.errors import check
from pat.jobs import Job, JobContext, Trained, member_seed, run_in_memory
from pat.models import create_model
from pat.producers.common import (
    CallbackFactory,
    as_members,
    finished,
    indexed_loader,
    load_data,
    produce,
)
from pat.registry import OPTIMIZERS, SCHEDULES
from pat.store import EnsembleDir

__all__ = ["SUBSET_RULES", "MODES", "SharpBalanceConfig", "sam_subsets", "sharpness_scores",
           "train_sharpbalance", "sharpbalance_members"]

PRODUCER = "sharpbalance"
SUBSET_RULES = ("others-flat", "others-sharp", "random")
MODES = ("sharpbalance", "sam", "plain")


@dataclass(frozen=True)
class SharpBalanceConfig:
    """SharpBalance members (or SAM / plain baselines). LRs are per batch of ``data.batch_size``."""

    model: str = "lenet-s"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    members: int = 3
    epochs: int = 10  # all epochs, both phases
    initial_epochs: int = 5  # phase 1: full SAM
    rho: float = 0.05  # SAM radius
    adaptive: bool = False  # ASAM perturbation
    flat_ratio: float = 0.5  # share of each other member's samples its rule claims
    subset: str = "others-flat"  # others-flat | others-sharp | random
    mode: str = "sharpbalance"  # sharpbalance | sam (SAM throughout) | plain (SGD throughout)
    lr: float = 0.1
    schedule: str = "cosine"
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # member i's init and data order: pat.jobs.member_seed(seed, i)
    device: str = "auto"
    amp: bool | None = None
    recompute_bn: bool = True  # BatchNorm statistics recomputed on the unaugmented training split (finished())

    def __post_init__(self) -> None:
        check_field_types(self)  # recompute_bn: true or false, epochs: an integer, ...
        check(self.members >= 2, f"members must be >= 2. Got {self.members}.")
        check(self.rho > 0, f"rho must be positive. Got {self.rho}.")
        check(0 <= self.flat_ratio <= 1, f"flat_ratio must be in [0, 1]. Got {self.flat_ratio}.")
        check(self.subset in SUBSET_RULES,
              f"subset {self.subset!r} is unknown; choose one of: {', '.join(SUBSET_RULES)}.")
        check(self.mode in MODES, f"mode {self.mode!r} is unknown; choose one of: {', '.join(MODES)}.")
        check(self.epochs > 0, f"epochs must be positive. Got {self.epochs}.")
        if self.mode == "sharpbalance":
            check(0 < self.initial_epochs < self.epochs,
                  f"initial_epochs must be in [1, epochs={self.epochs}). Got {self.initial_epochs}.")
        check(self.lr > 0, f"lr must be positive. Got {self.lr}.")
        SCHEDULES.get(self.schedule)
        OPTIMIZERS.get(self.optimizer)


def _claimed(scores: Tensor, k: int, lowest: bool) -> Tensor:
    """(M, N) bool: each member's k lowest (or highest) scoring samples; ties by index."""
    order = (scores if lowest else -scores).argsort(dim=1, stable=True)[:, :k]
    claimed = torch.zeros(scores.shape, dtype=torch.bool)
    claimed.scatter_(1, order, True)
    return claimed


def sam_subsets(scores: Tensor, flat_ratio: float, rule: str = "others-flat", *, seed: int = 0) -> Tensor:
    """Each member's SAM subset, chosen from the other members' sharpness scores.

    With k = round(flat_ratio · N), every member j *claims* its k flattest samples
    (``others-flat``; its k sharpest for ``others-sharp``). Member i's subset is the union of
    the samples claimed by the other members, plus its share of the samples no member
    claimed (those are dealt out in a seeded random order, one share per member, so each is
    trained with SAM by exactly one member). ``random`` is the control: member i gets a
    seeded uniformly random subset of the size ``others-flat`` would give it.

    Args:
        scores: (M, N) per-sample sharpness of M members on N training samples.
        flat_ratio: the share k / N of its samples each member claims.
        rule: ``"others-flat"``, ``"others-sharp"`` or ``"random"``.
        seed: seeds the dealing of unclaimed samples (and the ``random`` subsets).

    Returns:
        (M, N) bool on CPU; row i is member i's SAM subset.
    """
    check(scores.dim() == 2 and scores.shape[0] >= 2,
          f"scores must be (M >= 2, N). Got {tuple(scores.shape)}.")
    check(0 <= flat_ratio <= 1, f"flat_ratio must be in [0, 1]. Got {flat_ratio}.")
    check(rule in SUBSET_RULES, f"subset {rule!r} is unknown; choose one of: {', '.join(SUBSET_RULES)}.")
    scores = scores.detach().float().cpu()
    m, n = scores.shape
    claimed = _claimed(scores, round(flat_ratio * n), lowest=rule != "others-sharp")
    unclaimed = (~claimed.any(0)).nonzero().flatten()
    dealt = unclaimed[torch.randperm(len(unclaimed), generator=seeded_generator(seed, 0x5B))]
    subsets = torch.zeros(m, n, dtype=torch.bool)
    for i in range(m):
        others = torch.cat([claimed[:i], claimed[i + 1 :]])
        subsets[i] = others.any(0)
        subsets[i, dealt[i::m]] = True
    if rule == "random":
        sizes = subsets.sum(1).tolist()
        subsets.zero_()
        for i, size in enumerate(sizes):
            pick = torch.randperm(n, generator=seeded_generator(seed, 0x5B, i + 1))[:size]
            subsets[i, pick] = True
    return subsets


def sharpness_scores(model: torch.nn.Module, data: Dataset, *, batch_size: int,
                     device: torch.device) -> Tensor:
    """(N,) per-sample sharpness of ``model`` on the training split, in index order, on CPU."""
    loader = data.loader("train", batch_size=batch_size, shuffle=False, augment=False, device=device)
    return torch.cat([per_sample_sharpness(model, x, y).cpu() for x, y in loader])


def _setup(config: SharpBalanceConfig, data: Dataset, i: int, device: torch.device):
    """Member i's model, indexed loader, optimizer and whole-run scheduler (fresh)."""
    seed = member_seed(config.seed, i)
    torch.manual_seed(seed)
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                         **config.model_kwargs).to(device)
    loader = indexed_loader(data, batch_size=config.data.batch_size, device=device, seed=seed)
    optimizer, scheduler = recipe(model, config, lr=config.lr, schedule=config.schedule,
                                  total_steps=config.epochs * len(loader))
    return model, loader, optimizer, scheduler


def _jobs(config: SharpBalanceConfig, data: Dataset, device: torch.device,
          callbacks: CallbackFactory | None) -> list[Job]:
    """Phase-1 stages then members (SharpBalance), or one job per member (the baselines)."""
    names = [f"member-{i}" for i in range(config.members)]
    stages = [f"phase1-{name}" for name in names]
    two_phase = config.mode == "sharpbalance"
    first_step = sgd_step if config.mode == "plain" else SAMStep(config.rho, config.adaptive)

    def trained(i: int, model: torch.nn.Module, state: FitState, mask: Tensor | None) -> Trained:
        fraction = 1.0 if config.mode == "sam" else 0.0 if mask is None else float(mask.float().mean())
        record = {"index": i, "mode": config.mode, "rho": config.rho, "subset": config.subset,
                  "flat_ratio": config.flat_ratio, "epochs": config.epochs, "sam_fraction": fraction,
                  "seed": member_seed(config.seed, i)}
        return finished(model, state, data, config, device, recipe=record)

    def first(i: int, ctx: JobContext) -> Any:
        model, loader, optimizer, scheduler = _setup(config, data, i, device)
        epochs = config.initial_epochs if two_phase else config.epochs
        state = fit(model, loader, epochs=epochs, optimizer=optimizer, scheduler=scheduler, step=first_step,
                    callbacks=callbacks(names[i]) if callbacks else (), amp=config.amp, device=device,
                    resume_path=ctx.partial, resume_extra=ctx.extra)
        if not two_phase:
            return [trained(i, model, state, None)]
        scores = sharpness_scores(model, data, batch_size=config.data.batch_size, device=device)
        return {"state": train_state(state), "scores": scores}

    def second(i: int, ctx: JobContext) -> list[Trained]:
        scores = torch.stack([ctx.stage(stage)["scores"] for stage in stages])
        mask = sam_subsets(scores, config.flat_ratio, config.subset, seed=config.seed)[i]
        model, loader, optimizer, scheduler = _setup(config, data, i, device)
        step = MixedSAMStep(config.rho, mask.to(device), loader, adaptive=config.adaptive)
        # phase 2 continues phase 1's run (same schedule, optimizer state and counts)
        state = fit(model, loader, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler, step=step,
                    callbacks=callbacks(names[i]) if callbacks else (), amp=config.amp, device=device,
                    resume_path=ctx.partial, resume_extra=ctx.extra, start=ctx.stage(stages[i])["state"])
        return [trained(i, model, state, mask)]  # its counts cover both phases

    def bind(fn: Callable[[int, JobContext], Any], i: int) -> Callable[[JobContext], Any]:
        return lambda ctx: fn(i, ctx)

    if not two_phase:
        return [Job(names[i], bind(first, i)) for i in range(config.members)]
    return ([Job(stages[i], bind(first, i), stage=True) for i in range(config.members)]
            + [Job(names[i], bind(second, i), after=tuple(stages)) for i in range(config.members)])


def train_sharpbalance(
    config: SharpBalanceConfig,
    out: str | os.PathLike,
    *,
    data: Dataset | None = None,
    force: bool = False,
    callbacks: CallbackFactory | None = None,
    on_member: Callable[[Mapping[str, Any], bool], None] | None = None,
    ranks: Ranks | None = None,
) -> EnsembleDir:
    """Train ``config.members`` members into the ensemble directory ``out`` (see module doc).

    Under ``torchrun`` each rank trains its share of members in both phases; the ranks meet
    once, between the phases, when every member's phase-1 stage is on disk.
    """
    ranks = ranks or init_ranks()
    device = resolve_device(ranks.device(config.device))
    data = data or load_data(config)
    spec = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        **config.model_kwargs).pat_spec
    return produce(out, producer=PRODUCER, config=config, arch=spec, data=data, force=force, ranks=ranks,
                   jobs=lambda: _jobs(config, data, device, callbacks), on_member=on_member)


def sharpbalance_members(config: SharpBalanceConfig, *, data: Dataset | None = None,
                         callbacks: CallbackFactory | None = None) -> list[torch.nn.Module]:
    """Train the members in this process and return them (the Python API; nothing is written).

    The members are those :func:`train_sharpbalance` writes, seed for seed; each carries its
    :class:`pat.records.Member` record as ``pat_member``.
    """
    data = data if data is not None else load_data(config)
    check(isinstance(data, Dataset), f"data: SharpBalance scores every training sample by its index, which "
          f"batches do not give; load the data as a pat Dataset. Got {type(data).__name__}.")
    trained = run_in_memory(_jobs(config, data, resolve_device(config.device), callbacks))
    return as_members(trained, PRODUCER)
