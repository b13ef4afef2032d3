"""One child's tuning: a fresh optimizer and one-cycle schedule, its mask enforced.

Each child gets a fresh optimizer and (by default) a per-batch cosine one-cycle schedule,
optionally on its own bagged subset of the training split; its mask is enforced after every
optimizer step. :func:`tune` is the Python API over a list of children.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pat.config import TrainConfig, TuneConfig
from pat.data import BatchData, Dataset, as_data, bagging_indices
from pat.engine.batchnorm import has_batchnorm, recalibrate_bn, recalibrated_metrics
from pat.engine.callbacks import Callback
from pat.engine.cost import example_input, fit_cost
from pat.engine.guard import CollapseGuard
from pat.engine.loop import epoch_metrics, evaluate, final_metrics, fit, resolve_device
from pat.engine.masking import MaskEnforcer
from pat.engine.optim import recipe
from pat.engine.steps import create_step
from pat.errors import PatError, check
from pat.jobs import member_seed
from pat.models import check_takes
from pat.records import Child, child_record, masks_of

__all__ = ["tune", "tune_child", "resolve_max_lr", "parent_lr_of"]


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


def prepare(data: Dataset, config: TuneConfig, index: int,
            device: torch.device) -> tuple[Any, int, torch.Tensor | None]:
    """Child ``index``'s training loader, its sample count and its bagged indices (None: all).

    The loader's bagged subset and shuffling are seeded by ``(seed, index)``: a child tuned
    alone, together with others, in a rerun or on another rank sees the same batches.
    """
    indices = None
    if config.bagging is not None and config.bagging < 1:
        indices = bagging_indices(len(data.train), config.bagging, seed=config.seed, member=index)
    train = data.loader("train", batch_size=config.data.batch_size, device=device,
                        seed=member_seed(config.seed, index), indices=indices)
    samples = len(indices) if indices is not None else len(data.train)
    return train, samples, indices


def settle_batchnorm(child: nn.Module, data: Dataset, config: TuneConfig, indices: torch.Tensor | None,
                     device: torch.device) -> int:
    """Recompute a tuned child's BatchNorm statistics on its own data; the samples it took.

    Training normalizes with each batch's statistics; the running averages eval mode uses
    are a momentum mix over the run, and a brief tuning leaves them describing weights the
    child no longer has (ResNet-8 on digits, one epoch of 11 steps: 10–50 % validation
    accuracy, 69–78 % once recomputed). One forward pass over the child's (bagged,
    unaugmented) training data replaces them. Nothing with ``config.recompute_bn`` off or
    without BatchNorm (0 samples).
    """
    if not (config.recompute_bn and has_batchnorm(child)):
        return 0
    recalibrate_bn(child, data.loader("train", batch_size=config.data.batch_size, device=device,
                                      augment=False, shuffle=False, indices=indices))
    return len(indices) if indices is not None else len(data.train)


def optimization(model: nn.Module, config: TuneConfig, steps: int) -> tuple[Any, Any]:
    """The optimizer and the per-batch schedule of a tuning run of ``steps`` steps."""
    one_cycle = config.schedule == "one-cycle"
    options: dict[str, Any] = {"max_lr": config.max_lr, "cycle_momentum": config.cycle_momentum} if one_cycle else {}
    return recipe(model, config, lr=config.max_lr if one_cycle else config.lr, schedule=config.schedule,
                  total_steps=steps, **options)


def tuning_cost(child: nn.Module, state: Any, data: Dataset, device: torch.device, bn_samples: int,
                **extra: Any) -> dict[str, Any]:
    """A child's tuning cost: the run's, plus the forward passes that recomputed its BatchNorm."""
    return fit_cost(state, example_input(data, device), model=child, bn_samples=bn_samples, **extra)


def tune_child(
    child: nn.Module,
    masks: dict[str, torch.Tensor] | None,
    data: Dataset,
    config: TuneConfig,
    *,
    index: int,
    callbacks: Iterable[Callback] = (),
    resume_path: str | Path | None = None,
    resume_extra: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Tune one child in place; returns its validation and test metrics.

    With a validation split a :class:`pat.engine.guard.CollapseGuard` watches the run: a child
    whose last epoch collapsed (to chance, say, when its peak LR is too high for it) is handed
    back its lowest-validation-loss epoch, and ``metrics["restored"]`` says which.

    The metrics and the run's cost (:func:`pat.engine.cost.fit_cost`) are also left in the
    child's :class:`pat.records.Child` record (one is attached to a plain model).

    ``index`` is the child's position in the ensemble: it seeds the child's bagged subset and
    shuffling, so a child tuned alone, in a rerun or on another rank sees the same batches.
    ``resume_path`` / ``resume_extra`` are ``fit``'s: the run's state after every epoch.
    """
    config = resolve_max_lr(config)
    device = resolve_device(config.device)
    child.to(device)
    torch.manual_seed(member_seed(config.seed, index))  # dropout etc.; distinct per child
    train, samples, indices = prepare(data, config, index, device)
    optimizer, scheduler = optimization(child, config, config.epochs * len(train))
    evals = {"val": data.loader("val", batch_size=512, device=device)} if len(data.val) else {}
    enforcer = [MaskEnforcer(masks)] if masks else []
    guard = []  # after the enforcer: it keeps masked weights
    if evals:
        plain = data.loader("train", batch_size=config.data.batch_size, device=device, augment=False, shuffle=False)
        guard = [CollapseGuard(data.num_classes, recheck=recalibrated_metrics(plain, evals["val"]))]
        # the child as split is a candidate too: a tuning that diverged from its first steps
        # hands it back rather than the least bad of its collapsed epochs
        guard[0].start(child, epoch_metrics("val", evaluate(child, evals["val"])))
    state = fit(child, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                step=create_step(config.step), eval_data=evals, callbacks=[*enforcer, *callbacks, *guard],
                amp=config.amp, device=device, resume_path=resume_path, resume_extra=resume_extra)
    bn_samples = settle_batchnorm(child, data, config, indices, device)  # after the guard: the kept epoch's
    metrics = {"train_samples": samples, **final_metrics(child, data, device=device, amp=config.amp)}
    if guard and guard[0].restored is not None:
        metrics["restored"] = guard[0].restored
    record_tuning(child, metrics, tuning_cost(child, state, data, device, bn_samples))
    return metrics


def record_tuning(child: nn.Module, metrics: dict[str, Any], cost: dict[str, Any]) -> Child:
    """Put a tuning run's metrics and cost into the child's record."""
    record = child_record(child)
    if record is None:
        record = child.pat_child = Child()
    record.metrics, record.cost = metrics, cost
    return record


def tune(
    children: Sequence[nn.Module],
    data: Dataset | BatchData | Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: TuneConfig | None = None,
    *,
    val: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    test: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    masks: Sequence[dict[str, torch.Tensor] | None] | None = None,
    callbacks: Callable[[int], Iterable[Callback]] = lambda i: (),
    parent_lr: float | None = None,
) -> list[nn.Module]:
    """Tune every child in place (Python API); returns the same modules.

    Args:
        children: models from :func:`pat.split` (each carries its masks in ``pat_child``) or
            any models, with ``masks`` given explicitly (``None`` entries are tuned densely).
        data: a :class:`pat.data.Dataset`, or training batches: any ``DataLoader`` or
            re-iterable of ``(x, y)`` with a length (:class:`pat.data.BatchData`; each child
            reads the loader's own batches, in an order seeded per child; bagging is refused).
        config: the tuning recipe; default ``TuneConfig()``.
        val: validation batches to go with training batches (reported after every epoch).
        test: test batches to go with training batches (the children's final metrics).
        masks: one mask set (or ``None``) per child, instead of the ones the children carry.
        callbacks: ``index -> callbacks`` for that child's run (progress, logging); a
            together-run (``config.together``) gets ``callbacks(0)``.
        parent_lr: the LR the parent trained at; an unset ``config.max_lr`` is
            ``config.max_lr_share`` times it (:func:`resolve_max_lr`).
    """
    check(config is None or isinstance(config, TuneConfig), f"config must be a pat.TuneConfig. Got {type(config).__name__}.")
    if isinstance(children, (str, Path)) or not all(isinstance(c, nn.Module) for c in children):
        raise PatError(f"children must be a list of models (pat.split's, or pat.load_child's); an ensemble "
                       f"directory is tuned with `pat tune DIR`. Got {str(children)[:80]!r}.")
    config = resolve_max_lr(config if config is not None else TuneConfig(), parent_lr)
    from pat.tuner.together import tune_together  # it builds on this module's pieces

    data = as_data(data, val=val, test=test)
    masks = masks if masks is not None else [masks_of(c) for c in children]
    check(len(masks) == len(children), f"masks must have one entry per child. Got {len(masks)} for {len(children)}.")
    for i, child in enumerate(children):
        check_takes(child, data, argument=f"children[{i}]")
    if config.together and len(children) > 1:
        if tune_together(children, masks, data, config, indices=range(len(children)),
                         callbacks=callbacks(0)) is not None:
            return list(children)
    for i, (child, mask) in enumerate(zip(children, masks, strict=True)):
        tune_child(child, mask, data, config, index=i, callbacks=callbacks(i))
    return list(children)


