"""Train a parent network: the first stage of Prune and Tune, and the plain "train a model" API."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pat.config import TrainConfig, to_dict
from pat.data import Dataset, load_dataset
from pat.engine.batchnorm import recalibrated_metrics, settle_statistics
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import save_model
from pat.engine.cost import example_input, fit_cost
from pat.engine.distributed import Ranks, RankShard, data_parallel, init_ranks
from pat.engine.guard import CollapseGuard
from pat.engine.loop import final_metrics, fit, resolve_device
from pat.engine.optim import recipe
from pat.models import create_model

__all__ = ["TrainResult", "train_parent", "resume_path_for"]


@dataclass
class TrainResult:
    """A trained parent with its per-epoch history, final metrics and training cost."""

    model: nn.Module
    history: list[dict[str, float]]
    metrics: dict[str, float] = field(default_factory=dict)  # final val/test loss and accuracy
    cost: dict[str, Any] = field(default_factory=dict)  # pat.engine.cost.training_cost record
    restored: dict[str, Any] | None = None  # the earlier epoch handed back after a collapse (CollapseGuard)


def resume_path_for(out: str | os.PathLike) -> Path:
    """Where an interrupted run keeps its state: ``parent.pt`` → ``parent.pt.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def train_parent(
    config: TrainConfig,
    *,
    data: Dataset | None = None,
    callbacks: Iterable[Callback] = (),
    out: str | os.PathLike | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with the configured recipe.

    With ``out``, training resumes from ``<out>.partial`` if an earlier run was interrupted,
    the finished model is saved to ``out`` (with its config and metrics) and the partial state
    is removed.

    Under ``torchrun`` (``ranks``, default read from its environment) the model trains with
    ``DistributedDataParallel``: each rank takes its rows of every global batch of
    ``config.data.batch_size`` and the gradients are combined into the single-process one for
    that batch (:mod:`pat.engine.distributed`). BatchNorm statistics are each rank's own, as
    with DDP by default. Rank 0 writes ``<out>.partial`` and ``out``; an elastic restart
    (``torchrun --max-restarts``) resumes every rank from the last finished epoch.

    With a validation split, a run whose last epoch has collapsed (validation loss not finite,
    or accuracy back more than halfway to chance from its best) ends with its best validation
    epoch instead (:class:`pat.engine.guard.CollapseGuard`); ``result.restored`` and the
    checkpoint's ``restored`` say which. Any other run ends at its last epoch, as trained.

    A model with BatchNorm then has its statistics recomputed by one forward pass over the
    unaugmented training split (``config.recompute_bn``, charged in ``result.cost`` as
    ``bn_samples``): its running averages mix augmented batches and weights that were still
    moving, and eval mode would score weights it no longer has (decision 73).
    """
    ranks = ranks if ranks is not None else init_ranks()
    device = resolve_device(ranks.device(config.device))
    data = data or load_dataset(config.data.dataset, data_dir=config.data.data_dir,
                                val_fraction=config.data.val_fraction, seed=config.data.seed)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                         pretrained=config.pretrained, **config.model_kwargs).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    train = data.loader("train", batch_size=config.data.batch_size, device=device, seed=config.data.seed)
    evals = {"val": data.loader("val", batch_size=512, device=device)} if len(data.val.y) else {}
    optimizer, scheduler = recipe(model, config, lr=config.lr, schedule=config.schedule,
                                  total_steps=config.epochs * len(train))
    resume = resume_path_for(out) if out is not None else None
    net: nn.Module = model
    guard = None
    if evals:  # a BatchNorm model that looks collapsed is judged again with fresh statistics
        plain = data.loader("train", batch_size=config.data.batch_size, device=device, augment=False, shuffle=False)
        guard = CollapseGuard(data.num_classes, recheck=recalibrated_metrics(plain, evals["val"]))
    if ranks.distributed:
        train = RankShard(train, ranks)
        net = data_parallel(model, train, device)
    state = fit(net, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                eval_data=evals, callbacks=[*callbacks, guard], amp=config.amp, device=device,
                resume_path=resume, resume_extra={"config": to_dict(config)})
    # every rank alike: the whole split, in order
    bn_samples = settle_statistics(model, data, device) if config.recompute_bn else 0
    metrics = final_metrics(model, data, device=device, amp=config.amp)
    extra = {"ranks": ranks.world_size} if ranks.distributed else {}
    cost = fit_cost(state, example_input(data, device), model=model, bn_samples=bn_samples, **extra)
    restored = guard.restored if guard is not None else None
    if out is not None and ranks.is_main:
        save_model(out, model, kind="model", config=to_dict(config), metrics=metrics,
                   history=state.history, dataset=data.name, num_classes=data.num_classes, cost=cost,
                   image_shape=[data.in_channels, data.image_size, data.image_size],
                   **({"restored": restored} if restored else {}))
        resume.unlink(missing_ok=True)
    ranks.barrier()  # the checkpoint is there for every rank's next stage
    return TrainResult(model=model, history=state.history, metrics=metrics, cost=cost, restored=restored)
