"""An ensemble directory's children tuned as jobs of the member-job runner.

Children are independent jobs of :func:`pat.jobs.run_jobs`: a directory is tuned child by
child, each saved the moment it finishes, so a rerun skips finished children and resumes an
interrupted one from its last epoch, and under ``torchrun`` the children are sharded across
ranks. The children of a packed file are one job, and with ``together`` each rank's share is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pat.config import TuneConfig, plain_config, to_dict
from pat.data import Dataset
from pat.engine.callbacks import Callback
from pat.engine.distributed import Ranks
from pat.errors import PatError, check
from pat.jobs import Job, JobContext, Ledger, Trained, run_jobs
from pat.records import child_record, masks_of
from pat.store import EnsembleDir
from pat.tuner.child import parent_lr_of, resolve_max_lr, tune_child
from pat.tuner.together import check_together_step, tune_together

__all__ = ["tune_directory", "check_children", "ChildLedger"]


def check_children(ens: EnsembleDir, *, argument: str = "CHILDREN_DIR") -> None:
    """Refuse a directory whose members were not split from a parent (``pat split``).

    A producer's members (``pat pool``, ``pat starsse``, ``pat sharpbalance``) are finished
    when the producer finishes; tuning them as children would fail on the first one with a
    message about its checkpoint kind. Records without a producer (older manifests) pass.
    """
    others = [r for r in ens.members if r.get("producer", "split") != "split"]
    if others:
        producers = sorted({str(r["producer"]) for r in others})
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        made = " and ".join(f"`pat {p}`" for p in producers)
        raise PatError(
            f"{argument} {str(ens.path)!r} holds members made by {made} ({others[0]['name']!r}{more}), "
            "not children of `pat split`; pat tune tunes split children, and a producer's members "
            "are finished (pat eval and pat select use them as they are)."
        )


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
        check_children(ens)
        if ens.manifest.get("num_classes") not in (None, data.num_classes):
            raise PatError(f"--dataset {data.name!r} has {data.num_classes} classes but the children "
                           f"were made for {ens.manifest['num_classes']}.")
        ledger = ChildLedger(ens, config)
        todo = [record for record in ens.members if ledger.record(record["name"]) is None]
        if todo:  # the peak follows the parent's LR: read only when there is work
            ledger.config = resolve_max_lr(config, parent_lr_of(ens.manifest.get("parent")))
        jobs = _jobs(ens, ledger.config, data, todo, callbacks, ranks)
        run_jobs(ens, jobs, ledger, ranks=ranks,
                 on_member=lambda record, skipped: None if skipped else on_done(record))
        return EnsembleDir.load(path)


class ChildLedger(Ledger):
    """Children of an ensemble directory, tuned in place: finished when their status is ``tuned``.

    A child file that says it is tuned while the manifest does not yet (written by another
    rank, or by a run that stopped before its manifest write) counts as finished too.
    """

    def __init__(self, ens: EnsembleDir, config: TuneConfig) -> None:
        self.ens, self.config = ens, config

    def signature(self) -> dict[str, Any]:
        """The tuning config (a resume state of other settings is not continued)."""
        return {"tune": plain_config(self.config)}

    def record(self, name: str) -> dict[str, Any] | None:
        """Child ``name``'s record as tuned (from its file if the manifest lags), or ``None``."""
        from pat.engine.checkpoint import load_checkpoint

        record = self.ens.member(name)
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
    check_together_step(config)

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

