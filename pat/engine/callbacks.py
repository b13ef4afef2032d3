"""Callbacks: how :func:`pat.engine.loop.fit` reports progress and lets methods hook in.

The library never prints; the CLI turns these events into rich progress bars. Methods use
the same hooks for their own needs (mask enforcement after each optimizer step, say).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module; keep `pat --help` free of torch
    from torch import nn

__all__ = ["FitState", "Callback", "CallbackList"]


@dataclass
class FitState:
    """What a callback can see. Mutated in place by the loop."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    epochs: int
    steps_per_epoch: int
    epoch: int = 0  # 0-based index of the current epoch
    step: int = 0  # optimizer steps taken so far, over all epochs
    samples: int = 0  # training samples seen so far (each once per step it is in)
    sample_passes: int = 0  # forward/backward passes over samples (SAM: two a sample)
    seconds: float = 0.0  # wall-clock time in training epochs so far (evaluation included)
    metrics: dict[str, float] = field(default_factory=dict)  # last finished epoch's metrics
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per finished epoch
    stop: bool = False  # a callback may set this to end training after the current epoch

    @property
    def total_steps(self) -> int:
        """Optimizer steps the whole fit takes: epochs x steps per epoch."""
        return self.epochs * self.steps_per_epoch


class Callback:
    """Override the hooks you need; all default to doing nothing."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch to run (a resumed fit passes its restored state)."""

    def on_epoch_start(self, state: FitState) -> None:
        """Before the epoch's first batch."""

    def on_step_end(self, state: FitState) -> None:
        """After ``optimizer.step()`` (and a per-step scheduler step)."""

    def on_epoch_end(self, state: FitState) -> None:
        """After the epoch's evaluation; ``state.metrics`` holds its results."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last epoch, or the one a callback stopped at."""

    def state_dict(self) -> dict[str, Any] | None:
        """What the callback must remember across a resumed fit (tensors and plain data), or None.

        ``fit`` stores it in the resume state it writes after each epoch, *before* that epoch's
        ``on_epoch_end``; a resumed fit hands it back through :meth:`load_state_dict` before
        ``on_fit_start``, where ``state.history[-1]`` is the epoch the state was written at.
        """
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned in the interrupted fit."""


class CallbackList(Callback):
    """Fan one event out to several callbacks, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_fit_start(self, state: FitState) -> None:
        """Pass the fit's start to each callback."""
        for c in self.callbacks:
            c.on_fit_start(state)

    def on_epoch_start(self, state: FitState) -> None:
        """Pass an epoch's start to each callback."""
        for c in self.callbacks:
            c.on_epoch_start(state)

    def on_step_end(self, state: FitState) -> None:
        """Pass a step's end to each callback."""
        for c in self.callbacks:
            c.on_step_end(state)

    def on_epoch_end(self, state: FitState) -> None:
        """Pass an epoch's end to each callback."""
        for c in self.callbacks:
            c.on_epoch_end(state)

    def on_fit_end(self, state: FitState) -> None:
        """Pass the fit's end to each callback."""
        for c in self.callbacks:
            c.on_fit_end(state)

    def _keys(self) -> list[str]:
        """One name per callback: its class, numbered from the second of a class on."""
        seen: dict[str, int] = {}
        keys = []
        for c in self.callbacks:
            name = type(c).__name__
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return keys

    def state_dict(self) -> dict[str, Any] | None:
        """Each callback's state under its name; None when no callback keeps any."""
        states = {k: s for k, c in zip(self._keys(), self.callbacks, strict=True)
                  if (s := c.state_dict()) is not None}
        return states or None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hand each callback the state saved under its name (callbacks without one get nothing)."""
        for key, c in zip(self._keys(), self.callbacks, strict=True):
            if key in state:
                c.load_state_dict(state[key])
