"""Tune pruned children briefly: the second half of Prune and Tune.

Each child gets a fresh optimizer and (by default) a per-batch cosine one-cycle schedule,
optionally on its own bagged subset of the training split; its mask is enforced after every
optimizer step. Children are independent jobs of :func:`pat.jobs.run_jobs`: an ensemble
directory is tuned child by child, each saved the moment it finishes, so a rerun skips
finished children and resumes an interrupted one from its last epoch, and under ``torchrun``
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

from pat.config import TrainConfig, TuneConfig, plain_config, to_dict
from pat.data import BatchData, Dataset, as_data, bagging_indices
from pat.engine.batchnorm import recalibrate_bn
from pat.engine.callbacks import Callback
from pat.engine.cost import example_input, fit_cost
from pat.engine.distributed import Ranks
from pat.engine.loop import autocast_for, final_metrics, fit, resolve_device
from pat.engine.masking import MaskEnforcer
from pat.engine.optim import recipe
from pat.engine.steps import create_step
from pat.errors import PatError, check
from pat.jobs import Job, JobContext, Trained, member_seed, run_jobs
from pat.models import check_takes
from pat.records import Child, child_record, masks_of
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
        indices = bagging_indices(len(data.train), config.bagging, seed=config.seed, member=index)
    train = data.loader("train", batch_size=config.data.batch_size, device=device,
                        seed=member_seed(config.seed, index), indices=indices)
    samples = len(indices) if indices is not None else len(data.train)
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
    options: dict[str, Any] = {"max_lr": config.max_lr, "cycle_momentum": config.cycle_momentum} if one_cycle else {}
    return recipe(model, config, lr=config.max_lr if one_cycle else config.lr, schedule=config.schedule,
                  total_steps=steps, **options)


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
    resume_path: str | Path | None = None,
    resume_extra: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Tune one child in place; returns its validation and test metrics.

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
    train, samples, bn_samples = _prepare(child, data, config, index, device)
    optimizer, scheduler = _optimization(child, config, config.epochs * len(train))
    evals = {"val": data.loader("val", batch_size=512, device=device)} if len(data.val) else {}
    enforcer = [MaskEnforcer(masks)] if masks else []
    state = fit(child, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                step=create_step(config.step), eval_data=evals, callbacks=[*enforcer, *callbacks],
                amp=config.amp, device=device, resume_path=resume_path, resume_extra=resume_extra)
    metrics = {"train_samples": samples, **final_metrics(child, data, device=device, amp=config.amp)}
    _record(child, metrics, _cost(child, state, data, device, bn_samples))
    return metrics


def _record(child: nn.Module, metrics: dict[str, Any], cost: dict[str, Any]) -> Child:
    """Put a tuning run's metrics and cost into the child's record."""
    record = child_record(child)
    if record is None:
        record = child.pat_child = Child()
    record.metrics, record.cost = metrics, cost
    return record


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


def _check_together_step(config: TuneConfig) -> None:
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
    record.

    With ``config.together == "auto"`` the grouped step is timed against M one-child steps
    first and ``None`` is returned (nothing tuned) when it is not faster, or when the model
    cannot be grouped.
    """
    config = resolve_max_lr(config)
    _check_together_step(config)
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
    torch.manual_seed(member_seed(config.seed, indices[0]))
    optimizer, scheduler = _optimization(model, config, config.epochs * len(train))
    m = len(children)
    evals = {"val": _Fanned(data.loader("val", batch_size=512, device=device), m)} if len(data.val) else {}
    state = fit(model, train, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler,
                loss_fn=_summed_loss, eval_data=evals, callbacks=[MaskEnforcer(packed_masks), *callbacks],
                amp=config.amp, device=device, resume_path=resume_path, resume_extra=resume_extra)
    from pat.pack import child_state

    results = []
    for i, (child, (_, samples, bn_samples)) in enumerate(zip(children, prepared, strict=True)):
        child.load_state_dict(child_state(model.packed, i))
        cost = _cost(child, state, data, device, bn_samples, together=m)
        cost["seconds"] = state.seconds / m  # one run for all: each child's share
        results.append({"train_samples": samples, **final_metrics(child, data, device=device, amp=config.amp)})
        _record(child, results[-1], cost)
    return results


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
    config = resolve_max_lr(config if config is not None else TuneConfig(), parent_lr)
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

    Each child is a job of :func:`pat.jobs.run_jobs`: written (atomically) the moment it
    finishes and recorded in the manifest, so an interrupted run loses at most the epoch in
    progress. Under torchrun each rank tunes its share and rank 0 writes the manifest. The
    children of a packed file are one job (they are one network), and with
    ``config.together`` each rank's share is one job. Rank 0 holds the directory's lock
    (:mod:`pat.lock`) throughout: a second tune of the same directory is refused, or with
    ``wait`` queues behind the first.
    """
    from pat.lock import directory_lock

    ranks = ranks if ranks is not None else Ranks()
    lock = directory_lock(path, wait=wait, argument="CHILDREN_DIR") if ranks.is_main else contextlib.nullcontext()
    with lock:
        ens = EnsembleDir.load(path)
        if ens.manifest.get("num_classes") not in (None, data.num_classes):
            raise PatError(f"--dataset {data.name!r} has {data.num_classes} classes but the children "
                           f"were made for {ens.manifest['num_classes']}.")
        ledger = ChildLedger(ens, config)
        todo = [record for record in ens.members if ledger.finished_record(record) is None]
        if todo:  # the peak follows the parent's LR: read only when there is work
            ledger.config = resolve_max_lr(config, parent_lr_of(ens.manifest.get("parent")))
        jobs = _jobs(ens, ledger.config, data, todo, callbacks, ranks)
        run_jobs(ens, jobs, ledger, ranks=ranks,
                 on_member=lambda record, skipped: None if skipped else on_done(record))
        return EnsembleDir.load(path)


class ChildLedger:
    """Children of an ensemble directory, tuned in place: finished when their status is ``tuned``.

    A child file that says it is tuned while the manifest does not yet (written by another
    rank, or by a run that stopped before its manifest write) counts as finished too.
    """

    def __init__(self, ens: EnsembleDir, config: TuneConfig) -> None:
        self.ens, self.config = ens, config

    def signature(self) -> dict[str, Any]:
        return {"tune": plain_config(self.config)}

    def finished(self, job: Job) -> list[dict[str, Any]] | None:
        records = [self.finished_record(self.ens.member(name)) for name in job.members]
        return None if any(r is None for r in records) else records  # type: ignore[return-value]

    def finished_record(self, record: dict[str, Any]) -> dict[str, Any] | None:
        from pat.engine.checkpoint import load_checkpoint

        if record["status"] == "tuned":
            return record
        ckpt = load_checkpoint(self.ens.member_path(record), mmap=True)
        if ckpt.get("status") != "tuned":
            return None
        metrics, cost = ckpt.get("metrics", {}), ckpt.get("cost")
        if "packed" in record:  # a packed file lists them per child
            index = record["packed"]["index"]
            metrics, cost = metrics[index], ckpt["costs"][index]
        return self.ens.stamp({**record, "status": "tuned", "metrics": metrics, "tune": ckpt.get("tune", {}),
                               "cost": cost})

    def save(self, job: Job, trained: Sequence[Trained]) -> list[dict[str, Any]]:
        """Rewrite the children's files (a packed file once, for all its children)."""
        from pat.children import save_child

        records = [self.ens.member(name) for name in job.members]
        tune = to_dict(self.config)
        costs = [{**t.cost, "parent": r.get("parent")} for t, r in zip(trained, records, strict=True)]
        if "packed" in records[0]:
            self._save_packed(records, trained, tune, costs)
        else:
            for record, t, cost in zip(records, trained, costs, strict=True):
                save_child(self.ens.member_path(record), t.model, status="tuned", metrics=t.metrics, tune=tune,
                           cost=cost)
        return [self.ens.stamp({**r, "status": "tuned", "metrics": t.metrics, "tune": tune, "cost": cost})
                for r, t, cost in zip(records, trained, costs, strict=True)]

    def _save_packed(self, records: list[dict[str, Any]], trained: Sequence[Trained], tune: dict[str, Any],
                     costs: list[dict[str, Any]]) -> None:
        from pat.engine.checkpoint import load_checkpoint
        from pat.pack import group, save_packed

        file = self.ens.member_path(records[0])
        header = load_checkpoint(file, mmap=True, argument=f"member {records[0]['name']!r}")
        save_packed(file, group([t.model for t in trained]), [r["name"] for r in records], arch=header["arch"],
                    input_shape=header["input_shape"], recipes=header.get("recipes"), status="tuned",
                    dataset=header.get("dataset"), num_classes=header.get("num_classes"),
                    metrics=[t.metrics for t in trained], tune=tune, costs=costs)


def _jobs(ens: EnsembleDir, config: TuneConfig, data: Dataset, todo: list[dict[str, Any]],
          callbacks: Callable[[str], Iterable[Callback]], ranks: Ranks) -> list[Job]:
    """One job per child; a packed file's children as one; with ``together``, a rank's share as one."""
    index = {record["name"]: i for i, record in enumerate(ens.members)}
    waiting = {record["name"] for record in todo}
    jobs, packed, plain = [], set(), []
    for record in ens.members:
        name = record["name"]
        if name not in waiting:
            jobs.append(Job(name, _unused))  # finished: the runner skips it and records it
        elif "packed" in record:
            if record["file"] not in packed:
                packed.add(record["file"])
                jobs.append(_packed_job(ens, record["file"], config, data, index, callbacks))
        else:
            plain.append(name)
    if config.together and len(plain) > 1:
        shares = [share for share in (plain[r :: ranks.world_size] for r in range(ranks.world_size)) if share]
        return jobs + [_together_job(ens, share, config, data, index, callbacks) for share in shares]
    return jobs + [_child_job(ens, name, config, data, index[name], callbacks) for name in plain]


def _unused(ctx: JobContext) -> list[Trained]:
    raise AssertionError("a finished child is never tuned again")


def _child_job(ens: EnsembleDir, name: str, config: TuneConfig, data: Dataset, index: int,
               callbacks: Callable[[str], Iterable[Callback]]) -> Job:
    def train(ctx: JobContext) -> list[Trained]:
        from pat.children import load_child

        child = load_child(ens.member_path(name))
        # load_child has checked the masks against the weights
        metrics = tune_child(child, masks_of(child), data, config, index=index, callbacks=callbacks(name),
                             resume_path=ctx.partial, resume_extra=ctx.extra)
        return [Trained(child, metrics, cost=child_record(child).cost)]
    return Job(name, train)


def _together_job(ens: EnsembleDir, names: list[str], config: TuneConfig, data: Dataset,
                  index: dict[str, int], callbacks: Callable[[str], Iterable[Callback]]) -> Job:
    """``names`` tuned in one grouped network (one by one where ``"auto"`` finds that faster)."""
    _check_together_step(config)

    def train(ctx: JobContext) -> list[Trained]:
        from pat.children import load_child

        children = [load_child(ens.member_path(name)) for name in names]
        masks = [masks_of(c) for c in children]
        results = tune_together(children, masks, data, config, indices=[index[n] for n in names],
                                callbacks=callbacks(", ".join(names)), resume_path=ctx.partial,
                                resume_extra=ctx.extra)
        if results is None:  # "auto" declined: one by one
            results = [tune_child(c, m, data, config, index=index[n], callbacks=callbacks(n))
                       for c, m, n in zip(children, masks, names, strict=True)]
        return [Trained(c, metrics, cost=child_record(c).cost) for c, metrics in zip(children, results, strict=True)]
    return Job(f"together-{'+'.join(names)}", train, members=tuple(names))


def _packed_job(ens: EnsembleDir, file: str, config: TuneConfig, data: Dataset, index: dict[str, int],
                callbacks: Callable[[str], Iterable[Callback]]) -> Job:
    """The children of one packed file, tuned together as the one network they are."""
    records = sorted((r for r in ens.members if r["file"] == file), key=lambda r: r["packed"]["index"])
    names = [r["name"] for r in records]
    check(config.step == "sgd", f"--step {config.step!r}: the children of packed file {file!r} "
          "are one network and tune together, which takes the plain 'sgd' step only.")

    def train(ctx: JobContext) -> list[Trained]:
        from pat.pack import load_packed, unpack

        children = unpack(load_packed(ens.member_path(records[0]), argument=f"member {names[0]!r}"))
        results = tune_together(children, [None] * len(children), data, replace(config, together=True),
                                indices=[index[n] for n in names], callbacks=callbacks(", ".join(names)),
                                resume_path=ctx.partial, resume_extra=ctx.extra)
        assert results is not None  # together=True never declines
        return [Trained(c, metrics, cost=child_record(c).cost) for c, metrics in zip(children, results, strict=True)]
    return Job(f"packed-{Path(file).stem}", train, members=tuple(names))
