from __future__ import annotations

import pytest

from pat.errors import PatError


@pytest.mark.parametrize("lost, won, worse", [(1, 0, False), (3, 1, False), (5, 0, True), (12, 3, True)])
def test_parent_check_calls_a_lower_accuracy_worse_only_beyond_chance(tmp_path, digits, digits_parent,
                                                                       monkeypatch, lost, won, worse):
    """One image of 143 flipping is noise; a paired sign test decides (every image's NLL is held equal)."""
    import torch

    import pat.comparison as comparison
    from pat.config import SplitConfig
    from pat.splitting import split_to_directory

    split = split_to_directory(digits_parent, tmp_path / "kids", SplitConfig(children=2))
    y = digits.val.y
    n, c = len(y), digits.num_classes
    right, wrong = _soft(y, c, 0.4, 0.35), _soft(y, c, 0.4, 0.45)  # the same p(true class), argmax flipped
    parent, ensemble = right.clone(), right.clone()
    ensemble[:lost], parent[lost : lost + won] = wrong[:lost], wrong[lost : lost + won]
    members = torch.stack([ensemble, ensemble])
    monkeypatch.setattr(comparison, "collect_probs", lambda models, loader: (torch.cat([parent[None], members]), y))
    monkeypatch.setattr(comparison, "classification_metrics", lambda probs, labels: {
        "accuracy": float((probs.argmax(1) == labels).float().mean()), "nll": 0.1, "ece": 0.0})
    check = comparison.parent_check(split.path, digits, parent_path=digits_parent, device="cpu")
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

    import pat.comparison as comparison
    from pat.config import SplitConfig
    from pat.splitting import split_to_directory

    split = split_to_directory(digits_parent, tmp_path / "kids", SplitConfig(children=2))
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
    monkeypatch.setattr(comparison, "collect_probs", lambda models, loader: (torch.cat([parent[None], members]), y))
    check = comparison.parent_check(split.path, digits, parent_path=digits_parent, device="cpu")
    assert check["flips"] == {"lost": 0, "won": 0}
    assert check["nll_diff"]["mean"] == pytest.approx(shift, abs=1e-5)
    assert check["ensemble"]["nll"] - check["parent"]["nll"] == pytest.approx(shift, abs=1e-5)
    assert check["worse"] is worse


def test_each_test_row_also_gives_its_nll_after_a_temperature_fitted_on_validation(tmp_path, digits, digits_parent):
    """``nll_ts``: a model whose logits are scaled by 4 has another raw NLL but the same calibrated one,
    the ensemble's temperature is fitted on its averaged softmax, and a run scored on validation has none."""
    from pat.comparison import evaluate_run
    from pat.config import SplitConfig
    from pat.engine.checkpoint import load_checkpoint, save_checkpoint
    from pat.ensemble.calibration import calibrated_nll
    from pat.ensemble.ensemble import Ensemble
    from pat.ensemble.predict import collect_probs
    from pat.splitting import split_to_directory

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

    from pat.comparison import across_seeds

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


def test_a_run_predicts_each_split_once_and_its_rows_and_parent_check_match_the_one_call_forms(
        tmp_path, digits, digits_parent, monkeypatch):
    """``pat run`` scores the test rows and checks the parent on validation with one Comparison: the
    parent loaded (its statistics recomputed) once, each split predicted once, the same figures."""
    import pat.comparison as comparison
    from pat.config import SplitConfig
    from pat.splitting import split_to_directory

    kids = tmp_path / "kids"
    split_to_directory(digits_parent, kids, SplitConfig(children=2))
    expected_rows, expected_diversity = comparison.evaluate_run(kids, digits, parent_path=digits_parent, device="cpu")
    expected_check = comparison.parent_check(kids, digits, parent_path=digits_parent, device="cpu")
    calls = []
    collect = comparison.collect_probs
    monkeypatch.setattr(comparison, "collect_probs", lambda models, loader: calls.append(len(models)) or collect(models, loader))
    compared = comparison.Comparison(kids, digits, parent_path=digits_parent, device="cpu")
    rows, diversity = compared.rows()
    check = compared.parent_check()
    assert calls == [3, 3]  # test, then validation (for the temperatures); the check reuses it
    assert rows == expected_rows and diversity == expected_diversity
    assert check == expected_check and check["members"] == 2
