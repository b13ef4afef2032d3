"""Per-batch update rules. A method differs from another by its step rule, not its loop.

A step rule is called as ``rule(model, x, y, optimizer, loss_fn, autocast)`` and returns the
batch's ``(loss, logits)``, both detached. It runs forward, backward and ``optimizer.step()``;
the loop does everything else (scheduler, callbacks, metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from torch import Tensor, nn
from torch.optim import Optimizer

from pat.registry import STEPS

__all__ = ["StepRule", "sgd_step", "register_step", "create_step", "list_steps"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class StepRule(Protocol):
    """What a step rule is: a callable that trains ``model`` on one batch (see the module doc)."""

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        optimizer: Optimizer,
        loss_fn: LossFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> tuple[Tensor, Tensor]:
        """Run forward, backward and ``optimizer.step()`` on one batch.

        Args:
            model: the network trained.
            x: (B, ...) inputs.
            y: (B,) labels.
            optimizer: stepped once (or as the rule says).
            loss_fn: a mean loss of ``(logits, labels)``.
            autocast: returns the context the forward passes run in (bf16 autocast or none).

        Returns:
            The batch's loss and (B, C) logits, both detached.
        """
        ...


def register_step(name: str) -> Callable[[Callable[..., StepRule]], Callable[..., StepRule]]:
    """Register a factory ``factory(**options) -> StepRule`` under ``name``."""
    return STEPS.register(name)


def list_steps() -> list[str]:
    """The names :func:`create_step` accepts."""
    return STEPS.names()


def create_step(name: str, **options: object) -> StepRule:
    """The step rule ``name``, built with ``options`` (e.g. ``create_step("sam", rho=0.05)``)."""
    return STEPS.get(name)(**options)


def sgd_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: Optimizer,
    loss_fn: LossFn,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[Tensor, Tensor]:
    """One plain first-order step (works for any torch optimizer, not only SGD)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        logits = model(x)
        loss = loss_fn(logits, y)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@register_step("sgd")
def _plain() -> StepRule:
    return sgd_step
