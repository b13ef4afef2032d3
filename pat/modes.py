"""Train/eval flags: work in eval mode and leave every module's flag as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["restored_modes", "eval_mode"]


@contextmanager
def restored_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's train/eval flag on exit (whatever the block set)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode; every flag is restored on exit."""
    with restored_modes(model):
        model.eval()
        yield model
