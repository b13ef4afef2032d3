from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from pat.cli import cli
from pat.ensemble import (
    Ensemble,
    EnsembleDir,
    accuracy,
    apply_temperature,
    deep_ensemble_equivalent,
    fit_temperature,
    nll,
    size_curve,
)
from pat.errors import PatError


def _calibrated_logits(n: int = 3000, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels are drawn from their own softmax: T = 1 is the true temperature."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 3.0
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("t", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(t):
    z, y = _calibrated_logits()
    assert fit_temperature(z * t, y) == pytest.approx(t, rel=0.08)
    # probabilities work the same as logits (log p differs from z by a per-row constant)
    assert fit_temperature((z * t).softmax(1), y) == pytest.approx(fit_temperature(z * t, y), rel=1e-3)


def test_temperature_lowers_nll_of_an_overconfident_set_and_keeps_accuracy():
    z, y = _calibrated_logits(seed=1)
    over = (z * 4).softmax(1)
    t = fit_temperature(over, y)
    fixed = apply_temperature(over, t)
    assert t > 2
    assert nll(fixed, y) < 0.8 * nll(over, y)
    assert accuracy(fixed, y) == accuracy(over, y)
    assert torch.equal(fixed.argmax(1), over.argmax(1))


def test_fit_temperature_bad_input():
    with pytest.raises(PatError, match="scores must be"):
        fit_temperature(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(PatError, match="labels must be in"):
        fit_temperature(torch.zeros(3, 4), torch.tensor([0, 1, 9]))


def _pool(m: int, n: int = 600, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """m independent noisy members over one set of true logits: each a different draw."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, c, generator=g) * 2
    y = torch.multinomial(truth.softmax(1), 1, generator=g).squeeze(1)
    members = torch.stack([truth + 2.0 * torch.randn(n, c, generator=g) for _ in range(m)])
    return members.softmax(-1), y


def test_dee_of_members_drawn_from_the_reference_pool_is_about_their_count():
    probs, y = _pool(8, n=4000)
    val, test, yv, yt = probs[:, :2000], probs[:, 2000:], y[:2000], y[2000:]
    curve = size_curve(val, yv, test, yt, max_subsets=20)
    assert all(curve[i + 1] < curve[i] for i in range(3))  # more members, lower calibrated NLL
    from pat.ensemble import calibrated_nll

    for k in (1, 2, 3, 4):
        team = list(range(k, 2 * k))  # a size-k team of the pool itself
        value = calibrated_nll(val[team].mean(0), yv, test[team].mean(0), yt)
        dee, _ = deep_ensemble_equivalent(value, curve)
        assert abs(dee - k) < 0.35 * k, (k, dee)


def test_dee_interpolates_and_marks_its_bounds():
    curve = [1.0, 0.8, 0.7, 0.65]
    assert deep_ensemble_equivalent(0.9, curve) == (1.5, "")
    assert deep_ensemble_equivalent(0.75, curve) == (2.5, "")
    assert deep_ensemble_equivalent(1.2, curve) == (1.0, "<")
    assert deep_ensemble_equivalent(0.5, curve) == (4.0, ">")


# -- directories and the CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def children(tmp_path_factory, digits_parent) -> str:
    out = tmp_path_factory.mktemp("cal") / "kids"
    runner = CliRunner()
    made = runner.invoke(cli, ["split", "--parent", digits_parent, "--children", "2", "--anti-random",
                               "--out", str(out)])
    assert made.exit_code == 0, made.output
    tuned = runner.invoke(cli, ["tune", str(out), "--epochs", "1", "--dataset", "digits", "--device", "cpu"])
    assert tuned.exit_code == 0, tuned.output
    return str(out)


def test_calibrate_stores_temperatures_and_eval_and_ensemble_use_them(children, digits):
    runner = CliRunner()
    before = runner.invoke(cli, ["eval", children])
    assert before.exit_code == 0 and "pat calibrate" in before.output, before.output
    done = runner.invoke(cli, ["calibrate", children])
    assert done.exit_code == 0, done.output
    record = EnsembleDir.load(children).manifest["calibration"]
    assert set(record["members"]) == {"child-0", "child-1"} and record["split"] == "val"
    assert record["val_nll"]["calibrated"] <= record["val_nll"]["raw"] + 1e-9  # fitted on that split
    shown = runner.invoke(cli, ["eval", children])
    assert shown.exit_code == 0 and "nll_ts" in shown.output, shown.output
    report = json.loads((EnsembleDir.load(children).path / "metrics.json").read_text())
    assert report["calibrated"]["ensemble"]["accuracy"] == report["all"]["ensemble"]["accuracy"]
    raw = runner.invoke(cli, ["eval", children, "--no-calibration"])
    assert raw.exit_code == 0 and "nll_ts" not in raw.output

    ens = Ensemble.load(children)
    x = digits.loader("test", batch_size=64, shuffle=False).__iter__().__next__()[0]
    mean = ens.member_probs(x, calibrated=False).mean(0)
    expected = (mean.log() / record["ensemble"]).softmax(-1)
    assert torch.allclose(ens.predict_proba(x), expected, atol=1e-5)
    assert torch.allclose(ens.predict_proba(x, calibrated=False), mean, atol=1e-6)


def test_stale_calibration_is_refused(tmp_path, children):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(children, copy)
    CliRunner().invoke(cli, ["calibrate", str(copy)])
    member = copy / "child-0.pt"
    member.write_bytes(member.read_bytes())  # same content, rewritten: a new mtime
    result = CliRunner().invoke(cli, ["eval", str(copy)])
    assert result.exit_code == 2 and "run pat calibrate again" in result.output, result.output


def test_calibrate_without_validation_split_is_one_line(children):
    # the members were made with a 10% validation split: another one is refused by name ...
    refused = CliRunner().invoke(cli, ["calibrate", children, "--val-fraction", "0"])
    assert refused.exit_code == 2 and "--val-fraction 0.0 conflicts with 0.1" in refused.output, refused.output
    # ... and with --override-data it is taken, and has nothing to fit on
    result = CliRunner().invoke(cli, ["calibrate", children, "--val-fraction", "0", "--override-data"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "no validation split" in errors[0]


def test_eval_dee_against_a_seed_pool(tmp_path, children):
    pool = tmp_path / "pool"
    made = CliRunner().invoke(cli, ["pool", "--model", "lenet-s", "--dataset", "digits", "--epochs", "1",
                                    "--policies", "one-cycle", "--lrs", "0.1,0.05,0.02", "--batch-size", "64",
                                    "--device", "cpu", "--out", str(pool)])
    assert made.exit_code == 0, made.output
    shown = CliRunner().invoke(cli, ["eval", children, "--dee", str(pool)])
    assert shown.exit_code == 0 and "Deep Ensemble Equivalent" in shown.output, shown.output
    dee = json.loads((EnsembleDir.load(children).path / "metrics.json").read_text())["dee"]
    assert len(dee["reference_curve"]) == 3 and 1.0 <= dee["all"]["dee"] <= 3.0
    assert math.isfinite(dee["all"]["calibrated_nll"])
    itself = CliRunner().invoke(cli, ["eval", children, "--dee", children])
    assert itself.exit_code == 2 and "the ensemble itself" in itself.output


def test_eval_ood_against_synthetic_images_and_bad_shapes(children):
    shown = CliRunner().invoke(cli, ["eval", children, "--ood", "synthetic"])
    assert shown.exit_code == 0 and "OOD" in shown.output, shown.output
    ood = json.loads((EnsembleDir.load(children).path / "metrics.json").read_text())["ood"]
    assert set(ood["ensemble"]) >= {"msp", "entropy", "mutual_information", "energy"}
    assert 0.0 <= ood["ensemble"]["msp"]["auroc"] <= 1.0 and len(ood["members"]) == 2
    bad = CliRunner().invoke(cli, ["eval", children, "--ood", "cifar10", "--data-dir", "/nonexistent"])
    assert bad.exit_code == 2 and len([x for x in bad.output.splitlines() if x.startswith("Error")]) == 1


def test_ood_dataset_of_another_image_shape_is_refused(children, digits):
    from pat.data import load_dataset
    from pat.ensemble.report import evaluate_directory

    with pytest.raises(PatError, match="3-channel 32x32 images"):
        evaluate_directory(children, digits, ood=load_dataset("synthetic"))


@pytest.mark.slow
@pytest.mark.parametrize("producer", ["pool", "starsse", "sharpbalance"])
def test_calibrate_and_eval_work_on_every_producers_directory(tmp_path, digits_parent, producer):
    out = tmp_path / producer
    common = ["--dataset", "digits", "--batch-size", "128", "--device", "cpu", "--out", str(out)]
    args = {"pool": ["pool", "--model", "lenet-s", "--epochs", "1", "--policies", "one-cycle",
                     "--lrs", "0.1,0.05"],
            "starsse": ["starsse", "--pretrained", digits_parent, "--members", "2", "--epochs", "1",
                        "--cycle-epochs", "1"],
            "sharpbalance": ["sharpbalance", "--model", "lenet-s", "--members", "2", "--epochs", "2",
                             "--initial-epochs", "1"]}[producer]
    runner = CliRunner()
    made = runner.invoke(cli, [*args, *common])
    assert made.exit_code == 0, made.output
    done = runner.invoke(cli, ["calibrate", str(out)])
    assert done.exit_code == 0, done.output
    record = EnsembleDir.load(out).manifest["calibration"]
    assert len(record["members"]) == 2 and all(t > 0 for t in record["members"].values())
    shown = runner.invoke(cli, ["eval", str(out)])
    assert shown.exit_code == 0 and "nll_ts" in shown.output, shown.output
