"""The typed records a member module carries: ``module.pat_child`` or ``module.pat_member``.

Like timm's ``model.pretrained_cfg``, what travels with a model is one dataclass rather than
loose attributes: :func:`pat.split` attaches a :class:`Child` to every child it makes,
:func:`pat.children.load_child` to every child it loads, and tuning fills in its metrics and
cost; a producer's Python API attaches a :class:`Member` to every member it returns, the same
record its directory keeps in ``ensemble.json``. A model made by :func:`pat.create_model`
carries its architecture spec as ``pat_spec``; nothing else of pat's is set on a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["Child", "Member", "child_record", "masks_of"]


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


@dataclass
class Member:
    """A member as its producer (LR pool, StarSSE, SharpBalance) made it.

    Attributes:
        name: unique within its ensemble (``member-1``, ``one-cycle-lr0.1``, ...).
        producer: ``"pool"``, ``"starsse"`` or ``"sharpbalance"``.
        recipe: what distinguishes it from the other members (policy and LR, start and peak
            LR, SAM fraction, ...) and its seed.
        metrics: its validation and test loss and accuracy when it finished.
        cost: its own training cost (:func:`pat.engine.cost.fit_cost`), with ``parent`` when
            it started from another member.
        parent: the member (or ``"pretrained"``) it started from, if any.
        history: one metrics dict per epoch (kept in its file, not in the manifest).
    """

    name: str
    producer: str
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] | None = None
    parent: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cost is not None and self.parent is not None:
            self.cost = {**self.cost, "parent": self.parent}

    def record(self, file: str) -> dict[str, Any]:
        """Its ``ensemble.json`` record, before the file's size and sha256 are stamped on it."""
        return {"name": self.name, "file": file, "producer": self.producer, "status": "trained",
                "parent": self.parent, "recipe": dict(self.recipe), "metrics": dict(self.metrics),
                "cost": self.cost}


def child_record(module: nn.Module) -> Child | None:
    """The :class:`Child` record ``module`` carries, or ``None`` for a plain model."""
    record = module.__dict__.get("pat_child")
    return record if isinstance(record, Child) else None


def masks_of(module: nn.Module) -> dict[str, Tensor] | None:
    """The masks a masked child carries; ``None`` for a physical child or a plain model."""
    record = child_record(module)
    return record.masks if record is not None and record.masks else None
