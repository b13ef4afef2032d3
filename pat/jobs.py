"""One runner for every member job: skip, resume, shard, save, record.

The tuner and every producer (LR pool, StarSSE, SharpBalance) describe their work as a list
of :class:`Job` — a name, the members it writes, the jobs whose results it reads, and a
function that trains — and hand it to :func:`run_jobs` with a :class:`Ledger`, which says how
a finished job is recognised and how its result is written. The runner does the rest, one
way for all of them:

- **skip**: a job whose members the ledger finds finished is not run again (nor is a stage
  that no unfinished job needs);
- **resume**: each job trains with ``fit(resume_path=ctx.partial, resume_extra=ctx.extra)``,
  so an interrupted job continues from its last epoch; a resume state left by other settings
  is discarded first;
- **shard**: jobs run in waves (a job waits for the jobs it reads); each wave is split across
  torchrun ranks (:meth:`pat.engine.distributed.Ranks.shard`) and the ranks meet after it;
- **save**: members through the ledger (atomically); *stages* — a job's result that later
  jobs read but that is no member, such as a SharpBalance member after its first phase — as
  ``<dir>/.work/<name>.pt``, kept until every member is finished;
- **record**: rank 0 puts each of its members into ``ensemble.json`` as it finishes, and after
  the last wave every rank's members, read back from their files, in job order.

The same jobs also run in memory (:func:`run_in_memory`: no directory, nothing skipped or
kept), which is how the producers' Python API returns members as modules, like
:func:`pat.split` and :func:`pat.tune` do. Every member's seeds come from one rule,
:func:`member_seed`.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pat.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from pat.engine.distributed import Ranks
from pat.errors import PatError, check
from pat.store import EnsembleDir

__all__ = ["Job", "JobContext", "Trained", "Ledger", "run_jobs", "run_in_memory", "member_seed", "work_dir",
           "stage_file"]


def member_seed(seed: int, index: int) -> int:
    """The seed of member ``index`` of a run seeded ``seed``: its initialisation, data order and dropout.

    Distinct for every ``(seed, index)`` with ``index < 100_003``, so runs with neighbouring
    seeds share no member (``seed + index`` would give run 0's member 1 run 1's member 0).
    """
    return seed * 100_003 + index


@dataclass
class Trained:
    """One member as a job's training left it."""

    model: nn.Module
    metrics: dict[str, Any]
    cost: dict[str, Any] | None = None  # :func:`pat.engine.cost.fit_cost` record
    history: list[dict[str, float]] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None  # the member it started from, if any


@dataclass(frozen=True)
class JobContext:
    """What the runner gives a job's ``train`` function: where to keep its state, and earlier results.

    ``partial`` and ``extra`` are ``fit``'s ``resume_path`` and ``resume_extra`` (``None`` and
    ``{}`` in memory, where nothing is kept); :meth:`stage` and :meth:`member` give the results
    of the jobs named in ``after``.
    """

    partial: Path | None
    extra: dict[str, Any]
    stages: Callable[[str], dict[str, Any]]
    members: Callable[[str], nn.Module]

    def stage(self, name: str) -> dict[str, Any]:
        """The result of stage job ``name``."""
        return self.stages(name)

    def member(self, name: str) -> nn.Module:
        """A fresh copy of member ``name``'s model, to train on from where it ended."""
        return self.members(name)


@dataclass(frozen=True)
class Job:
    """A unit of work: trains the members ``members`` (or, as a stage, a result for later jobs).

    ``train`` returns one :class:`Trained` per member, in the order of ``members``; a stage's
    returns a plain dict of tensors and containers, kept as ``<dir>/.work/<name>.pt``.
    """

    name: str
    train: Callable[[JobContext], Any]
    members: tuple[str, ...] = ()  # default (name,); a stage has none
    after: tuple[str, ...] = ()  # jobs whose results (members or stages) this one reads
    stage: bool = False

    def __post_init__(self) -> None:
        if not self.stage and not self.members:
            object.__setattr__(self, "members", (self.name,))
        check(not (self.stage and self.members), f"job {self.name!r}: a stage writes no members.")


class Ledger:
    """How one kind of job output is recognised as finished and written.

    A ledger says what a finished member looks like (:meth:`record`) and how to write one
    (:meth:`save`); a job is finished when all its members are.
    """

    def signature(self) -> dict[str, Any]:
        """Plain data naming the settings a result must have been made with to count."""
        raise NotImplementedError

    def record(self, name: str) -> dict[str, Any] | None:
        """Member ``name``'s manifest record if it is finished with these settings, else ``None``."""
        raise NotImplementedError

    def finished(self, job: Job) -> list[dict[str, Any]] | None:
        """The manifest records of ``job``'s members if all are finished."""
        records = [self.record(name) for name in job.members]
        return None if any(r is None for r in records) else records  # type: ignore[return-value]

    def save(self, job: Job, trained: Sequence[Trained]) -> list[dict[str, Any]]:
        """Write ``job``'s members atomically; returns their (stamped) manifest records."""
        raise NotImplementedError


def work_dir(ens: EnsembleDir) -> Path:
    """``<dir>/.work``: resume states and stages of an unfinished run; removed when it is done."""
    return ens.path / ".work"


def stage_file(ens: EnsembleDir, name: str) -> Path:
    """Where stage job ``name``'s result is kept until every member is finished."""
    return work_dir(ens) / f"{name}.pt"


def partial_file(ens: EnsembleDir, name: str) -> Path:
    return work_dir(ens) / f"{name}.partial.pt"


def _stage_done(ens: EnsembleDir, job: Job, signature: dict[str, Any]) -> bool:
    try:
        ckpt = load_checkpoint(stage_file(ens, job.name), mmap=True)
    except PatError:
        return False  # missing or unreadable: run it again
    return ckpt.get("kind") == "stage" and ckpt.get("job") == job.name and ckpt.get("signature") == signature


def _discard_stale(partial: Path, extra: dict[str, Any]) -> None:
    """Remove a resume state written by another job or with other settings."""
    if not partial.is_file():
        return
    try:
        ckpt = load_checkpoint(partial, argument="resume state", mmap=True)
        same = ckpt.get("job") == extra["job"] and ckpt.get("signature") == extra["signature"]
    except PatError:
        same = False
    if not same:
        partial.unlink()


def _plan(jobs: Sequence[Job], done: Mapping[str, bool]) -> list[list[Job]]:
    """The jobs to run, in waves: a job runs in the wave after the last job it needs."""
    required: set[str] = set()
    needed: list[Job] = []
    for job in reversed(jobs):  # a stage is needed only by a job that is itself needed
        if not done[job.name] and (not job.stage or job.name in required):
            needed.append(job)
            required.update(job.after)
    depth: dict[str, int] = {}
    for job in reversed(needed):  # jobs come after the jobs they read
        depth[job.name] = 1 + max((depth[d] for d in job.after if d in depth), default=-1)
    waves: list[list[Job]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for job in reversed(needed):
        waves[depth[job.name]].append(job)
    return waves


def _check_jobs(jobs: Sequence[Job]) -> None:
    seen: set[str] = set()
    for job in jobs:
        check(job.name not in seen, f"job {job.name!r} is listed twice.")
        missing = [d for d in job.after if d not in seen]
        check(not missing, f"job {job.name!r} reads {missing}, which are not jobs listed before it.")
        seen.add(job.name)


def run_jobs(
    ens: EnsembleDir,
    jobs: Sequence[Job],
    ledger: Ledger,
    *,
    ranks: Ranks,
    on_member: Callable[[dict[str, Any], bool], None] | None = None,
) -> EnsembleDir:
    """Run the unfinished ``jobs`` into the ensemble directory ``ens`` (see the module doc).

    Every rank calls it with the same jobs. ``on_member(record, skipped)`` is called on the
    rank that ran (or, for a finished member, would have run) each member's job.

    Returns:
        ``ens`` with its manifest as rank 0 wrote it (other ranks: as they loaded it).
    """
    _check_jobs(jobs)
    signature = ledger.signature()
    finished = {job.name: None if job.stage else ledger.finished(job) for job in jobs}
    done = {job.name: _stage_done(ens, job, signature) if job.stage else finished[job.name] is not None
            for job in jobs}
    waves = _plan(jobs, done)
    ranks.barrier()  # every rank has planned before any rank writes
    for job in ranks.shard([job for job in jobs if finished[job.name] is not None]):
        for record in finished[job.name] or []:
            if on_member is not None:
                on_member(record, True)
    known = {name: records for name, records in finished.items() if records is not None}
    for wave in waves:
        for job in ranks.shard(wave):
            records = _run(ens, job, ledger, signature, ranks, on_member)
            if records is not None:
                known[job.name] = records
        ranks.barrier()  # the next wave reads this one's results
    if ranks.is_main:
        _record_all(ens, jobs, ledger, known)
    ranks.barrier()
    return ens


def _run(ens: EnsembleDir, job: Job, ledger: Ledger, signature: dict[str, Any], ranks: Ranks,
         on_member: Callable[[dict[str, Any], bool], None] | None) -> list[dict[str, Any]] | None:
    """Run one job; returns its members' records (``None`` for a stage)."""
    partial = partial_file(ens, job.name)
    extra = {"job": job.name, "signature": signature}
    partial.parent.mkdir(parents=True, exist_ok=True)
    _discard_stale(partial, extra)

    def stage(name: str) -> dict[str, Any]:  # tensors memory-mapped: a stage may be a whole run's state
        return load_checkpoint(stage_file(ens, name), argument=f"stage {name!r}", mmap=True)["result"]

    def member(name: str) -> nn.Module:  # a member job's file is <dir>/<name>.pt
        return load_model(ens.path / f"{name}.pt", argument=f"member {name!r}")[0]

    result = job.train(JobContext(partial=partial, extra=extra, stages=stage, members=member))
    records = None
    if job.stage:
        save_checkpoint(stage_file(ens, job.name), {"kind": "stage", "job": job.name, "signature": signature,
                                                    "result": result})
    else:
        check(len(result) == len(job.members),
              f"job {job.name!r} trained {len(result)} members for {len(job.members)} names.")
        records = ledger.save(job, result)
        if ranks.is_main:  # the others' are recorded from their files after the last wave
            for record in records:
                ens.upsert_member(record)
            ens.save()
        for record in records:
            if on_member is not None:
                on_member(record, False)
    partial.unlink(missing_ok=True)
    return records


def _record_all(ens: EnsembleDir, jobs: Sequence[Job], ledger: Ledger,
                known: Mapping[str, list[dict[str, Any]]]) -> None:
    """Rank 0, after every rank's share: all finished members in the manifest, in job order.

    ``known`` holds the records of the jobs finished before the run and of those this rank
    ran; only the others' are read back from their files.
    """
    order = [name for job in jobs for name in job.members]
    complete = True
    for job in jobs:
        if job.stage:
            continue
        records = known[job.name] if job.name in known else ledger.finished(job)
        complete = complete and records is not None
        for record in records or []:
            ens.upsert_member(record)
    position = {name: k for k, name in enumerate(order)}
    ens.manifest["members"] = sorted(ens.members, key=lambda r: position.get(r["name"], len(position)))
    ens.save()
    if complete:
        shutil.rmtree(work_dir(ens), ignore_errors=True)  # resume states and stages are spent


def run_in_memory(jobs: Sequence[Job]) -> dict[str, Trained]:
    """Run every job in order in this process, with nothing read from or written to disk.

    Returns:
        ``{member name: Trained}`` in job order (stages are used and dropped).
    """
    _check_jobs(jobs)
    stages: dict[str, dict[str, Any]] = {}
    members: dict[str, Trained] = {}
    ctx = JobContext(partial=None, extra={}, stages=stages.__getitem__,
                     members=lambda name: copy.deepcopy(members[name].model))  # its own copy to train
    for job in jobs:
        result = job.train(ctx)
        if job.stage:
            stages[job.name] = result
            continue
        check(len(result) == len(job.members),
              f"job {job.name!r} trained {len(result)} members for {len(job.members)} names.")
        members.update(zip(job.members, result, strict=True))
    return members
