"""Member models of an ensemble directory, whatever file format holds them.

A member is its own checkpoint (``kind`` ``child``, ``model`` or ``member``) or one child of
a packed file (``kind="packed"``, :func:`pat.pack.save_packed`) that several member records
share; their records say which with ``"packed": {"index": i, "of": n}``. Readers go through
here, so a packed directory evaluates, selects and calibrates exactly like the unpacked one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pat.store import EnsembleDir

__all__ = ["load_members", "member_kept"]


def load_members(ens: EnsembleDir, records: Sequence[dict[str, Any]], *,
                 device: str | torch.device = "cpu") -> list[nn.Module]:
    """The models of ``records`` (members of ``ens``), in order, on ``device``.

    A packed file is loaded once and unpacked for all the records that point at it; each of
    its children carries its kept channels and recipe (``pat_child``) as a loaded physical child does.
    """
    from pat.engine.checkpoint import load_model
    from pat.pack import load_packed, unpack

    unpacked: dict[str, list[nn.Module]] = {}
    models = []
    for record in records:
        argument = f"member {record['name']!r}"
        if "packed" not in record:
            models.append(load_model(ens.member_path(record), device=device, argument=argument)[0])
            continue
        if record["file"] not in unpacked:
            packed = load_packed(ens.member_path(record), device=device, argument=argument)
            unpacked[record["file"]] = unpack(packed, device=device)
        models.append(unpacked[record["file"]][record["packed"]["index"]])
    return models


def member_kept(ens: EnsembleDir, record: dict[str, Any]) -> dict[str, list[int]] | None:
    """The member's kept record (physical children), None for a full-width member."""
    from pat.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ens.member_path(record), mmap=True, argument=f"member {record['name']!r}")
    if "packed" in record:
        return ckpt["kept"][record["packed"]["index"]]
    return ckpt.get("kept")
