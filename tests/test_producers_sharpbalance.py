from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from pat.cli import PatGroup
from pat.cli.producers import sharpbalance, sharpness
from pat.config import DataConfig
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint, save_model
from pat.engine.sam import measure_sharpness, per_sample_sharpness
from pat.errors import PatError
from pat.models import create_model
from pat.producers.sharpbalance import SharpBalanceConfig, sam_subsets, train_sharpbalance
from pat.store import EnsembleDir


def scores_with_flat(flat: list[list[int]], n: int) -> torch.Tensor:
    """Member j's scores: its ``flat`` samples lowest, the rest high (distinct values)."""
    s = torch.arange(n, dtype=torch.float32).repeat(len(flat), 1) + 100
    for j, idx in enumerate(flat):
        s[j, idx] = torch.arange(len(idx), dtype=torch.float32)
    return s


def test_subsets_are_others_flat_samples_plus_a_share_of_unclaimed():
    n = 10
    scores = scores_with_flat([[0, 1], [2, 3], [4, 5]], n)
    sub = sam_subsets(scores, 0.2, "others-flat", seed=3)  # k = 2 per member
    claimed = [{0, 1}, {2, 3}, {4, 5}]
    unclaimed = set(range(6, 10))
    owners = {u: [i for i in range(3) if sub[i, u]] for u in unclaimed}
    for i in range(3):
        mine = set(sub[i].nonzero().flatten().tolist())
        others = set().union(*(claimed[j] for j in range(3) if j != i))
        assert mine - unclaimed == others  # its own flat samples are not in its subset
    assert all(len(o) == 1 for o in owners.values())  # each unclaimed sample: exactly one member
    assert sorted(len([u for u in owners if owners[u] == [i]]) for i in range(3)) == [1, 1, 2]
    # the dealing is seeded
    assert torch.equal(sub, sam_subsets(scores, 0.2, seed=3))


def test_overlapping_claims_and_extreme_ratios():
    scores = scores_with_flat([[0, 1], [0, 2]], 6)
    sub = sam_subsets(scores, 2 / 6, seed=0)
    assert sub[0, 0] and sub[0, 2] and not sub[0, 1]  # member 1 claims 0 and 2
    assert sub[1, 0] and sub[1, 1] and not sub[1, 2]
    all_in = sam_subsets(torch.rand(3, 20), 1.0)
    assert bool(all_in.all())
    none = sam_subsets(torch.rand(3, 20), 0.0)  # nothing claimed: a partition of the samples
    assert torch.equal(none.sum(0), torch.ones(20, dtype=torch.long))


def test_others_sharp_and_random_rules():
    scores = -scores_with_flat([[0, 1], [2, 3], [4, 5]], 10)  # now those are the sharpest
    sharp = sam_subsets(scores, 0.2, "others-sharp", seed=1)
    flat = sam_subsets(-scores, 0.2, "others-flat", seed=1)
    assert torch.equal(sharp, flat)
    rand = sam_subsets(scores, 0.2, "random", seed=1)
    same_scores = sam_subsets(scores, 0.2, "others-flat", seed=1)
    assert torch.equal(rand.sum(1), same_scores.sum(1)) and not torch.equal(rand, same_scores)


def test_per_sample_sharpness_equals_a_per_sample_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    model(torch.randn(16, 1, 6, 6))  # give BatchNorm non-trivial running stats
    x, y = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 3, 1])
    got = per_sample_sharpness(model, x, y)
    assert model.training  # flag restored
    model.eval()
    expected = []
    for i in range(5):
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        expected.append(sum((t**2).sum() for t in g))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-7)


def test_measure_sharpness_restores_weights_and_worst_case_rises_with_rho():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    before = [p.detach().clone() for p in model.parameters()]
    small = measure_sharpness(model, batches, rho=0.01, draws=3)
    big = measure_sharpness(model, batches, rho=0.2, draws=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert 0 < small["worst"] < big["worst"]
    with torch.no_grad():
        assert small["loss"] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
    assert measure_sharpness(model, batches, rho=0.2, draws=3) == big  # seeded draws
    with pytest.raises(PatError, match="rho"):
        measure_sharpness(model, batches, rho=0.0)


def config(**kw) -> SharpBalanceConfig:
    base = dict(model="lenet-s", data=DataConfig(dataset="synthetic", batch_size=32), members=2, epochs=2,
                initial_epochs=1, rho=0.1, flat_ratio=0.5, lr=0.05, device="cpu")
    return SharpBalanceConfig(**{**base, **kw})


class Boom(Exception):
    pass


class Counter(Callback):
    def __init__(self, log: list, name: str, fail_at_epoch: int | None = None) -> None:
        self.log, self.name, self.fail_at_epoch = log, name, fail_at_epoch

    def on_step_end(self, state) -> None:
        self.log.append(self.name)

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.fail_at_epoch:
            raise Boom


def test_phase_two_uses_subsets_from_every_members_phase_one_scores(tmp_path, tiny_data, monkeypatch):
    import pat.producers.sharpbalance as sb

    scores, masks = [], []
    real_scores = sb.sharpness_scores
    monkeypatch.setattr(sb, "sharpness_scores", lambda *a, **k: scores.append(real_scores(*a, **k)) or scores[-1])

    class Recording(sb.MixedSAMStep):
        def __init__(self, rho, sam_mask, batches, **kw):
            masks.append(sam_mask.clone())
            super().__init__(rho, sam_mask, batches, **kw)

    monkeypatch.setattr(sb, "MixedSAMStep", Recording)
    out = tmp_path / "sb"
    train_sharpbalance(config(), out, data=tiny_data)
    assert len(scores) == 2 and len(masks) == 2  # both members scored before any phase-2 step
    expected = sam_subsets(torch.stack(scores), 0.5, "others-flat", seed=0)
    assert torch.equal(torch.stack(masks), expected)
    ens = EnsembleDir.load(out)
    assert [m["name"] for m in ens.members] == ["member-0", "member-1"]
    for i, m in enumerate(ens.members):
        assert m["recipe"]["sam_fraction"] == pytest.approx(float(expected[i].float().mean()))
        assert len(load_checkpoint(ens.member_path(m))["history"]) == 2
    assert not (out / ".work").exists()


def test_interrupted_run_resumes_without_redoing_phase_one(tmp_path, tiny_data):
    out, steps = tmp_path / "sb", []
    with pytest.raises(Boom):  # member-0 fails at the end of its phase-2 epoch
        train_sharpbalance(config(), out, data=tiny_data, callbacks=lambda name: [
            Counter(steps, name, fail_at_epoch=1 if name == "member-0" else None)])
    per_epoch = len(tiny_data.loader("train", batch_size=32))
    assert steps.count("member-0") == 2 * per_epoch and steps.count("member-1") == per_epoch
    steps.clear()
    seen = []
    train_sharpbalance(config(), out, data=tiny_data, callbacks=lambda name: [Counter(steps, name)],
                       on_member=lambda r, skipped: seen.append((r["name"], skipped)))
    assert steps == ["member-1"] * per_epoch  # only member-1's phase 2 was left
    assert sorted(seen) == [("member-0", False), ("member-1", False)]
    seen.clear()
    train_sharpbalance(config(), out, data=tiny_data, on_member=lambda r, skipped: seen.append(skipped))
    assert seen == [True, True]


def test_sam_only_and_plain_baselines_differ(tmp_path, tiny_data):
    a = train_sharpbalance(config(mode="sam", epochs=1, members=2), tmp_path / "a", data=tiny_data)
    b = train_sharpbalance(config(mode="plain", epochs=1, members=2), tmp_path / "b", data=tiny_data)
    assert [m["recipe"]["sam_fraction"] for m in a.members] == [1.0, 1.0]
    wa = load_checkpoint(a.member_path("member-0"))["state_dict"]
    wb = load_checkpoint(b.member_path("member-0"))["state_dict"]
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        (dict(rho=0.0), ["rho", "0.0"]),
        (dict(rho=-1.0), ["rho", "-1.0"]),
        (dict(flat_ratio=1.5), ["flat_ratio", "1.5"]),
        (dict(flat_ratio=-0.1), ["flat_ratio", "-0.1"]),
        (dict(members=1), ["members", "1"]),
        (dict(initial_epochs=2), ["initial_epochs", "2"]),
        (dict(subset="middle"), ["middle", "others-flat"]),
    ],
)
def test_bad_config(kw, words):
    with pytest.raises(PatError) as err:
        config(**kw)
    assert all(w in str(err.value) for w in words)


def cli():
    group = PatGroup()
    group.add_command(sharpbalance)
    group.add_command(sharpness)
    return group


def test_cli_bad_input_is_one_error_line(tmp_path):
    result = CliRunner().invoke(cli(), ["sharpbalance", "--dataset", "synthetic", "--members", "1",
                                        "--out", str(tmp_path / "sb")])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "members must be >= 2" in errors[0]
    assert not (tmp_path / "sb").exists()


def test_cli_sharpness_reports_random_and_worst(tmp_path):
    path = tmp_path / "m.pt"
    torch.manual_seed(0)
    save_model(path, create_model("lenet-s", in_channels=1))
    result = CliRunner().invoke(cli(), ["sharpness", str(path), "--dataset", "digits", "--rho", "0.05",
                                        "--max-batches", "2", "--draws", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "worst-case" in result.output and "random" in result.output
    bad = CliRunner().invoke(cli(), ["sharpness", str(path), "--rho", "-1"])
    assert bad.exit_code == 2 and "rho must be positive" in bad.output


def test_indexed_loader_reports_each_batchs_sample_indices(tiny_data):
    from pat.producers.common import indexed_loader

    batches = indexed_loader(tiny_data, batch_size=16, device="cpu", seed=5)
    seen = []
    for x, y in batches:
        assert torch.equal(y, tiny_data.train.y[batches.indices])
        assert x.shape == (len(y), 1, 32, 32) and x.dtype == torch.float32
        seen.append(batches.indices)
    n = len(tiny_data.train.y)
    assert sorted(torch.cat(seen).tolist()) == list(range(n))
    assert not torch.equal(torch.cat(seen), torch.arange(n))  # shuffled


def test_phase_two_continues_from_the_saved_phase_one_stage_not_from_a_leftover_resume_file(tmp_path, tiny_data):
    class StopAtPhaseTwo(Callback):
        def on_fit_start(self, state) -> None:
            if state.step > 0:  # a run that continues phase 1's: phase 2 is starting
                raise Boom

    train_sharpbalance(config(), tmp_path / "whole", data=tiny_data)
    out = tmp_path / "cut"
    with pytest.raises(Boom):
        train_sharpbalance(config(), out, data=tiny_data, callbacks=lambda name: [StopAtPhaseTwo()])
    work = out / ".work"
    assert sorted(p.name for p in work.glob("phase1-*.pt")) == ["phase1-member-0.pt", "phase1-member-1.pt"]
    for partial in work.glob("*.partial.pt"):
        partial.unlink()  # nothing of phase 1 is left but its stages
    train_sharpbalance(config(), out, data=tiny_data)
    for name in ("member-0", "member-1"):
        a = load_checkpoint(tmp_path / "whole" / f"{name}.pt")
        b = load_checkpoint(out / f"{name}.pt")
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
        assert b["cost"]["steps"] == a["cost"]["steps"]  # both phases counted
