"""What every member producer shares: the output directory, resume, sharding, final metrics.

A producer turns a config into named *jobs* (one member each). An unfinished member's training
state lives in ``<out>/.work/`` (see :func:`partial_file`); each finished member is saved
atomically as ``<out>/<name>.pt`` (``kind="member"``, with its manifest record and the
producer's config), so a member file that exists and carries the same config is finished:
a rerun skips it, under ``torchrun`` as well, where each rank trains its share
(:meth:`pat.engine.distributed.Ranks.shard`) and rank 0 alone writes ``ensemble.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pat.config import to_dict
from pat.data import Dataset, DeviceLoader, IndexedBatches, load_dataset
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint, save_model
from pat.engine.distributed import Ranks
from pat.errors import PatError
from pat.lock import acquire, release
from pat.store import MANIFEST, EnsembleDir

__all__ = [
    "CallbackFactory",
    "plain_config",
    "load_data",
    "indexed_loader",
    "open_ensemble",
    "finished_record",
    "save_member",
    "write_manifest",
    "member_file",
    "work_dir",
    "partial_file",
    "gather_records",
    "finalize",
]

# member name -> callbacks for that member's fit() (the CLI passes rich progress bars)
CallbackFactory = Callable[[str], Iterable[Callback]]
# settings that may change between a run and its resumption without changing any member
_RUNTIME_KEYS = ("device", "amp")
_LOCATION_KEYS = ("data_dir",)  # where the data lives, not what it is: the data may move


def plain_config(config: Any) -> dict[str, Any]:
    """The config as JSON would read it back (tuples become lists), for equality checks."""
    return json.loads(json.dumps(to_dict(config)))


def _recipe_of(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in _RUNTIME_KEYS}
    if isinstance(out.get("data"), Mapping):
        out["data"] = {k: v for k, v in out["data"].items() if k not in _LOCATION_KEYS}
    return out


def load_data(config: Any) -> Dataset:
    """The dataset named by ``config.data`` (a :class:`pat.config.DataConfig`)."""
    d = config.data
    return load_dataset(d.dataset, data_dir=d.data_dir, val_fraction=d.val_fraction, seed=d.seed)


def indexed_loader(data: Dataset, *, batch_size: int, device: torch.device | str, seed: int,
                   indices: torch.Tensor | None = None) -> IndexedBatches:
    """The shuffled, augmented training loader, whose batches also report their sample indices.

    The labels handed to the loader are ``y + C · index``; :class:`IndexedBatches` decodes them
    into plain labels and keeps the indices of the current batch (for the mixed SAM step).
    """
    split, c = data.train, data.num_classes
    code = split.y.long() + c * torch.arange(len(split.y))
    loader = DeviceLoader(
        split.x, code, mean=data.mean, std=data.std, batch_size=batch_size, shuffle=True,
        augment=True, crop_padding=data.crop_padding, flip=data.flip, device=device, seed=seed,
        indices=indices,
    )  # fmt: skip
    return IndexedBatches(loader, c)


def open_ensemble(
    out: str | os.PathLike,
    *,
    producer: str,
    config: Any,
    arch: dict[str, Any] | None,
    num_classes: int,
    force: bool,
    ranks: Ranks,
    extra: Mapping[str, Any] | None = None,
    image_shape: Sequence[int] | None = None,
) -> EnsembleDir:
    """Open ``out`` for ``producer``: resume it, or start it (rank 0 writes the manifest).

    An existing ensemble made by the same producer with the same config (device aside) is
    resumed; any other existing ensemble is refused unless ``force``, which deletes the old
    member files first so that none of them is mistaken for a finished member. Rank 0 takes
    the directory's lock (:mod:`pat.lock`) here and :func:`finalize` gives it back.
    """
    out, cfg = Path(out), plain_config(config)
    manifest = out / MANIFEST
    resume = False
    if manifest.is_file() and not force:
        try:
            old = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        same = old.get("config", {}).get("producer") == producer and _recipe_of(
            old.get("config", {}).get(producer, {})) == _recipe_of(cfg)
        if not same:
            raise PatError(
                f"--out {str(out)!r} already holds an ensemble made with other settings; pass "
                "--force to replace it, or rerun with the same settings to resume it."
            )
        resume = True
    if resume:
        ens = EnsembleDir(out, json.loads(manifest.read_text()))
        # a member file that is there must be the one recorded; a missing one is trained again
        ens.validate(argument="--out", allow_missing=True)
    else:
        ens = EnsembleDir.create(out, arch=arch, num_classes=num_classes, force=True,
                                 config={"producer": producer, producer: cfg, **(extra or {})},
                                 data=to_dict(config.data), image_shape=image_shape)
    if ranks.is_main:  # held until finalize(); the CLI's lock_scope gives it back on any failure
        acquire(out, argument="--out", create=True)
    if not resume:
        if ranks.is_main:
            if manifest.is_file():
                _remove_members(EnsembleDir(out, json.loads(manifest.read_text())))
            shutil.rmtree(work_dir(ens), ignore_errors=True)  # partial states of the old run
            ens.save()
    ranks.barrier()
    return ens


def _remove_members(old: EnsembleDir) -> None:
    """Delete the member files an old manifest names, but never a file outside the directory."""
    for member in old.manifest.get("members", []):
        if isinstance(member, dict) and isinstance(member.get("file"), str):
            try:
                old.member_path(member).unlink(missing_ok=True)
            except (PatError, KeyError):
                continue


def member_file(ens: EnsembleDir, name: str) -> Path:
    return ens.path / f"{name}.pt"


def work_dir(ens: EnsembleDir) -> Path:
    """``<out>/.work``: resume states of unfinished members; removed when a run starts afresh."""
    return ens.path / ".work"


def partial_file(ens: EnsembleDir, name: str) -> Path:
    """Where member ``name``'s training state lives until the member is finished."""
    return work_dir(ens) / f"{name}.partial.pt"


def finished_record(ens: EnsembleDir, name: str, producer: str, config: Any) -> dict[str, Any] | None:
    """The manifest record of member ``name`` if its file is there and made with ``config``."""
    path = member_file(ens, name)
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path)
    except PatError:
        return None  # unreadable: train it again
    if ckpt.get("producer") != producer or _recipe_of(ckpt.get("config") or {}) != _recipe_of(plain_config(config)):
        return None
    if (ckpt.get("member") or {}).get("name") != name:
        return None  # another member's file copied over this one: train this one again
    return ens.stamp(dict(ckpt["member"]))


def save_member(
    ens: EnsembleDir,
    model: nn.Module,
    *,
    name: str,
    producer: str,
    config: Any,
    recipe: Mapping[str, Any],
    metrics: Mapping[str, float],
    history: Sequence[Mapping[str, float]] = (),
    parent: str | None = None,
    cost: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<out>/<name>.pt`` atomically and return its manifest record.

    ``cost`` is the member's :func:`pat.engine.cost.training_cost` record (``"parent"`` is
    added when the member started from another); it goes into the record and the file.
    """
    cost = None if cost is None else {**cost, **({"parent": parent} if parent is not None else {})}
    record = {"name": name, "file": f"{name}.pt", "producer": producer, "status": "trained",
              "parent": parent, "recipe": dict(recipe), "metrics": dict(metrics), "cost": cost}
    save_model(member_file(ens, name), model, kind="member", member=record, producer=producer,
               config=plain_config(config), metrics=dict(metrics), history=list(history), cost=cost)
    return ens.stamp(record)


def write_manifest(ens: EnsembleDir, records: Iterable[dict[str, Any] | None]) -> None:
    """Set the member list (in job order, unfinished ones left out) and save the manifest."""
    ens.manifest["members"] = [r for r in records if r is not None]
    ens.save()


def finalize(ens: EnsembleDir, names: Sequence[str], producer: str, config: Any, ranks: Ranks) -> None:
    """After every rank's share: rank 0 writes the manifest and, if all are done, drops ``.work``."""
    final = gather_records(ens, names, producer, config, ranks)
    if ranks.is_main:
        write_manifest(ens, final)
        if all(r is not None for r in final):
            shutil.rmtree(work_dir(ens), ignore_errors=True)  # resume states are spent
        release(ens.path)  # taken by open_ensemble


def gather_records(ens: EnsembleDir, names: Sequence[str], producer: str, config: Any,
                   ranks: Ranks) -> list[dict[str, Any] | None]:
    """After every rank's share is done: records of all finished members, in job order."""
    ranks.barrier()
    return [finished_record(ens, name, producer, config) for name in names]
