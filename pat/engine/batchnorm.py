"""BatchNorm statistics recomputed on data: for a pruned child before tuning, and for a soup.

A pruned or averaged network's running statistics no longer describe its activations;
one pass over training data refreshes them (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.optim.swa_utils import update_bn

__all__ = ["recalibrate_bn"]


def recalibrate_bn(model: nn.Module, loader: Iterable[Any]) -> nn.Module:
    """Recompute BatchNorm running statistics with one pass over ``loader`` (in place).

    ``loader`` yields ``x`` or ``(x, y, ...)`` batches already on the model's device
    (``update_bn`` takes the first element of a tuple). A model without BatchNorm is left
    unchanged. Returns ``model``.
    """
    update_bn(loader, model)
    return model
