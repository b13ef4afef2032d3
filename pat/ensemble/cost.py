"""What an ensemble directory cost: its members' recorded training costs and its parent's, summed.

The cost of one run is counted by :mod:`pat.engine.cost`; this reads the records a directory
keeps (``docs/file-formats.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pat.engine.checkpoint import load_checkpoint
from pat.engine.cost import sum_costs
from pat.errors import PatError
from pat.store import EnsembleDir

__all__ = ["directory_cost"]


def _parent_cost(ens: EnsembleDir) -> Mapping[str, Any] | None:
    parent = ens.manifest.get("parent") or None
    if not parent:
        return None
    if parent.get("cost"):
        return parent["cost"]
    file = Path(parent.get("file") or "")
    file = file if file.is_absolute() else ens.path / file
    if not file.is_file():
        return None
    try:
        return load_checkpoint(file, argument="parent", mmap=True).get("cost")
    except PatError:
        return None


def directory_cost(ens: EnsembleDir) -> dict[str, Any]:
    """Per-member, parent and total cost of an ensemble directory.

    Returns:
        ``{"members": {name: cost | None}, "parent": cost | None, "total": summed cost,
        "complete": bool}``; ``total`` sums what is known (parent included) and
        ``complete`` says whether every member (and the parent, if the directory has one)
        recorded its cost. ``total["inference_macs"]`` is the ensemble's MACs per sample.
    """
    members = {m["name"]: m.get("cost") for m in ens.members}
    parent = _parent_cost(ens)
    known = [c for c in members.values() if c]
    total = sum_costs([*known, *([parent] if parent else [])])
    total["inference_macs"] = sum((c.get("forward_flops_per_sample") or 0) // 2 for c in known)
    complete = all(members.values()) and (parent is not None or not ens.manifest.get("parent"))
    return {"members": members, "parent": parent, "total": total, "complete": bool(complete)}
