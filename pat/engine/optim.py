"""Optimizers by name, with the Prune-and-Tune parent recipe as the SGD default."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from pat.engine.schedules import create_schedule
from pat.errors import check
from pat.registry import OPTIMIZERS

__all__ = ["OPTIMIZERS", "create_optimizer", "OptimizerSettings", "recipe"]


@OPTIMIZERS.register("sgd")
def _sgd(params: Iterable[nn.Parameter], *, lr: float, momentum: float, nesterov: bool,
         weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params: Iterable[nn.Parameter], *, lr: float, momentum: float, nesterov: bool,
          weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def create_optimizer(
    params: Iterable[nn.Parameter] | nn.Module,
    name: str = "sgd",
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """SGD (Nesterov, momentum 0.9, weight decay 5e-4: the paper's recipe) or Adam.

    Adam uses ``lr`` and ``weight_decay`` as given and ignores the momentum options.
    """
    check(lr > 0, f"lr must be positive. Got {lr}.")
    check(weight_decay >= 0, f"weight_decay must be non-negative. Got {weight_decay}.")
    factory = OPTIMIZERS.get(name)
    if isinstance(params, nn.Module):
        params = params.parameters()
    return factory(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


class OptimizerSettings(Protocol):
    """What every pat config that trains says about its optimizer."""

    optimizer: str
    momentum: float
    weight_decay: float


def recipe(model: nn.Module, settings: OptimizerSettings, *, lr: float, schedule: str, total_steps: int,
           **schedule_options: Any) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """The optimizer and per-step LR schedule of one training run, from any pat config.

    The parent, the tuner and every producer build their runs here: ``settings`` (a
    :class:`pat.config.TrainConfig`, ``TuneConfig`` or a producer's config) names the optimizer,
    its momentum and weight decay; ``lr`` is the schedule's base (peak) LR and ``schedule`` a
    registered policy stepped once per optimizer step over ``total_steps``.
    """
    optimizer = create_optimizer(model, settings.optimizer, lr=lr, momentum=settings.momentum,
                                 weight_decay=settings.weight_decay)
    return optimizer, create_schedule(schedule, optimizer, total_steps, **schedule_options)
