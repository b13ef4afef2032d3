"""Optimizers by name, with the Prune-and-Tune parent recipe as the SGD default."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pat.errors import PatError, check

__all__ = ["OPTIMIZERS", "create_optimizer"]

OPTIMIZERS = ("sgd", "adam")


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
    if isinstance(params, nn.Module):
        params = params.parameters()
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise PatError(f"optimizer {name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}.")
