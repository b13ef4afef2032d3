"""Children of one architecture tuned in one optimizer step per batch (``--together``).

The children are laid out as the groups of one network (:func:`pat.pack.group`); each reads
its own batches and keeps its own gradient, optimizer state and schedule, so the result equals
tuning them one by one up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pat.config import TuneConfig
from pat.data import Dataset
from pat.engine.batchnorm import recalibrated_metrics
from pat.engine.callbacks import Callback
from pat.engine.guard import CollapseGuard
from pat.engine.loop import (
    autocast_for,
    epoch_metrics,
    evaluate,
    final_metrics,
    fit,
    resolve_device,
)
from pat.engine.masking import MaskEnforcer
from pat.errors import PatError, check
from pat.jobs import member_seed
from pat.tuner.child import (
    optimization,
    prepare,
    record_tuning,
    resolve_max_lr,
    settle_batchnorm,
    tuning_cost,
)

__all__ = ["tune_together"]


class _Together(nn.Module):
    """A grouped network (:func:`pat.pack.group`) as ``fit`` trains it: ``(B, C, M)`` logits."""

    def __init__(self, packed: Any) -> None:
        super().__init__()
        self.network, self.members = packed.network, packed.members
        object.__setattr__(self, "packed", packed)  # for pat.pack.child_state; not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).unflatten(1, (self.members, -1)).transpose(1, 2)


class _Zipped:
    """Child ``i``'s batches from loader ``i``, side by side.

    ``x`` is concatenated along the channels (group ``i`` reads child ``i``'s batch) and
    ``y`` has shape ``(B, M)``.
    """

    def __init__(self, loaders: Sequence[Any]) -> None:
        lengths = {len(loader) for loader in loaders}
        check(len(lengths) == 1, f"children tuned together need equally long epochs. Got {sorted(lengths)} batches.")
        self.loaders = list(loaders)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch)

    def __iter__(self):
        for batches in zip(*self.loaders, strict=True):
            yield torch.cat([x for x, _ in batches], 1), torch.stack([y for _, y in batches], 1)


class _Fanned:
    """One loader's batches given to all M children (validation)."""

    def __init__(self, loader: Any, members: int) -> None:
        self.loader, self.members = loader, members

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield torch.cat([x] * self.members, 1), y[:, None].expand(-1, self.members)


def _summed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The children's mean cross-entropies, summed: each child's gradient is its own."""
    return F.cross_entropy(logits, y, reduction="sum") / y.shape[0]


def _grouped(children: Sequence[nn.Module], masks: Sequence[dict[str, torch.Tensor] | None],
             data: Dataset, device: torch.device) -> tuple[_Together, dict[str, torch.Tensor]]:
    """The children as one grouped network (checked against them) and their masks laid out for it."""
    from pat.pack import group, group_masks, verify

    packed = group(children)
    shape = data.sample_shape
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    verify(packed, children, x, what="together")
    return _Together(packed), group_masks(packed, masks)


def _faster_together(model: _Together, child: nn.Module, train: _Zipped, amp: bool | None,
                     device: torch.device, repeats: int = 2) -> bool:
    """Whether one together step beats M one-child steps, timed on copies over one batch."""
    import copy
    import time

    autocast = autocast_for(device, amp)
    x, y = next(iter(train))
    m = model.members
    cases = [(copy.deepcopy(model), x, y, _summed_loss),
             (copy.deepcopy(child), x.chunk(m, 1)[0].contiguous(), y[:, 0].contiguous(), F.cross_entropy)]
    best = []
    for net, xb, yb, loss_fn in cases:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            with autocast():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        best.append(min(times[1:]))
    return best[0] <= m * best[1]


def check_together_step(config: TuneConfig) -> None:
    check(config.step == "sgd", f"--together tunes with the plain 'sgd' step only; step {config.step!r} "
          "takes one norm over all the weights it updates, which would couple the children. Tune them one by one.")


def tune_together(
    children: Sequence[nn.Module],
    masks: Sequence[dict[str, torch.Tensor] | None],
    data: Dataset,
    config: TuneConfig,
    *,
    indices: Sequence[int],
    callbacks: Iterable[Callback] = (),
    resume_path: str | Path | None = None,
    resume_extra: dict[str, Any] | None = None,
) -> list[dict[str, float]] | None:
    """Tune children of one architecture in place, all in one optimizer step per batch.

    The children are laid out as the groups of one network (:func:`pat.pack.group`); child
    ``i`` reads its own batches (seeded by ``indices[i]``, bagging included), its mask is
    enforced on its group, and the loss is the sum of the children's losses, so every child
    gets exactly the gradient, the optimizer state and the schedule it would get alone: the
    result equals tuning them one by one up to float rounding (dropout aside: its draws come
    from one stream). Returns each child's metrics, also left with the costs in each child's
    record. With a validation split each child has its own
    :class:`pat.engine.guard.CollapseGuard`: a child whose last epoch collapsed is handed back
    its lowest-validation-loss epoch (``metrics["restored"]``; the child as split counts as
    epoch 0, as in :func:`pat.tuner.tune_child`), the others are untouched.

    With ``config.together == "auto"`` the grouped step is timed against M one-child steps
    first and ``None`` is returned (nothing tuned) when it is not faster, or when the model
    cannot be grouped.
    """
    config = resolve_max_lr(config)
    check_together_step(config)
    check(len(children) == len(masks) == len(indices),
          f"tune_together needs one mask and one index per child. Got {len(children)} children, "
          f"{len(masks)} masks, {len(indices)} indices.")
    device = resolve_device(config.device)
    for child in children:
        child.to(device)
    auto = config.together == "auto"
    try:
        model, packed_masks = _grouped(children, masks, data, device)
    except PatError:
        if auto:
            return None
        raise
    prepared = [prepare(data, config, i, device) for i in indices]
    train = _Zipped([loader for loader, _, _ in prepared])
    if auto and not _faster_together(model, children[0], train, config.amp, device):
        return None
    torch.manual_seed(member_seed(config.seed, indices[0]))
    optimizer, scheduler = optimization(model, config, config.epochs * len(train))
    m = len(children)
    evals = {"val": _Fanned(data.loader("val", batch_size=512, device=device), m)} if len(data.val) else {}
    from pat.pack import child_state

    # a guard per child on its own validation metrics, after the enforcer: it keeps masked weights
    guards = []
    if evals:  # one recheck for all: fresh BatchNorm statistics for the grouped network, each child's metrics
        plain = data.loader("train", batch_size=config.data.batch_size, device=device, augment=False, shuffle=False)
        recheck = recalibrated_metrics(_Fanned(plain, m), evals["val"], loss_fn=_summed_loss)
        guards = [CollapseGuard(data.num_classes, member=i, weights=lambda net, i=i: child_state(net.packed, i),
                                recheck=recheck) for i in range(m)]
        # each child as split is its guard's epoch 0, as for one child alone (tune_child)
        start = epoch_metrics("val", evaluate(model, evals["val"], loss_fn=_summed_loss))
        for guard in guards:
            guard.start(model, start)
    state = fit(model, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                loss_fn=_summed_loss, eval_data=evals, callbacks=[MaskEnforcer(packed_masks), *callbacks, *guards],
                amp=config.amp, device=device, resume_path=resume_path, resume_extra=resume_extra)
    results = []
    for i, (child, (_, samples, bagged)) in enumerate(zip(children, prepared, strict=True)):
        guard = guards[i] if guards else None
        child.load_state_dict(guard.kept if guard is not None and guard.kept is not None else child_state(model.packed, i))
        bn_samples = settle_batchnorm(child, data, config, bagged, device)
        cost = tuning_cost(child, state, data, device, bn_samples, together=m)
        cost["seconds"] = state.seconds / m  # one run for all: each child's share
        results.append({"train_samples": samples, **final_metrics(child, data, device=device, amp=config.amp)})
        if guard is not None and guard.restored is not None:
            results[-1]["restored"] = guard.restored
        record_tuning(child, results[-1], cost)
    return results


