from __future__ import annotations

import json

import pytest
import yaml

from pat.config import RunConfig, from_dict, to_dict
from pat.errors import PatError
from pat.pipeline import demo_config, resolve_budget, run


@pytest.mark.slow
def test_demo_ensemble_beats_its_parent_on_digits_test_split(tmp_path, digits):
    """One seed of the demo: more accurate than its parent, and no worse in NLL than chance explains.

    On test, image by image as on validation (decision 69). At the demo's LR 0.03 (decision 75)
    the ensemble's test NLL was below its parent's on each of seeds 0-4 (0.016-0.027 against
    0.057-0.320, one thread), but at 0.05 one seed was level, so the assertion keeps to what one
    seed carries: not worse beyond chance.
    """
    from pat.ensemble.ensemble import Ensemble
    from pat.ensemble.metrics import sample_nll
    from pat.ensemble.predict import collect_probs
    from pat.pipeline import load_compared

    out = tmp_path / "demo"
    result = run(demo_config(str(out)))
    parent, ensemble, independent = result.rows[0], result.rows[-2], result.rows[-1]
    assert parent["name"] == "parent" and ensemble["name"] == "ensemble (2)"
    assert [r["name"] for r in result.rows[1:-2]] == ["child-0", "child-1"]
    assert independent["name"] == "independent (48 ep)"
    assert ensemble["accuracy"] > parent["accuracy"]
    members = Ensemble.load(out / "children", device="cpu", calibrated=False).members
    probs, labels = collect_probs([load_compared(out / "parent.pt", digits, "cpu")[0], *members],
                                  digits.loader("test", batch_size=512))
    diff = sample_nll(probs[1:].mean(0), labels) - sample_nll(probs[0], labels)
    assert float(diff.mean()) == pytest.approx(ensemble["nll"] - parent["nll"], abs=1e-5)
    assert float(diff.mean()) <= 1.96 * float(diff.std()) / len(diff) ** 0.5
    assert not result.validation["worse"]  # and on validation too, where the run checks it
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["test"][-2]["accuracy"] == ensemble["accuracy"]
    # the resolved config is saved with the outputs and reads back to the same run
    config = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    assert from_dict(RunConfig, config) == resolve_budget(demo_config(str(tmp_path / "demo")), digits)[0]


def test_output_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = to_dict(demo_config(str(out)))
    other["parent"]["epochs"] = 99
    (out / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(PatError, match="holds a run with a different config"):
        run(demo_config(str(out)))
    assert yaml.safe_load((out / "config.yaml").read_text())["parent"]["epochs"] == 99


@pytest.mark.parametrize("lost, won, worse", [(1, 0, False), (3, 1, False), (5, 0, True), (12, 3, True)])
def test_parent_check_calls_a_lower_accuracy_worse_only_beyond_chance(tmp_path, digits, digits_parent,
                                                                       monkeypatch, lost, won, worse):
    """One image of 143 flipping is noise; a paired sign test decides (every image's NLL is held equal)."""
    import torch

    import pat.pipeline as pipeline
    from pat.config import SplitConfig

    split = pipeline.split_to_directory(digits_parent, tmp_path / "kids", SplitConfig(children=2))
    y = digits.val.y
    n, c = len(y), digits.num_classes
    right, wrong = _soft(y, c, 0.4, 0.35), _soft(y, c, 0.4, 0.45)  # the same p(true class), argmax flipped
    parent, ensemble = right.clone(), right.clone()
    ensemble[:lost], parent[lost : lost + won] = wrong[:lost], wrong[lost : lost + won]
    members = torch.stack([ensemble, ensemble])
    monkeypatch.setattr(pipeline, "collect_probs", lambda models, loader: (torch.cat([parent[None], members]), y))
    monkeypatch.setattr(pipeline, "classification_metrics", lambda probs, labels: {
        "accuracy": float((probs.argmax(1) == labels).float().mean()), "nll": 0.1, "ece": 0.0})
    check = pipeline.parent_check(split.path, digits, parent_path=digits_parent, device="cpu")
    assert check["flips"] == {"lost": lost, "won": won} and n > lost + won
    assert check["nll_diff"] == {"mean": 0.0, "se": 0.0}
    assert check["worse"] is worse


def _soft(y, c, true, runner_up):
    """Probabilities with ``true`` on each label, ``runner_up`` on the next class, the rest spread evenly."""
    import torch

    probs = torch.full((len(y), c), (1 - true - runner_up) / (c - 2))
    probs[torch.arange(len(y)), y] = true
    probs[torch.arange(len(y)), (y + 1) % c] = runner_up
    return probs


@pytest.mark.parametrize("shift, spread, worse", [(0.02, 0.0, True), (0.02, 0.5, False), (-0.02, 0.0, False)])
def test_parent_check_calls_a_higher_nll_worse_only_beyond_chance(tmp_path, digits, digits_parent, monkeypatch,
                                                                  shift, spread, worse):
    """The ensemble's NLL against the parent's, image by image: a paired t-test at 5 % decides.

    The ensemble is given each image's parent probability of the true class times exp(-shift),
    with ``spread`` added and taken away on alternate images: a small shift on every image is a
    verdict, the same shift under noise of 0.5 a nat on 143 images is not. The accuracy is held
    equal (the same argmax everywhere).
    """
    import torch

    import pat.pipeline as pipeline
    from pat.config import SplitConfig

    split = pipeline.split_to_directory(digits_parent, tmp_path / "kids", SplitConfig(children=2))
    y = digits.val.y
    n, c = len(y), digits.num_classes
    parent = _soft(y, c, 0.6, 0.1)
    noise = spread * (torch.arange(n) % 2 * 2 - 1).float()  # +spread, -spread, ...
    if n % 2:
        noise[-1] = 0.0
    true = 0.6 * torch.exp(-(shift + noise))
    ensemble = ((1 - true) / (c - 1))[:, None].repeat(1, c)  # below the true class's share: argmax kept
    ensemble[torch.arange(n), y] = true
    members = torch.stack([ensemble, ensemble])
    monkeypatch.setattr(pipeline, "collect_probs", lambda models, loader: (torch.cat([parent[None], members]), y))
    check = pipeline.parent_check(split.path, digits, parent_path=digits_parent, device="cpu")
    assert check["flips"] == {"lost": 0, "won": 0}
    assert check["nll_diff"]["mean"] == pytest.approx(shift, abs=1e-5)
    assert check["ensemble"]["nll"] - check["parent"]["nll"] == pytest.approx(shift, abs=1e-5)
    assert check["worse"] is worse


def test_each_test_row_also_gives_its_nll_after_a_temperature_fitted_on_validation(tmp_path, digits, digits_parent):
    """``nll_ts``: a model whose logits are scaled by 4 has another raw NLL but the same calibrated one,
    the ensemble's temperature is fitted on its averaged softmax, and a run scored on validation has none."""
    from pat.config import SplitConfig
    from pat.engine.checkpoint import load_checkpoint, save_checkpoint
    from pat.ensemble.calibration import calibrated_nll
    from pat.ensemble.ensemble import Ensemble
    from pat.ensemble.predict import collect_probs
    from pat.pipeline import evaluate_run, split_to_directory

    kids = tmp_path / "kids"
    split_to_directory(digits_parent, kids, SplitConfig(children=2))
    sharp = load_checkpoint(digits_parent)
    sharp["state_dict"] = {k: v * 4 if k.startswith("fc.") else v for k, v in sharp["state_dict"].items()}
    save_checkpoint(tmp_path / "sharp.pt", {k: v for k, v in sharp.items() if k not in ("format_version", "pat_version")})
    rows, _ = evaluate_run(kids, digits, parent_path=digits_parent, device="cpu", baseline=("sharp", tmp_path / "sharp.pt"))
    parent, ensemble, scaled = rows[0], rows[-2], rows[-1]
    assert abs(scaled["nll"] - parent["nll"]) > 0.1
    assert scaled["nll_ts"] == pytest.approx(parent["nll_ts"], abs=1e-3)
    members = Ensemble.load(kids, device="cpu").members
    val, val_y = collect_probs(members, digits.loader("val", batch_size=512))
    test, test_y = collect_probs(members, digits.loader("test", batch_size=512))
    assert ensemble["nll_ts"] == pytest.approx(calibrated_nll(val.mean(0), val_y, test.mean(0), test_y), rel=1e-5)
    assert ensemble["nll_ts"] != pytest.approx(rows[1]["nll_ts"], rel=1e-3)  # not a member's
    rows, _ = evaluate_run(kids, digits, parent_path=digits_parent, device="cpu", split="val")
    assert all(r["nll_ts"] is None for r in rows)


def _result(seed: int, parent: float, ensemble: float, one: float):
    from pat.pipeline import RunResult

    def row(name, acc):
        return {"name": name, "accuracy": acc, "nll": 1 - acc, "nll_ts": 0.5 - acc / 2, "ece": 0.1, "brier": 0.2}

    rows = [row("parent", parent), {**row("child-0", 0.5), "ensemble_acc": 0.5}, row("ensemble (2)", ensemble),
            row("independent (48 ep)", one)]
    return RunResult(out=f"seed-{seed}", rows=rows, diversity={}, seconds=1.0)


def test_runs_over_seeds_are_summarized_as_mean_and_standard_error_and_compared_seed_by_seed():
    import statistics

    from pat.pipeline import across_seeds

    runs = [_result(0, 0.90, 0.97, 0.98), _result(1, 0.80, 0.99, 0.96), _result(2, 0.85, 0.98, 0.95)]
    summary = across_seeds(runs)
    assert summary["seeds"] == 3 and [r["name"] for r in summary["rows"]] == ["parent", "ensemble (2)", "independent (48 ep)"]
    mean, se = summary["rows"][2]["accuracy"]
    assert mean == pytest.approx(statistics.fmean([0.98, 0.96, 0.95]))
    assert se == pytest.approx(statistics.stdev([0.98, 0.96, 0.95]) / 3**0.5)
    versus = summary["versus"]["independent (48 ep)"]
    diffs = [-0.01, 0.03, 0.03]
    assert versus["accuracy"][:2] == pytest.approx((statistics.fmean(diffs), statistics.stdev(diffs) / 3**0.5))
    assert versus["accuracy"][2] == 2 and versus["nll_ts"][2] == 2  # higher accuracy, lower NLL is better
    assert versus["ece"][2] == 0  # a tie is not a win
    assert summary["versus"]["parent"]["accuracy"][2] == 3
    with pytest.raises(PatError, match="at least two runs"):
        across_seeds(runs[:1])
