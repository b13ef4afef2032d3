"""Tune pruned children briefly: the second half of Prune and Tune.

Each child gets a fresh optimizer and (by default) a per-batch cosine one-cycle schedule,
optionally on its own bagged subset of the training split; its mask is enforced after every
optimizer step. Children are independent jobs: an ensemble directory is tuned child by child,
each saved the moment it finishes, so a rerun skips finished children, and under ``torchrun``
the children are sharded across ranks.

References:
    Whitaker & Whitley, "Prune and Tune Ensembles: Low-Cost Ensemble Learning with Sparse
    Independent Subnetworks", AAAI 2022.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pat.config import TrainConfig, TuneConfig, to_dict
from pat.data import Dataset, bagging_indices
from pat.engine.callbacks import Callback
from pat.engine.cost import example_input, fit_cost
from pat.engine.distributed import Ranks
from pat.engine.loop import final_metrics, fit, resolve_device
from pat.engine.optim import create_optimizer
from pat.engine.schedules import create_schedule
from pat.engine.steps import create_step
from pat.ensemble.soups import recalibrate_bn
from pat.ensemble.store import EnsembleDir
from pat.errors import PatError, check
from pat.masks.apply import MaskEnforcer
from pat.models import check_takes

__all__ = ["TuneConfig", "tune", "tune_child", "tune_directory", "resolve_max_lr"]


def resolve_max_lr(config: TuneConfig, parent_lr: float | None = None) -> TuneConfig:
    """``config`` with its one-cycle peak made explicit.

    An unset ``max_lr`` is ``max_lr_share`` x the LR the parent trained at (``parent_lr``; when
    it is unknown, pat's default parent LR, ``TrainConfig().lr``). A child starts from a
    converged parent: a peak at the parent's own LR throws away what it learned, and a short
    tuning has no steps to learn it again (docs/benchmarks.md, "Equal budget").
    """
    if config.max_lr is not None:
        return config
    base = parent_lr if parent_lr is not None else TrainConfig().lr
    return replace(config, max_lr=config.max_lr_share * base)


def parent_lr_of(record: dict[str, Any] | None) -> float | None:
    """The LR a pat-trained parent used, from its checkpoint (``None`` if unknown)."""
    from pat.engine.checkpoint import load_checkpoint

    path = (record or {}).get("file")
    if not path or not Path(path).is_file():
        return None
    try:
        lr = (load_checkpoint(path, mmap=True).get("config") or {}).get("lr")
    except PatError:
        return None
    return float(lr) if isinstance(lr, (int, float)) else None


def tune_child(
    child: nn.Module,
    masks: dict[str, torch.Tensor] | None,
    data: Dataset,
    config: TuneConfig,
    *,
    index: int,
    callbacks: Iterable[Callback] = (),
) -> dict[str, float]:
    """Tune one child in place; returns its validation and test metrics.

    The run's cost (:func:`pat.engine.cost.training_cost`) is left on the child as ``pat_cost``.

    ``index`` is the child's position in the ensemble: it seeds the child's bagged subset and
    shuffling, so a child tuned alone, in a rerun or on another rank sees the same batches.
    """
    config = resolve_max_lr(config)
    device = resolve_device(config.device)
    child.to(device)
    torch.manual_seed(config.seed * 100_003 + index)  # dropout etc.; distinct per child
    indices = None
    if config.bagging is not None and config.bagging < 1:
        indices = bagging_indices(len(data.train.y), config.bagging, seed=config.seed, member=index)
    train = data.loader("train", batch_size=config.data.batch_size, device=device,
                        seed=config.seed * 100_003 + index, indices=indices)
    one_cycle = config.schedule == "one-cycle"
    optimizer = create_optimizer(child, config.optimizer, lr=config.max_lr if one_cycle else config.lr,
                                 momentum=config.momentum, weight_decay=config.weight_decay)
    options: dict[str, Any] = {"max_lr": config.max_lr, "cycle_momentum": config.cycle_momentum} if one_cycle else {}
    scheduler = create_schedule(config.schedule, optimizer, config.epochs * len(train), **options)
    evals = {"val": data.loader("val", batch_size=512, device=device)} if len(data.val.y) else {}
    enforcer = [MaskEnforcer(masks)] if masks else []
    bn_samples = 0
    if config.recompute_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in child.modules()):
        # pruning shifts every layer's activation statistics: BN's running averages are the
        # parent's until recomputed (one forward pass over the child's training data)
        recalibrate_bn(child, data.loader("train", batch_size=config.data.batch_size, device=device,
                                          augment=False, shuffle=False, indices=indices))
        bn_samples = len(indices) if indices is not None else len(data.train.y)
    state = fit(child, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                step=create_step(config.step), eval_data=evals, callbacks=[*enforcer, *callbacks],
                amp=config.amp, device=device)
    child.pat_cost = fit_cost(state, example_input(data, device))
    if bn_samples:  # forward passes only: a third of a training pass each
        child.pat_cost["flops"] += child.pat_cost["forward_flops_per_sample"] * bn_samples
        child.pat_cost["bn_samples"] = bn_samples
    train_samples = len(indices) if indices is not None else len(data.train.y)
    return {"train_samples": train_samples, **final_metrics(child, data, device=device, amp=config.amp)}


def tune(
    children: Sequence[nn.Module],
    data: Dataset,
    config: TuneConfig | None = None,
    *,
    masks: Sequence[dict[str, torch.Tensor] | None] | None = None,
    callbacks: Callable[[int], Iterable[Callback]] = lambda i: (),
    parent_lr: float | None = None,
) -> list[nn.Module]:
    """Tune every child in place (Python API); returns the same modules.

    Args:
        children: models from :func:`pat.split` (each carries its mask as ``pat_masks``) or
            any models, with ``masks`` given explicitly (``None`` entries are tuned densely).
        callbacks: ``index -> callbacks`` for that child's run (progress, logging).
        parent_lr: the LR the parent trained at; an unset ``config.max_lr`` is
            ``config.max_lr_share`` times it (:func:`resolve_max_lr`).
    """
    config = resolve_max_lr(config if config is not None else TuneConfig(), parent_lr)
    masks = masks if masks is not None else [getattr(c, "pat_masks", None) for c in children]
    check(len(masks) == len(children), f"masks must have one entry per child. Got {len(masks)} for {len(children)}.")
    for i, child in enumerate(children):
        check_takes(child, data, argument=f"children[{i}]")
    for i, (child, mask) in enumerate(zip(children, masks, strict=True)):
        child.pat_metrics = tune_child(child, mask, data, config, index=i, callbacks=callbacks(i))
    return list(children)


def tune_directory(
    path: str,
    data: Dataset,
    config: TuneConfig,
    *,
    ranks: Ranks | None = None,
    callbacks: Callable[[str], Iterable[Callback]] = lambda name: (),
    on_done: Callable[[dict[str, Any]], None] = lambda record: None,
    wait: bool | None = None,
) -> EnsembleDir:
    """Tune the children in an ensemble directory that are not tuned yet.

    Each child is written (atomically) the moment it finishes and the manifest is updated, so
    an interrupted run loses at most the child in progress, which restarts from its split
    weights next time. Under torchrun each rank tunes its share and rank 0 writes the manifest.
    Rank 0 holds the directory's lock (:mod:`pat.ensemble.lock`) throughout: a second tune of
    the same directory is refused, or with ``wait`` queues behind the first.
    """
    from pat.ensemble.lock import directory_lock

    ranks = ranks if ranks is not None else Ranks()
    lock = directory_lock(path, wait=wait, argument="CHILDREN_DIR") if ranks.is_main else contextlib.nullcontext()
    with lock:
        return _tune_directory(path, data, config, ranks=ranks, callbacks=callbacks, on_done=on_done)


def _tune_directory(path: str, data: Dataset, config: TuneConfig, *, ranks: Ranks,
                    callbacks: Callable[[str], Iterable[Callback]],
                    on_done: Callable[[dict[str, Any]], None]) -> EnsembleDir:
    from pat.children import load_child, save_child

    ens = EnsembleDir.load(path)
    if ranks.is_main:
        _reconcile(ens)  # children finished by an earlier run that stopped before its manifest write
    ranks.barrier()
    ens = EnsembleDir.load(path)
    if ens.manifest.get("num_classes") not in (None, data.num_classes):
        raise PatError(f"--dataset {data.name!r} has {data.num_classes} classes but the children "
                       f"were made for {ens.manifest['num_classes']}.")
    todo = [(i, m) for i, m in enumerate(ens.members) if m["status"] == "split"]
    if todo:
        config = resolve_max_lr(config, parent_lr_of(ens.manifest.get("parent")))
    for index, record in ranks.shard(todo):
        file = ens.member_path(record)
        child = load_child(file)
        masks = getattr(child, "pat_masks", None)  # load_child has checked them against the weights
        metrics = tune_child(child, masks, data, config, index=index, callbacks=callbacks(record["name"]))
        cost = {**child.pat_cost, "parent": record.get("parent")}
        record = {**record, "status": "tuned", "metrics": metrics, "tune": to_dict(config), "cost": cost}
        save_child(file, child, status="tuned", metrics=metrics, tune=to_dict(config), cost=cost)
        if not ranks.distributed:
            ens.upsert_member(ens.stamp(record))
            ens.save()
        on_done(record)
    ranks.barrier()
    if ranks.distributed and ranks.is_main:
        _reconcile(ens)
    ranks.barrier()
    return EnsembleDir.load(path)


def _reconcile(ens: EnsembleDir) -> None:
    """Mark children whose files say they are tuned (written by other ranks) in the manifest."""
    from pat.engine.checkpoint import load_checkpoint

    changed = False
    for record in ens.members:
        if record["status"] == "split":
            ckpt = load_checkpoint(ens.member_path(record), mmap=True)
            if ckpt.get("status") == "tuned":
                ens.upsert_member(ens.stamp({**record, "status": "tuned", "metrics": ckpt.get("metrics", {}),
                                             "tune": ckpt.get("tune", {}), "cost": ckpt.get("cost")}))
                changed = True
    if changed:
        ens.save()
