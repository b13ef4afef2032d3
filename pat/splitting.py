"""A parent checkpoint split into an ensemble directory: the function behind ``pat split``.

The children are written into ``<out>/.split/`` and moved in when all are there, manifest
last, under the directory's lock; a packed split (``--pack``) writes one ``packed.pt``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from pat.config import (
    SplitConfig,
    to_dict,
)
from pat.engine.checkpoint import load_model
from pat.errors import PatError, first_line
from pat.records import child_record
from pat.store import MANIFEST, EnsembleDir

__all__ = ["split_to_directory", "split_footprint", "PACKED_FILE"]


def split_to_directory(parent_path: str | Path, out: str | Path, config: SplitConfig, *,
                       force: bool = False, wait: bool | None = None) -> EnsembleDir:
    """Split the parent checkpoint into children and write them as an ensemble directory.

    Everything is validated before anything is written: an output directory that already
    holds an ensemble is refused unless ``force``, and so is a split whose children would
    not fit on the disk or in memory (:func:`split_footprint`). Children are made and
    written one at a time under the directory's lock (``wait``: queue behind another
    writer) into ``<out>/.split/``, and moved into place only when all are written, the
    manifest last: a split that fails (a full disk) or is interrupted leaves an old ensemble
    as it was and nothing half-written; a rerun starts it again. Each member's record holds its mask recipe and seed,
    ``stats`` (kept parameters, sparsity, MACs) and its file's size and sha256.

    With ``config.pack`` the children are packed (:func:`pat.pack.pack`) before anything is
    written and saved as one ``packed.pt`` that every member record points at, with
    ``"packed": {"index": i, "of": M}``; children that cannot be packed are refused then.
    """
    from pat.children import iter_split, save_child
    from pat.engine.resources import check_fits
    from pat.lock import directory_lock
    from pat.masks.apply import count_params_macs, default_example_inputs
    from pat.masks.generate import check_recipe

    parent, ckpt = load_model(parent_path, argument="--parent")
    ens = EnsembleDir.create(out, arch=ckpt.get("arch"), num_classes=ckpt.get("num_classes"),
                             parent={"file": str(Path(parent_path).resolve()), "metrics": ckpt.get("metrics", {})},
                             config={"split": to_dict(config)}, dataset=ckpt.get("dataset"),
                             data=_parent_data(ckpt), image_shape=ckpt.get("image_shape"), force=force)
    check_recipe(config.children, config.method, config.sparsity, None, config.level, config.scope, config.seed)
    disk, memory = split_footprint(parent, config.children)
    check_fits(f"--children {config.children}", disk=disk, memory=memory, where=ens.path,
               hint="use fewer children, or write them to a larger disk")
    example = default_example_inputs(parent)
    total_params = sum(p.numel() for p in parent.parameters())
    children = iter_split(parent, config.children, method=config.method, sparsity=config.sparsity,
                          level=config.level, scope=config.scope, physical=config.physical, seed=config.seed,
                          example_inputs=example, include_first=config.include_first,
                          include_classifier=config.include_classifier, rescale=config.rescale)
    packed = None
    if config.pack:  # all children at once, packed and checked before the directory is made
        children = list(children)
        packed = _pack_children(children, example, config)
    staging = ens.path / ".split"  # children are written here, moved in once all are there
    with directory_lock(ens.path, wait=wait, argument="--out", create=True):
        shutil.rmtree(staging, ignore_errors=True)  # left behind by a killed split
        try:
            for child in children:
                recipe = child_record(child).recipe
                index = recipe["index"]
                name, file = f"child-{index}", PACKED_FILE if packed is not None else f"child-{index}.pt"
                if packed is None:
                    save_child(staging / file, child, arch=ckpt.get("arch"), status="split",
                               dataset=ckpt.get("dataset"), num_classes=ckpt.get("num_classes"))
                params, macs = count_params_macs(child, example) if example is not None else (None, None)
                record = {
                    "name": name, "file": file, "producer": "split", "status": "split",
                    "parent": str(Path(parent_path).resolve()), "recipe": dict(recipe),
                    "stats": {"kept_params": params, "total_params": total_params,
                              "sparsity": None if params is None else 1 - params / total_params, "macs": macs},
                }  # fmt: skip
                if packed is not None:
                    record["packed"] = {"index": index, "of": packed.members}
                ens.upsert_member(record if packed is not None else ens.stamp(record, file=staging / file))
                del child
            if packed is not None:
                _save_packed(staging / PACKED_FILE, packed, ens, ckpt)
            # Until here an old ensemble (--force) is untouched. No manifest while files move:
            # an interrupted move leaves a directory that no command takes for an ensemble.
            (ens.path / MANIFEST).unlink(missing_ok=True)
            for file in dict.fromkeys(record["file"] for record in ens.members):
                os.replace(staging / file, ens.path / file)
            ens.save()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ens


PACKED_FILE = "packed.pt"  # the one file of a packed split (docs/file-formats.md)


def _pack_children(children: list[nn.Module], example: Any, config: SplitConfig) -> Any:
    """The children packed into one network, or a one-line refusal naming --pack (nothing written yet)."""
    from pat.pack import pack

    try:
        return pack(children, example_inputs=example)
    except PatError as e:
        reason = first_line(e).removeprefix("pack: ")
        raise PatError(f"--pack with --children {config.children}: {reason}") from None


def _save_packed(file: Path, packed: Any, ens: EnsembleDir, ckpt: dict[str, Any]) -> None:
    """Write the packed file of the children recorded in ``ens`` and stamp every record with it."""
    from pat.pack import save_packed

    save_packed(file, packed, [r["name"] for r in ens.members], arch=ckpt.get("arch"),
                recipes=[r["recipe"] for r in ens.members], status="split",
                dataset=ckpt.get("dataset"), num_classes=ckpt.get("num_classes"))
    for record in list(ens.members):
        ens.upsert_member(ens.stamp(record, file=file))


def split_footprint(parent: nn.Module, children: int) -> tuple[int, int]:
    """Upper bounds of what splitting ``parent`` into ``children`` needs: ``(disk, memory)`` bytes.

    Disk: one checkpoint per child (the parent's tensors, masked entries stored as zeros, plus
    a one-byte mask entry per parameter). Memory: every child's masks at once (they are drawn
    together) plus the parent, the one child being written and the scores of one draw.
    """
    tensors = [*parent.parameters(), *parent.buffers()]
    state = sum(t.numel() * t.element_size() for t in tensors)
    mask = sum(p.numel() for p in parent.parameters())  # bool masks: one byte an entry
    return children * (state + mask + 64 * 1024), children * mask + 4 * state + 8 * mask
def _parent_data(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The data a parent checkpoint was trained on (its config's ``data``), for the children's manifest.

    None for a checkpoint that names no dataset (a pretrained model saved by hand): the
    children then record nothing and their commands need ``--dataset``.
    """
    if ckpt.get("dataset") is None:
        return None
    data = (ckpt.get("config") or {}).get("data") or {}
    if str(data.get("dataset", ckpt["dataset"])).lower() != str(ckpt["dataset"]).lower():
        data = {}  # a config that is not the one the weights came from: trust only the name
    return {"dataset": ckpt["dataset"], **{k: data.get(k) for k in ("data_dir", "val_fraction", "seed")}}
