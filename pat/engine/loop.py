"""``fit``: the one training loop in pat.

Parent training, child tuning and every member producer call this loop; they differ only by
the step rule, the schedule, the data they pass and the callbacks they attach.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from pat.engine.callbacks import Callback, CallbackList, FitState
from pat.engine.checkpoint import load_checkpoint, save_checkpoint
from pat.engine.cost import sample_passes
from pat.engine.distributed import all_sum, is_main_process
from pat.engine.steps import LossFn, StepRule, sgd_step
from pat.errors import PatError, check

if TYPE_CHECKING:
    from pat.data import Dataset

__all__ = ["fit", "evaluate", "final_metrics", "resolve_device", "autocast_for", "train_state"]

Batches = Iterable[tuple[Tensor, Tensor]]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; otherwise validate the name."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PatError(f"device {device!r} is not a valid torch device.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PatError(f"device {device!r} was asked for but CUDA is not available here.")
    return dev


def autocast_for(device: torch.device, amp: bool | None) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA by default (``amp=None``); full precision on CPU unless asked."""
    enabled = device.type == "cuda" if amp is None else amp
    if not enabled:
        return contextlib.nullcontext
    return partial(torch.autocast, device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    *,
    loss_fn: LossFn = F.cross_entropy,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``batches`` (eval mode, restored afterwards).

    With ``(B, C, M)`` logits and ``(B, M)`` labels (M children tuned together) it also
    returns each child's cross-entropy and accuracy, ``member_loss`` and ``member_acc``.
    """
    was_training = model.training
    model.eval()
    loss_sum = correct = member_loss = member_hits = None
    n = labels = 0
    for x, y in batches:
        with autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y) * len(y)
        hits = (logits.argmax(1) == y).sum()
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct = hits if correct is None else correct + hits
        if y.dim() == 2:  # (B, M) labels: M children's predictions per sample (together-tuning)
            each = F.cross_entropy(logits.float(), y, reduction="none").sum(0)
            each_hits = (logits.argmax(1) == y).sum(0)
            member_loss = each if member_loss is None else member_loss + each
            member_hits = each_hits if member_hits is None else member_hits + each_hits
        n += len(y)
        labels += y.numel()
    model.train(was_training)
    check(n > 0, "evaluation data is empty.")
    result: dict[str, Any] = {"loss": float(loss_sum) / n, "acc": float(correct) / labels}
    if member_loss is not None:
        result["member_loss"] = (member_loss / n).tolist()
        result["member_acc"] = (member_hits / n).tolist()
    return result


def epoch_metrics(name: str, result: Mapping[str, Any]) -> dict[str, float]:
    """:func:`evaluate`'s result on split ``name`` as epoch metrics.

    ``{name}_loss``, ``{name}_acc`` and, for children tuned together, each child's
    ``{name}_loss/i`` and ``{name}_acc/i``.
    """
    metrics = {f"{name}_loss": result["loss"], f"{name}_acc": result["acc"]}
    for i, (loss, acc) in enumerate(zip(result.get("member_loss", ()), result.get("member_acc", ()), strict=True)):
        metrics[f"{name}_loss/{i}"], metrics[f"{name}_acc/{i}"] = loss, acc
    return metrics


def final_metrics(model: nn.Module, data: Dataset, *, device: torch.device, amp: bool | None,
                  batch_size: int = 512) -> dict[str, float]:
    """``val_loss``, ``val_acc``, ``test_loss``, ``test_acc`` of ``model`` (non-empty splits only)."""
    autocast = autocast_for(device, amp)
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        if len(data.split(split)):
            result = evaluate(model, data.loader(split, batch_size=batch_size, device=device), autocast=autocast)
            metrics[f"{split}_loss"], metrics[f"{split}_acc"] = result["loss"], result["acc"]
    return metrics


def _inner(model: nn.Module) -> nn.Module:
    """The module a data-parallel wrapper trains (its state is what is saved and evaluated)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_state(state: FitState, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``fit`` needs to continue ``state``'s run (a ``kind="train-state"`` payload).

    ``fit`` saves it to ``resume_path`` after every epoch; saved anywhere else and passed back
    as a ``resume_path``, it starts a longer run where this one stopped (SharpBalance's second
    phase continues its first this way).
    """
    return {
        "kind": "train-state",
        "epoch": state.epoch + 1,  # epochs finished
        "step": state.step,
        "cost": {"samples": state.samples, "sample_passes": state.sample_passes, "seconds": state.seconds},
        "history": state.history,
        "state_dict": {k: v.detach().cpu() for k, v in _inner(state.model).state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "rng": torch.get_rng_state(),
        **(extra or {}),
    }


def _restore_state(ckpt: Mapping[str, Any], state: FitState, where: str) -> int:
    if ckpt.get("kind") != "train-state":
        raise PatError(f"{where} is a {ckpt.get('kind')!r} record, not a train-state.")
    _inner(state.model).load_state_dict(ckpt["state_dict"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scheduler is not None and ckpt.get("scheduler") is not None:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    state.step, state.history = ckpt["step"], list(ckpt["history"])
    done = ckpt.get("cost") or {}  # absent in states written before costs were counted
    state.samples, state.seconds = int(done.get("samples", 0)), float(done.get("seconds", 0.0))
    state.sample_passes = int(done.get("sample_passes", state.samples))
    state.metrics = dict(state.history[-1]) if state.history else {}
    return int(ckpt["epoch"])


def fit(
    model: nn.Module,
    train: Batches,
    *,
    epochs: int,
    optimizer: Optimizer,
    scheduler: Any = None,
    interval: Literal["step", "epoch"] = "step",
    step: StepRule = sgd_step,
    loss_fn: LossFn = F.cross_entropy,
    eval_data: Mapping[str, Batches] | None = None,
    callbacks: Iterable[Callback] = (),
    amp: bool | None = None,
    device: str | torch.device | None = None,
    resume_path: str | os.PathLike | None = None,
    resume_extra: Mapping[str, Any] | None = None,
    start: Mapping[str, Any] | None = None,
) -> FitState:
    """Train ``model`` for ``epochs`` passes over ``train``.

    Args:
        model: any module; moved to ``device`` (default: where its parameters are).
        train: re-iterable batches ``(x (B, ...), y (B,))`` already on the device (e.g. a
            :class:`pat.data.DeviceLoader`); if it has ``set_epoch``, it is called each epoch.
        epochs: passes over ``train`` (a resumed run counts the ones already done).
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        scheduler: stepped after every optimizer step (``interval="step"``) or every epoch.
        interval: ``"step"`` or ``"epoch"``, when ``scheduler`` steps.
        step: the update rule (:mod:`pat.engine.steps`).
        loss_fn: ``(logits, y) -> mean loss`` (cross-entropy by default).
        eval_data: ``{"val": batches, ...}``; each is evaluated after every epoch and reported
            as ``val_loss`` / ``val_acc`` etc. in the epoch metrics (children tuned together,
            ``(B, M)`` labels: also ``val_loss/i`` / ``val_acc/i``, child ``i``'s).
        callbacks: receive :class:`FitState` at fit/epoch/step boundaries.
        amp: bf16 autocast; ``None`` means on for CUDA, off for CPU.
        device: where to train (``"auto"``, ``"cpu"``, ``"cuda:1"``, ...).
        resume_path: if given, the full training state is saved there (atomically) after every
            epoch, and an existing file there is resumed from; the caller deletes it when done.
            A ``DistributedDataParallel`` model's is written by rank 0 and every rank resumes
            from it; any other model's by the rank that trains it. It keeps each callback's
            :meth:`~pat.engine.callbacks.Callback.state_dict` too, handed back on resuming.
        resume_extra: plain data stored with the resume state (e.g. the config).
        start: a :func:`train_state` to continue when there is no resume state to resume
            (SharpBalance's second phase continues its first); its epochs count as done.

    Returns:
        The final :class:`FitState` (``history`` holds one metrics dict per epoch; ``step``,
        ``samples``, ``sample_passes`` and ``seconds`` count the whole run, resumed part
        included, for :func:`pat.engine.cost.fit_cost`).

    A ``DistributedDataParallel`` model (:func:`pat.engine.distributed.data_parallel`) trains
    on each rank's rows; the epoch's train metrics and sample counts are summed over the ranks,
    and evaluation and the resume state use the wrapped module.
    """
    check(epochs > 0, f"epochs must be positive. Got {epochs}.")
    check(interval in ("step", "epoch"), f"interval must be 'step' or 'epoch'. Got {interval!r}.")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    autocast = autocast_for(dev, amp)
    steps_per_epoch = len(train) if hasattr(train, "__len__") else 0
    state = FitState(model=model, optimizer=optimizer, scheduler=scheduler, epochs=epochs,
                     steps_per_epoch=steps_per_epoch)
    cbs = CallbackList(callbacks)
    resume = Path(resume_path) if resume_path is not None else None
    first_epoch = 0
    if resume is not None and resume.exists():
        saved = load_checkpoint(resume, argument="resume state")
        first_epoch = _restore_state(saved, state, f"resume state {str(resume)!r}")
        cbs.load_state_dict(saved.get("callbacks") or {})
    elif start is not None:
        first_epoch = _restore_state(start, state, "start")

    cbs.on_fit_start(state)
    for epoch in range(first_epoch, epochs):
        state.epoch = epoch
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        cbs.on_epoch_start(state)
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = labels = 0
        passes = torch.zeros((), device=dev, dtype=torch.long)
        for x, y in train:
            loss, logits = step(model, x, y, optimizer, loss_fn, autocast)
            # accumulate on the device: a .item() per step would sync every batch
            loss_sum += loss.float() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            labels += y.numel()
            passes += sample_passes(step, y)
            state.step += 1
            if scheduler is not None and interval == "step":
                scheduler.step()
            cbs.on_step_end(state)
        if scheduler is not None and interval == "epoch":
            scheduler.step()
        if isinstance(model, DistributedDataParallel):  # every rank's rows: the global batch
            sums = all_sum([float(loss_sum), float(correct), seen, labels, float(passes)], dev)
            loss_sum, correct, seen, labels, passes = sums[0], sums[1], int(sums[2]), int(sums[3]), int(sums[4])
        check(seen > 0, "training data is empty.")
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / seen,
            "train_acc": float(correct) / labels,
            "lr": optimizer.param_groups[0]["lr"],
        }
        for name, batches in (eval_data or {}).items():
            metrics.update(epoch_metrics(name, evaluate(_inner(model), batches, loss_fn=loss_fn, autocast=autocast)))
        metrics["time"] = time.perf_counter() - start
        state.samples += seen
        state.sample_passes += int(passes)
        state.seconds += metrics["time"]
        state.metrics = metrics
        state.history.append(metrics)
        # one model trained data-parallel is saved by rank 0; a rank's own job (a sharded
        # child or member) by that rank
        if resume is not None and (not isinstance(model, DistributedDataParallel) or is_main_process()):
            held = cbs.state_dict()  # e.g. the best epoch a CollapseGuard holds
            extra = {**(resume_extra or {}), **({"callbacks": held} if held else {})}
            save_checkpoint(resume, train_state(state, extra))
        cbs.on_epoch_end(state)
        if state.stop:
            break
    cbs.on_fit_end(state)
    return state
