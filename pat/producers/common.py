"""What every member producer shares: the output directory, its ledger, data and loaders.

A producer turns a config into :class:`pat.jobs.Job` s (one per member, plus stages where
members depend on each other) and runs them with :func:`pat.jobs.run_jobs`. Each finished
member is saved atomically as ``<out>/<name>.pt`` (``kind="member"``, with its manifest
record and the producer's config), so a member file that exists and carries the same
config is finished (:class:`MemberLedger`): a rerun skips it, under ``torchrun`` as well.
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

from pat.config import plain_config
from pat.data import Dataset, DeviceLoader, IndexedBatches, load_dataset
from pat.engine.batchnorm import settle_statistics
from pat.engine.callbacks import Callback, FitState
from pat.engine.checkpoint import load_checkpoint, save_model
from pat.engine.cost import example_input, fit_cost
from pat.engine.distributed import Ranks
from pat.engine.loop import final_metrics
from pat.errors import PatError
from pat.jobs import Job, Ledger, Trained, run_jobs, work_dir
from pat.lock import acquire, release
from pat.records import Member
from pat.store import MANIFEST, EnsembleDir

__all__ = [
    "CallbackFactory",
    "load_data",
    "indexed_loader",
    "open_ensemble",
    "produce",
    "finished",
    "MemberLedger",
    "member_file",
    "as_members",
]

# member name -> callbacks for that member's fit() (the CLI passes rich progress bars)
CallbackFactory = Callable[[str], Iterable[Callback]]
# settings that may change between a run and its resumption without changing any member
_RUNTIME_KEYS = ("device", "amp")
_LOCATION_KEYS = ("data_dir",)  # where the data lives, not what it is: the data may move


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
    the directory's lock (:mod:`pat.lock`) here and :func:`produce` gives it back.
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
                                 data=plain_config(config.data), image_shape=image_shape)
    if ranks.is_main:  # held until produce() finishes; the CLI's lock_scope gives it back on any failure
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


def finished(model: nn.Module, state: FitState, data: Dataset, config: Any, device: torch.device,
             **fields: Any) -> Trained:
    """A member as its producer hands it over: BatchNorm statistics recomputed, metrics measured, cost counted.

    With ``config.recompute_bn`` (the default) a model with BatchNorm has its statistics
    recomputed on the unaugmented training split, as a parent's are after ``pat train`` and a
    child's after tuning: the running averages of augmented batches are not the model's
    (a pool of two ResNet-8 members on digits: ensemble TS-NLL 0.037 as trained, 0.026
    recomputed, decision 76), and members of every producer are compared with one another and
    with pat's children. The pass is charged in the member's cost. ``fields`` go to
    :class:`pat.jobs.Trained`.
    """
    bn_samples = settle_statistics(model, data, device) if config.recompute_bn else 0
    cost = fit_cost(state, example_input(data, device), model=model, bn_samples=bn_samples)
    return Trained(model, final_metrics(model, data, device=device, amp=config.amp), cost=cost,
                   history=state.history, **fields)


def member_file(ens: EnsembleDir, name: str) -> Path:
    """Member ``name``'s file: ``<out>/<name>.pt``."""
    return ens.path / f"{name}.pt"


def produce(
    out: str | os.PathLike,
    *,
    producer: str,
    config: Any,
    arch: dict[str, Any] | None,
    data: Dataset,
    jobs: Callable[[], Sequence[Job]],
    force: bool,
    ranks: Ranks,
    on_member: Callable[[Mapping[str, Any], bool], None] | None = None,
) -> EnsembleDir:
    """Run a producer's member jobs into the ensemble directory ``out`` and return it.

    Opens ``out`` (:func:`open_ensemble`), runs ``jobs()`` with a :class:`MemberLedger`
    (:func:`pat.jobs.run_jobs`: finished members kept, interrupted ones resumed, shared out
    across ranks) and gives the directory's lock back. ``jobs`` is called once ``out`` is
    open, so nothing is built for a directory that is refused.
    """
    ens = open_ensemble(out, producer=producer, config=config, arch=arch, num_classes=data.num_classes,
                        force=force, ranks=ranks,
                        image_shape=(data.in_channels, data.image_size, data.image_size))
    run_jobs(ens, jobs(), MemberLedger(ens, producer, config), ranks=ranks, on_member=on_member)
    if ranks.is_main:
        release(ens.path)
    return ens


class MemberLedger(Ledger):
    """Members a producer makes from scratch: ``<out>/<name>.pt`` files of ``kind="member"``.

    A member is finished when its file is there, names it, and was made by ``producer`` with
    the same config (device and data location aside).
    """

    def __init__(self, ens: EnsembleDir, producer: str, config: Any) -> None:
        self.ens, self.producer, self.config = ens, producer, config
        self.recipe = _recipe_of(plain_config(config))

    def signature(self) -> dict[str, Any]:
        """The producer and its config, device and data location aside."""
        return {"producer": self.producer, "config": self.recipe}

    def record(self, name: str) -> dict[str, Any] | None:
        """Member ``name``'s record if its file is there, names it and was made so."""
        path = member_file(self.ens, name)
        if not path.is_file():
            return None
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except PatError:
            return None  # unreadable: train it again
        if ckpt.get("producer") != self.producer or _recipe_of(ckpt.get("config") or {}) != self.recipe:
            return None
        if (ckpt.get("member") or {}).get("name") != name:
            return None  # another member's file copied over this one: train this one again
        return self.ens.stamp(dict(ckpt["member"]))

    def save(self, job: Job, trained: Sequence[Trained]) -> list[dict[str, Any]]:
        """Write each member's file atomically; its record goes into the file and the manifest."""
        records = []
        for name, t in zip(job.members, trained, strict=True):
            member = _member(name, self.producer, t)
            record = member.record(f"{name}.pt")
            save_model(member_file(self.ens, name), t.model, kind="member", member=record,
                       producer=self.producer, config=plain_config(self.config), metrics=member.metrics,
                       history=member.history, cost=member.cost)
            records.append(self.ens.stamp(record))
        return records


def _member(name: str, producer: str, t: Trained) -> Member:
    return Member(name=name, producer=producer, recipe=dict(t.recipe), metrics=dict(t.metrics), cost=t.cost,
                  parent=t.parent, history=list(t.history))


def as_members(trained: Mapping[str, Trained], producer: str) -> list[nn.Module]:
    """The models of an in-memory run (:func:`pat.jobs.run_in_memory`), as members.

    Each carries its :class:`pat.records.Member` record as ``pat_member``.
    """
    models = []
    for name, t in trained.items():
        t.model.pat_member = _member(name, producer, t)
        models.append(t.model)
    return models
