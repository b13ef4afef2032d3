"""Mask enforcement during training: the callback that keeps a child's masked weights at zero.

The masks and the arithmetic of enforcing them are data and pure functions in
:mod:`pat.masks.apply`; this is the training-loop hook that runs them after every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pat.engine.callbacks import Callback, FitState
from pat.masks.apply import MaskPlan
from pat.records import masks_of

__all__ = ["MaskEnforcer"]


class MaskEnforcer(Callback):
    """Keep a child's masked entries at zero through training.

    After every optimizer step (and once at the start) it zeroes the masked weights and
    their optimizer state. ``masks`` defaults to the masks of the model's
    :class:`pat.records.Child` record (set by :func:`pat.split`).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self.masks = masks
        self._plan: MaskPlan | None = None
        self._key: tuple[int, torch.device | None] | None = None

    def _plan_for(self, model: nn.Module) -> MaskPlan | None:
        masks = self.masks if self.masks is not None else masks_of(model)
        if not masks:
            return None
        # Rebuild when the model (or the device it lives on) changed since the last step.
        key = (id(model), next((p.device for p in model.parameters()), None))
        if self._plan is None or key != self._key:
            self._plan, self._key = MaskPlan(model, masks), key
        return self._plan

    @torch.no_grad()
    def enforce(self, model: nn.Module, optimizer: Any = None) -> None:
        """Zero ``model``'s masked weights, and their state in ``optimizer`` if given."""
        plan = self._plan_for(model)
        if plan is not None:
            plan.run(optimizer)

    def on_fit_start(self, state: FitState) -> None:
        """Enforce the masks before the first step."""
        self.enforce(state.model, state.optimizer)

    def on_step_end(self, state: FitState) -> None:
        """Enforce the masks again: the step just moved the masked weights."""
        self.enforce(state.model, state.optimizer)
