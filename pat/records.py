"""The typed record a child module carries: one attribute, ``module.pat_child``.

Like timm's ``model.pretrained_cfg``, what travels with a model is one dataclass rather than
loose attributes: :func:`pat.split` attaches a :class:`Child` to every child it makes,
:func:`pat.children.load_child` to every child it loads, and tuning fills in its metrics and
cost. A model made by :func:`pat.create_model` carries its architecture spec as ``pat_spec``;
nothing else of pat's is set on a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["Child", "child_record", "masks_of"]


@dataclass
class Child:
    """How a child was cut from its parent and, once tuned, how it did.

    Attributes:
        recipe: the split that made it: ``method``, ``sparsity``, ``level``, ``scope``,
            ``seed``, ``index``, ``physical``, ``children`` (plus ``input_shape`` when physical).
        masks: ``{parameter name: bool tensor}`` (True = keep), on the parameters' device;
            empty for a physical child, whose pruned channels are gone.
        kept: a physical child's ``{root layer: [kept output channels]}``; ``None`` if masked.
        metrics: after tuning, its validation and test loss and accuracy.
        cost: after tuning, its training cost (:func:`pat.engine.cost.fit_cost`).
    """

    recipe: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    kept: dict[str, list[int]] | None = None
    metrics: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None


def child_record(module: nn.Module) -> Child | None:
    """The :class:`Child` record ``module`` carries, or ``None`` for a plain model."""
    record = module.__dict__.get("pat_child")
    return record if isinstance(record, Child) else None


def masks_of(module: nn.Module) -> dict[str, Tensor] | None:
    """The masks a masked child carries; ``None`` for a physical child or a plain model."""
    record = child_record(module)
    return record.masks if record is not None and record.masks else None
