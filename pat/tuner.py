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
import torch.nn.functional as F
from torch import nn

from pat.config import TrainConfig, TuneConfig, to_dict
from pat.data import Dataset, bagging_indices
from pat.engine.batchnorm import recalibrate_bn
from pat.engine.callbacks import Callback
from pat.engine.cost import example_input, fit_cost
from pat.engine.distributed import Ranks
from pat.engine.loop import autocast_for, final_metrics, fit, resolve_device
from pat.engine.masking import MaskEnforcer
from pat.engine.optim import create_optimizer
from pat.engine.schedules import create_schedule
from pat.engine.steps import create_step
from pat.errors import PatError, check
from pat.models import check_takes
from pat.store import EnsembleDir

__all__ = ["TuneConfig", "tune", "tune_child", "tune_together", "tune_directory", "resolve_max_lr"]


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


def _prepare(child: nn.Module, data: Dataset, config: TuneConfig, index: int,
             device: torch.device) -> tuple[Any, int, int]:
    """Child ``index``'s training loader, its sample count and its BN recomputation samples.

    The loader's bagged subset and shuffling are seeded by ``(seed, index)``: a child tuned
    alone, together with others, in a rerun or on another rank sees the same batches.
    """
    indices = None
    if config.bagging is not None and config.bagging < 1:
        indices = bagging_indices(len(data.train.y), config.bagging, seed=config.seed, member=index)
    train = data.loader("train", batch_size=config.data.batch_size, device=device,
                        seed=config.seed * 100_003 + index, indices=indices)
    samples = len(indices) if indices is not None else len(data.train.y)
    bn_samples = 0
    if config.recompute_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in child.modules()):
        # pruning shifts every layer's activation statistics: BN's running averages are the
        # parent's until recomputed (one forward pass over the child's training data)
        recalibrate_bn(child, data.loader("train", batch_size=config.data.batch_size, device=device,
                                          augment=False, shuffle=False, indices=indices))
        bn_samples = samples
    return train, samples, bn_samples


def _optimization(model: nn.Module, config: TuneConfig, steps: int) -> tuple[Any, Any]:
    """The optimizer and the per-batch schedule of a tuning run of ``steps`` steps."""
    one_cycle = config.schedule == "one-cycle"
    optimizer = create_optimizer(model, config.optimizer, lr=config.max_lr if one_cycle else config.lr,
                                 momentum=config.momentum, weight_decay=config.weight_decay)
    options: dict[str, Any] = {"max_lr": config.max_lr, "cycle_momentum": config.cycle_momentum} if one_cycle else {}
    return optimizer, create_schedule(config.schedule, optimizer, steps, **options)


def _cost(child: nn.Module, state: Any, data: Dataset, device: torch.device, bn_samples: int,
          **extra: Any) -> dict[str, Any]:
    cost = fit_cost(state, example_input(data, device), model=child, **extra)
    if bn_samples:  # forward passes only: a third of a training pass each
        cost["flops"] += cost["forward_flops_per_sample"] * bn_samples
        cost["bn_samples"] = bn_samples
    return cost


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
    train, samples, bn_samples = _prepare(child, data, config, index, device)
    optimizer, scheduler = _optimization(child, config, config.epochs * len(train))
    evals = {"val": data.loader("val", batch_size=512, device=device)} if len(data.val.y) else {}
    enforcer = [MaskEnforcer(masks)] if masks else []
    state = fit(child, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                step=create_step(config.step), eval_data=evals, callbacks=[*enforcer, *callbacks],
                amp=config.amp, device=device)
    child.pat_cost = _cost(child, state, data, device, bn_samples)
    return {"train_samples": samples, **final_metrics(child, data, device=device, amp=config.amp)}


class _Together(nn.Module):
    """A grouped network (:func:`pat.pack.group`) as ``fit`` trains it: ``(B, C, M)`` logits."""

    def __init__(self, packed: Any) -> None:
        super().__init__()
        self.network, self.members = packed.network, packed.members
        object.__setattr__(self, "packed", packed)  # for pat.pack.child_state; not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).unflatten(1, (self.members, -1)).transpose(1, 2)


class _Zipped:
    """Child ``i``'s batches from loader ``i``, side by side: ``x`` concatenated along the
    channels (group ``i`` reads child ``i``'s batch) and ``y`` of shape ``(B, M)``."""

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
    shape = data.train.x.shape[1:]
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
    from one stream). Returns each child's metrics; costs are left as ``pat_cost``.

    With ``config.together == "auto"`` the grouped step is timed against M one-child steps
    first and ``None`` is returned (nothing tuned) when it is not faster, or when the model
    cannot be grouped.
    """
    config = resolve_max_lr(config)
    check(config.step == "sgd", f"--together tunes with the plain 'sgd' step only; step {config.step!r} "
          "takes one norm over all the weights it updates, which would couple the children. Tune them one by one.")
    check(len(children) == len(masks) == len(indices),
          f"tune_together needs one mask and one index per child. Got {len(children)} children, "
          f"{len(masks)} masks, {len(indices)} indices.")
    device = resolve_device(config.device)
    for child in children:
        child.to(device)
    auto = config.together == "auto"
    if auto:  # learn whether the model groups before spending a BN pass on every child
        try:
            _grouped(children, masks, data, device)
        except PatError:
            return None
    prepared = [_prepare(child, data, config, i, device) for child, i in zip(children, indices, strict=True)]
    model, packed_masks = _grouped(children, masks, data, device)  # with the recomputed BN statistics
    train = _Zipped([loader for loader, _, _ in prepared])
    if auto and not _faster_together(model, children[0], train, config.amp, device):
        return None
    torch.manual_seed(config.seed * 100_003 + indices[0])
    optimizer, scheduler = _optimization(model, config, config.epochs * len(train))
    m = len(children)
    evals = {"val": _Fanned(data.loader("val", batch_size=512, device=device), m)} if len(data.val.y) else {}
    if resume_path is not None:
        Path(resume_path).parent.mkdir(parents=True, exist_ok=True)
    state = fit(model, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                loss_fn=_summed_loss, eval_data=evals, callbacks=[MaskEnforcer(packed_masks), *callbacks],
                amp=config.amp, device=device, resume_path=resume_path, resume_extra=resume_extra)
    from pat.pack import child_state

    results = []
    for i, (child, (_, samples, bn_samples)) in enumerate(zip(children, prepared, strict=True)):
        child.load_state_dict(child_state(model.packed, i))
        child.pat_cost = _cost(child, state, data, device, bn_samples, together=m)
        child.pat_cost["seconds"] = state.seconds / m  # one run for all: each child's share
        results.append({"train_samples": samples, **final_metrics(child, data, device=device, amp=config.amp)})
    return results


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
        callbacks: ``index -> callbacks`` for that child's run (progress, logging); a
            together-run (``config.together``) gets ``callbacks(0)``.
        parent_lr: the LR the parent trained at; an unset ``config.max_lr`` is
            ``config.max_lr_share`` times it (:func:`resolve_max_lr`).
    """
    config = resolve_max_lr(config if config is not None else TuneConfig(), parent_lr)
    masks = masks if masks is not None else [getattr(c, "pat_masks", None) for c in children]
    check(len(masks) == len(children), f"masks must have one entry per child. Got {len(masks)} for {len(children)}.")
    for i, child in enumerate(children):
        check_takes(child, data, argument=f"children[{i}]")
    if config.together and len(children) > 1:
        results = tune_together(children, masks, data, config, indices=range(len(children)),
                                callbacks=callbacks(0))
        if results is not None:
            for child, metrics in zip(children, results, strict=True):
                child.pat_metrics = metrics
            return list(children)
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
    Rank 0 holds the directory's lock (:mod:`pat.lock`) throughout: a second tune of
    the same directory is refused, or with ``wait`` queues behind the first.
    """
    from pat.lock import directory_lock

    ranks = ranks if ranks is not None else Ranks()
    lock = directory_lock(path, wait=wait, argument="CHILDREN_DIR") if ranks.is_main else contextlib.nullcontext()
    with lock:
        return _tune_directory(path, data, config, ranks=ranks, callbacks=callbacks, on_done=on_done)


def _tune_directory(path: str, data: Dataset, config: TuneConfig, *, ranks: Ranks,
                    callbacks: Callable[[str], Iterable[Callback]],
                    on_done: Callable[[dict[str, Any]], None]) -> EnsembleDir:
    from pat.children import load_child, save_child
    from pat.producers.common import plain_config

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
    jobs = ranks.shard(_jobs(ens, todo))  # a packed file's children are one job: one network
    for job in jobs:
        if "packed" in job[0][1]:
            _tune_packed(ens, job, data, config, ranks=ranks, callbacks=callbacks, on_done=on_done)
    share = [job[0] for job in jobs if "packed" not in job[0][1]]

    def finish(record: dict[str, Any], child: nn.Module, metrics: dict[str, float]) -> None:
        cost = {**child.pat_cost, "parent": record.get("parent")}
        record = {**record, "status": "tuned", "metrics": metrics, "tune": to_dict(config), "cost": cost}
        save_child(ens.member_path(record), child, status="tuned", metrics=metrics, tune=to_dict(config),
                   cost=cost)
        if not ranks.distributed:
            ens.upsert_member(ens.stamp(record))
            ens.save()
        on_done(record)

    if config.together and len(share) > 1:
        children = [load_child(ens.member_path(record)) for _, record in share]
        names = [record["name"] for _, record in share]
        resume = ens.path / ".work" / f"together-{ranks.rank}.partial.pt"
        extra = {"children": names, "tune": plain_config(config)}
        _discard_stale(resume, extra)
        results = tune_together(children, [getattr(c, "pat_masks", None) for c in children], data, config,
                                indices=[index for index, _ in share], callbacks=callbacks(", ".join(names)),
                                resume_path=resume, resume_extra=extra)
        if results is not None:
            for (_, record), child, metrics in zip(share, children, results, strict=True):
                finish(record, child, metrics)
            resume.unlink(missing_ok=True)
            share = []
    for index, record in share:
        child = load_child(ens.member_path(record))
        masks = getattr(child, "pat_masks", None)  # load_child has checked them against the weights
        finish(record, child, tune_child(child, masks, data, config, index=index, callbacks=callbacks(record["name"])))
    ranks.barrier()
    if ranks.distributed and ranks.is_main:
        _reconcile(ens)
    ranks.barrier()
    return EnsembleDir.load(path)


def _jobs(ens: EnsembleDir, todo: list[tuple[int, dict[str, Any]]]) -> list[list[tuple[int, dict[str, Any]]]]:
    """The tuning jobs: one per child file, the records of a packed file (all of them) as one."""
    jobs, packed = [], {}
    for index, record in todo:
        if "packed" not in record:
            jobs.append([(index, record)])
        elif record["file"] not in packed:
            packed[record["file"]] = sorted(((i, r) for i, r in enumerate(ens.members) if r["file"] == record["file"]),
                                            key=lambda item: item[1]["packed"]["index"])
            jobs.append(packed[record["file"]])
    return jobs


def _tune_packed(ens: EnsembleDir, job: list[tuple[int, dict[str, Any]]], data: Dataset, config: TuneConfig, *,
                 ranks: Ranks, callbacks: Callable[[str], Iterable[Callback]],
                 on_done: Callable[[dict[str, Any]], None]) -> None:
    """Tune the children of one packed file together (they are one network) and rewrite it.

    The file is replaced (atomically) once every child has finished; until then the run's
    state is kept at epoch boundaries in ``.work/together-<file>.partial.pt``, so an
    interrupted run resumes where it stopped.
    """
    from pat.engine.checkpoint import load_checkpoint
    from pat.pack import group, load_packed, save_packed, unpack
    from pat.producers.common import plain_config

    records = [record for _, record in job]
    names = [record["name"] for record in records]
    check(config.step == "sgd", f"--step {config.step!r}: the children of packed file {records[0]['file']!r} "
          "are one network and tune together, which takes the plain 'sgd' step only.")
    file = ens.member_path(records[0])
    argument = f"member {names[0]!r}"
    header = load_checkpoint(file, mmap=True, argument=argument)
    packed = load_packed(file, argument=argument)
    children = unpack(packed)
    resume = ens.path / ".work" / f"together-{file.stem}.partial.pt"
    extra = {"children": names, "tune": plain_config(config)}
    _discard_stale(resume, extra)
    results = tune_together(children, [None] * len(children), data, replace(config, together=True),
                            indices=[index for index, _ in job], callbacks=callbacks(", ".join(names)),
                            resume_path=resume, resume_extra=extra)
    assert results is not None  # together=True never declines
    tune = to_dict(config)
    costs = [{**child.pat_cost, "parent": record.get("parent")} for child, record in zip(children, records, strict=True)]
    save_packed(file, group(children), names, arch=header["arch"], input_shape=header["input_shape"],
                recipes=packed.recipes, status="tuned", dataset=header.get("dataset"),
                num_classes=header.get("num_classes"), metrics=results, tune=tune, costs=costs)
    for record, metrics, cost in zip(records, results, costs, strict=True):
        record = ens.stamp({**record, "status": "tuned", "metrics": metrics, "tune": tune, "cost": cost})
        if not ranks.distributed:
            ens.upsert_member(record)
        on_done(record)
    if not ranks.distributed:
        ens.save()
    resume.unlink(missing_ok=True)


def _discard_stale(resume: Path, extra: dict[str, Any]) -> None:
    """Remove a together-run's resume state left by a run of other children or settings."""
    from pat.engine.checkpoint import load_checkpoint

    if not resume.is_file():
        return
    try:
        old = load_checkpoint(resume, argument="together resume state")
        same = old.get("children") == extra["children"] and old.get("tune") == extra["tune"]
    except PatError:
        same = False
    if not same:
        resume.unlink()


def _reconcile(ens: EnsembleDir) -> None:
    """Mark children whose files say they are tuned (written by other ranks) in the manifest."""
    from pat.engine.checkpoint import load_checkpoint

    changed = False
    for record in ens.members:
        if record["status"] == "split":
            ckpt = load_checkpoint(ens.member_path(record), mmap=True)
            if ckpt.get("status") == "tuned":
                metrics, cost = ckpt.get("metrics", {}), ckpt.get("cost")
                if "packed" in record:  # a packed file lists them per child
                    index = record["packed"]["index"]
                    metrics, cost = metrics[index], ckpt["costs"][index]
                ens.upsert_member(ens.stamp({**record, "status": "tuned", "metrics": metrics,
                                             "tune": ckpt.get("tune", {}), "cost": cost}))
                changed = True
    if changed:
        ens.save()
