"""The member-job runner: what it skips, in which waves it runs, what it saves and records."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat.engine.checkpoint import load_checkpoint, save_checkpoint
from pat.engine.distributed import Ranks
from pat.errors import PatError
from pat.jobs import Job, Trained, member_seed, partial_file, run_jobs, stage_file
from pat.store import EnsembleDir


class Book:
    """A ledger keeping members as tiny files ``<name>.pt`` holding a number."""

    def __init__(self, ens: EnsembleDir, version: int = 1) -> None:
        self.ens, self.version = ens, version

    def signature(self):
        return {"version": self.version}

    def finished(self, job):
        records = []
        for name in job.members:
            path = self.ens.path / f"{name}.pt"
            if not path.is_file():
                return None
            records.append(self.ens.stamp({"name": name, "file": path.name, "status": "trained",
                                           "value": load_checkpoint(path)["value"]}))
        return records

    def save(self, job, trained):
        for name, t in zip(job.members, trained, strict=True):
            save_checkpoint(self.ens.path / f"{name}.pt", {"value": t.metrics["value"]})
        return self.finished(job)


def made(value: float) -> list[Trained]:
    return [Trained(nn.Identity(), {"value": value})]


@pytest.fixture
def ens(tmp_path):
    ens = EnsembleDir.create(tmp_path / "e", arch=None, num_classes=2)
    ens.save()
    return ens


def test_member_seeds_are_distinct_across_neighbouring_runs():
    seeds = {member_seed(seed, i) for seed in range(5) for i in range(50)}
    assert len(seeds) == 250 and member_seed(0, 1) != member_seed(1, 0)


def test_stages_run_first_are_read_by_later_jobs_and_are_dropped_at_the_end(ens):
    ran = []

    def stage(i):
        return lambda ctx: ran.append(f"s{i}") or {"score": torch.tensor(float(i))}

    def member(i):
        return lambda ctx: ran.append(f"m{i}") or made(sum(float(ctx.stage(f"s{j}")["score"]) for j in range(3)) + i)

    jobs = [Job(f"s{i}", stage(i), stage=True) for i in range(3)]
    jobs += [Job(f"m{i}", member(i), after=("s0", "s1", "s2")) for i in range(3)]
    seen = []
    run_jobs(ens, jobs, Book(ens), ranks=Ranks(), on_member=lambda r, skipped: seen.append((r["name"], skipped)))
    assert ran == ["s0", "s1", "s2", "m0", "m1", "m2"]
    assert [(m["name"], m["value"]) for m in EnsembleDir.load(ens.path).members] == [("m0", 3), ("m1", 4), ("m2", 5)]
    assert seen == [("m0", False), ("m1", False), ("m2", False)]
    assert not (ens.path / ".work").exists()  # every member finished: stages and resume states are spent


def test_a_rerun_skips_finished_members_and_only_the_stages_they_still_need(ens):
    ran = []

    def jobs(fail: str | None = None):
        def stage(i):
            return lambda ctx: ran.append(f"s{i}") or {"i": i}

        def member(i):
            def train(ctx):
                ran.append(f"m{i}")
                if f"m{i}" == fail:
                    raise KeyboardInterrupt
                return made(i)
            return train
        return ([Job(f"s{i}", stage(i), stage=True) for i in range(2)]
                + [Job(f"m{i}", member(i), after=("s0", "s1")) for i in range(2)])

    with pytest.raises(KeyboardInterrupt):
        run_jobs(ens, jobs(fail="m1"), Book(ens), ranks=Ranks())
    assert stage_file(ens, "s0").is_file() and (ens.path / "m0.pt").is_file()
    ran.clear()
    run_jobs(ens, jobs(), Book(ens), ranks=Ranks())
    assert ran == ["m1"]  # both stages were kept for it
    stage_file(ens, "s1").parent.mkdir(exist_ok=True)
    (ens.path / "m1.pt").unlink()
    ran.clear()
    run_jobs(ens, jobs(), Book(ens), ranks=Ranks())
    assert ran == ["s0", "s1", "m1"]  # the stages were dropped when all finished: made again for m1 alone
    ran.clear()
    run_jobs(ens, jobs(), Book(ens), ranks=Ranks())
    assert ran == []


def test_a_resume_state_of_other_settings_is_discarded_before_the_job_runs(ens):
    seen = []

    def train(ctx):
        seen.append(ctx.partial.is_file())
        return made(1)

    partial = partial_file(ens, "m")
    partial.parent.mkdir()
    save_checkpoint(partial, {"kind": "train-state", "job": "m", "signature": {"version": 1}})
    run_jobs(ens, [Job("m", train)], Book(ens, version=2), ranks=Ranks())
    assert seen == [False] and not partial.exists()
    (ens.path / "m.pt").unlink()
    partial.parent.mkdir()
    save_checkpoint(partial, {"kind": "train-state", "job": "m", "signature": {"version": 2}})
    run_jobs(ens, [Job("m", train)], Book(ens, version=2), ranks=Ranks())
    assert seen == [False, True]  # the same job and settings: handed to fit to resume


class OneOfTwo(Ranks):
    """A rank of two, run alone: its barriers have no one to wait for (torchrun runs are in test_distributed)."""

    def barrier(self) -> None:
        pass


def test_ranks_share_each_wave_and_rank_zero_records_every_rank_in_job_order(ens):
    ran = []
    jobs = [Job(f"m{i}", lambda ctx, i=i: ran.append(i) or made(i)) for i in range(5)]
    run_jobs(ens, jobs, Book(ens), ranks=OneOfTwo(rank=1, world_size=2))
    assert ran == [1, 3]
    assert EnsembleDir.load(ens.path).members == []  # only rank 0 writes the manifest
    ran.clear()
    for name in ("m1", "m3"):
        (ens.path / f"{name}.pt").unlink()
    run_jobs(ens, jobs, Book(ens), ranks=OneOfTwo(rank=0, world_size=2))
    assert ran == [0, 2, 4]
    assert [m["name"] for m in EnsembleDir.load(ens.path).members] == ["m0", "m2", "m4"]
    Book(ens).save(Job("m3", made), made(3))  # rank 1's files, as it leaves them
    Book(ens).save(Job("m1", made), made(1))
    run_jobs(ens, jobs, Book(ens), ranks=OneOfTwo(rank=0, world_size=2))
    assert ran == [0, 2, 4]  # nothing left to run, and rank 0 records every member in job order
    assert [m["name"] for m in EnsembleDir.load(ens.path).members] == [f"m{i}" for i in range(5)]


@pytest.mark.parametrize("jobs, words", [
    ([Job("a", made), Job("a", made)], "job 'a' is listed twice"),
    ([Job("b", made, after=("a",)), Job("a", made)], "job 'b' reads ['a']"),
])  # fmt: skip
def test_job_lists_that_cannot_run_are_refused_before_any_work(ens, jobs, words):
    with pytest.raises(PatError, match=words.replace("[", r"\[").replace("]", r"\]")):
        run_jobs(ens, jobs, Book(ens), ranks=Ranks())
    assert not (ens.path / ".work").exists()
