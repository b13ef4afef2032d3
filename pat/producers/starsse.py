"""StarSSE: snapshot members that all start from one fine-tuned model (and plain SSE).

Member 1 is fine-tuned from pretrained weights with a cosine schedule (``lr`` → 0). Every
further member starts **from member 1** and runs one cycle: the LR jumps to
``lr · cycle_lr_mult`` and cosine-decays to 0 over ``cycle_epochs``, with a fresh optimizer.
With ``sse=True`` member k starts from member k-1 instead: plain snapshot ensembling.
Star members are independent of one another, so under ``torchrun`` they are sharded across
ranks once member 1 exists; SSE members form a chain and run on rank 0.

All members share one architecture, so they can be combined by averaging predictions or as
a model soup (:func:`pat.ensemble.uniform_soup`, then BatchNorm recalibration).

References:
    Sadrtdinov et al., "To Stay or Not to Stay in the Pre-train Basin: Insights on
    Ensembling in Transfer Learning" (StarSSE), NeurIPS 2023.
    Huang et al., "Snapshot Ensembles: Train 1, get M for free", ICLR 2017.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pat.config import DataConfig, check_field_types
from pat.data import BatchData, Dataset, as_data
from pat.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pat.engine.distributed import Ranks, init_ranks
from pat.engine.loop import fit, resolve_device
from pat.engine.optim import recipe
from pat.errors import PatError, check
from pat.jobs import Job, JobContext, Trained, member_seed, run_in_memory
from pat.models import create_model, get_classifier
from pat.models._classifier import module_path
from pat.producers.common import (
    CallbackFactory,
    as_members,
    finished,
    load_data,
    produce,
)
from pat.registry import OPTIMIZERS
from pat.store import EnsembleDir

__all__ = ["StarSSEConfig", "load_pretrained", "train_starsse", "starsse_members"]

PRODUCER = "starsse"


@dataclass(frozen=True)
class StarSSEConfig:
    """StarSSE (or SSE) from one pretrained model. LRs are per batch of ``data.batch_size``."""

    pretrained: str = ""  # a pat checkpoint path, or tv:<torchvision name> (ImageNet weights)
    model: str | None = None  # if given, the pretrained architecture must be this one
    data: DataConfig = field(default_factory=DataConfig)
    members: int = 5  # member 1 (fine-tuned) + members - 1 cycles
    epochs: int = 10  # member 1's fine-tuning epochs
    cycle_epochs: int = 5  # epochs of each further cycle
    lr: float = 0.01  # fine-tuning LR (cosine from here to 0)
    cycle_lr_mult: float = 2.0  # each cycle starts at lr * cycle_lr_mult
    sse: bool = False  # start member k from member k-1 (SSE) instead of member 1 (StarSSE)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # a new classifier head's init; member k's data order: pat.jobs.member_seed(seed, k)
    device: str = "auto"
    amp: bool | None = None
    recompute_bn: bool = True  # BatchNorm statistics recomputed on the unaugmented training split (finished())

    def __post_init__(self) -> None:
        check_field_types(self)  # recompute_bn: true or false, epochs: an integer, ...
        check(bool(self.pretrained), "pretrained must name a checkpoint or tv:<name>. Got ''.")
        check(self.members >= 1, f"members must be >= 1. Got {self.members}.")
        check(self.epochs > 0, f"epochs must be positive. Got {self.epochs}.")
        check(self.cycle_epochs > 0, f"cycle_epochs must be positive. Got {self.cycle_epochs}.")
        check(self.lr > 0, f"lr must be positive. Got {self.lr}.")
        check(self.cycle_lr_mult > 0, f"cycle_lr_mult must be positive. Got {self.cycle_lr_mult}.")
        OPTIMIZERS.get(self.optimizer)


def _fit_head(ckpt: Mapping[str, Any], num_classes: int, where: str) -> nn.Module:
    """Rebuild the checkpoint's architecture for ``num_classes``; keep every weight but the head."""
    arch = ckpt.get("arch") or {}
    kwargs = {**arch.get("kwargs", {}), "num_classes": num_classes}
    model = create_model(arch["name"], **kwargs)  # the new head is freshly initialised
    head = module_path(model, get_classifier(model))
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(f"{head}.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise PatError(f"{where}: weights do not fit {arch['name']!r} ({str(e).splitlines()[0]}).") from None
    stray = [k for k in missing if not k.startswith(f"{head}.")] + list(unexpected)
    check(not stray, f"{where}: weights do not fit {arch['name']!r} (mismatched keys {stray[:3]}).")
    return model


def load_pretrained(config: StarSSEConfig, data: Dataset) -> nn.Module:
    """The starting model: torchvision weights or a pat checkpoint, with a head for the data.

    Raises:
        PatError: the checkpoint is unusable, its architecture is not ``config.model``, or its
            input channels differ from the dataset's.
    """
    source, where = config.pretrained, f"--pretrained {config.pretrained!r}"
    torch.manual_seed(config.seed)  # a new head's initialisation
    if source.startswith("tv:"):
        check(config.model in (None, source),
              f"--pretrained {source!r} does not match --model {config.model!r}.")
        return create_model(source, num_classes=data.num_classes, in_channels=data.in_channels,
                            pretrained=True)
    ckpt = load_checkpoint(source, argument="--pretrained")
    arch = ckpt.get("arch")
    check("state_dict" in ckpt and arch, f"{where} holds no model with an architecture spec.")
    check(config.model in (None, arch["name"]),
          f"{where} holds a {arch['name']!r} model, not --model {config.model!r}.")
    in_channels = arch.get("kwargs", {}).get("in_channels", data.in_channels)
    check(in_channels == data.in_channels,
          f"{where} takes {in_channels}-channel images but dataset {data.name!r} has {data.in_channels}.")
    if arch.get("kwargs", {}).get("num_classes") == data.num_classes:
        return model_from_checkpoint(ckpt, argument=where)
    return _fit_head(ckpt, data.num_classes, where)


def _train_one(config: StarSSEConfig, data: Dataset, model: nn.Module, k: int, origin: str, *,
               device: torch.device, callbacks: CallbackFactory | None, ctx: JobContext) -> Trained:
    """Member 1: fine-tune (cosine from lr); member k > 1: one cycle from lr * mult.

    The cost is this member's own training only (the member it started from has its own).
    """
    epochs = config.epochs if k == 1 else config.cycle_epochs
    peak = config.lr if k == 1 else config.lr * config.cycle_lr_mult
    seed = member_seed(config.seed, k)
    model.to(device)
    train = data.loader("train", batch_size=config.data.batch_size, device=device, seed=seed)
    # a fresh optimizer each cycle: momentum from the previous member must not carry over
    optimizer, scheduler = recipe(model, config, lr=peak, schedule="cosine", total_steps=epochs * len(train))
    state = fit(model, train, epochs=epochs, optimizer=optimizer, scheduler=scheduler,
                callbacks=callbacks(f"member-{k}") if callbacks else (), amp=config.amp,
                device=device, resume_path=ctx.partial, resume_extra=ctx.extra)
    return finished(model, state, data, config, device, parent=origin,
                    recipe={"index": k, "start": origin, "peak_lr": peak, "epochs": epochs,
                           "mode": "sse" if config.sse else "star", "seed": seed})


def train_starsse(
    config: StarSSEConfig,
    out: str | os.PathLike,
    *,
    data: Dataset | None = None,
    force: bool = False,
    callbacks: CallbackFactory | None = None,
    on_member: Callable[[Mapping[str, Any], bool], None] | None = None,
    ranks: Ranks | None = None,
) -> EnsembleDir:
    """Make members ``member-1`` … ``member-N`` of ``config`` in the ensemble directory ``out``.

    Each member is a job of :func:`pat.jobs.run_jobs` that reads the member it starts from:
    finished members are kept on a rerun with the same config (and serve as starting points),
    an interrupted one resumes from its last epoch, and under ``torchrun`` the star members
    are shared out once member 1 exists (an SSE chain runs one member at a time).
    """
    ranks = ranks or init_ranks()
    device = resolve_device(ranks.device(config.device))
    data = data or load_data(config)
    start = load_pretrained(config, data)  # validates before any directory is touched
    return produce(out, producer=PRODUCER, config=config, arch=start.pat_spec, data=data, force=force,
                   ranks=ranks, jobs=lambda: _jobs(config, data, start, device, callbacks), on_member=on_member)


def starsse_members(config: StarSSEConfig, *, data: Dataset | BatchData | None = None,
                    callbacks: CallbackFactory | None = None) -> list[nn.Module]:
    """Make the members in this process and return them (the Python API; nothing is written).

    The members are those :func:`train_starsse` writes, seed for seed; each carries its
    :class:`pat.records.Member` record as ``pat_member``. They share one architecture, so
    :func:`pat.uniform_soup` averages them. ``data`` may also be batches (a ``DataLoader``, or
    :class:`pat.data.BatchData` with validation and test ones).
    """
    data = as_data(data) if data is not None else load_data(config)
    start = load_pretrained(config, data)
    return as_members(run_in_memory(_jobs(config, data, start, resolve_device(config.device), callbacks)),
                      PRODUCER)


def _jobs(config: StarSSEConfig, data: Dataset, start: nn.Module, device: torch.device,
          callbacks: CallbackFactory | None) -> list[Job]:
    """Member 1 from ``start``; every later member from member 1 (or, for SSE, the one before)."""
    names = [f"member-{k}" for k in range(1, config.members + 1)]

    def job(k: int) -> Job:
        origin = "pretrained" if k == 1 else names[k - 2] if config.sse else names[0]

        def train(ctx: JobContext) -> list[Trained]:
            model = start if k == 1 else ctx.member(origin)
            return [_train_one(config, data, model, k, origin, device=device, callbacks=callbacks, ctx=ctx)]
        return Job(names[k - 1], train, after=() if k == 1 else (origin,))

    return [job(k) for k in range(1, config.members + 1)]
