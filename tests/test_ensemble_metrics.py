from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from pat.ensemble import (
    MEASURES,
    accuracy,
    accuracy_vs_size,
    brier,
    calibration_bins,
    ece,
    evaluate,
    focal_diversity,
    nll,
    pairwise_disagreement,
    prediction_variance,
)
from pat.errors import PatError


def _pool(m: int = 5, n: int = 120, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(m, n, c, generator=g) * 2
    logits[:, torch.arange(n), labels] += 1.5  # better than chance, far from perfect
    return logits.softmax(-1), labels


def test_one_hot_correct_predictions_are_perfect() -> None:
    labels = torch.tensor([0, 2, 1, 1, 0])
    probs = F.one_hot(labels, 3).float()
    assert accuracy(probs, labels) == 1.0
    assert nll(probs, labels) == pytest.approx(0.0, abs=1e-6)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-7)
    assert brier(probs, labels) == pytest.approx(0.0, abs=1e-7)


def test_ece_of_a_constructed_miscalibrated_set() -> None:
    # 5 samples at confidence 0.9 with 3 right, 5 at confidence 0.7 with 4 right
    conf = torch.tensor([0.9] * 5 + [0.7] * 5)
    right = torch.tensor([1, 1, 1, 0, 0] + [1, 1, 1, 1, 0], dtype=torch.bool)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.where(right, 0, 1)
    by_hand = 0.5 * abs(0.9 - 3 / 5) + 0.5 * abs(0.7 - 4 / 5)
    assert ece(probs, labels) == pytest.approx(by_hand, abs=1e-6)
    acc, mean_conf, count = calibration_bins(probs, labels)
    assert count.sum() == 10 and (count > 0).sum() == 2
    assert float((count / 10 * (acc - mean_conf).abs()).sum()) == pytest.approx(by_hand, abs=1e-6)
    assert accuracy(probs, labels) == pytest.approx(0.7)


def test_nll_and_brier_match_their_definitions() -> None:
    probs, labels = _pool(m=1)
    p = probs[0]
    assert nll(p, labels) == pytest.approx(float(F.nll_loss(p.log(), labels)), rel=1e-5)
    uniform = torch.full((7, 4), 0.25)
    assert brier(uniform, torch.zeros(7, dtype=torch.long)) == pytest.approx(1 - 1 / 4)
    onehot = F.one_hot(labels, 4).float()
    assert brier(p, labels) == pytest.approx(float(((p - onehot) ** 2).sum(1).mean()), rel=1e-6)


def test_identical_members_have_no_diversity() -> None:
    probs, labels = _pool(m=1)
    same = probs.expand(4, -1, -1).clone()
    assert pairwise_disagreement(same).abs().max() == 0
    assert prediction_variance(same) == pytest.approx(0.0, abs=1e-12)
    for measure in MEASURES:
        assert focal_diversity(same, labels, measure=measure) == pytest.approx(1.0), measure
    result = evaluate(same, labels)
    assert result["diversity"]["disagreement"] == 0
    assert result["diversity"]["disagreement_error_ratio"] == 0


def test_focal_scores_of_a_diverse_pool_are_better_than_identical_ones() -> None:
    probs, labels = _pool()
    for measure in MEASURES:
        assert focal_diversity(probs, labels, measure=measure) < 1.0, measure


def _reference_focal(preds, correct, team, measure):
    """Literal per-definition computation, one focal model at a time."""
    from sklearn.metrics import cohen_kappa_score

    scores = []
    for f in team:
        err = ~correct[f]
        if not err.any():
            continue
        p, c = preds[team][:, err], correct[team][:, err]
        size, n = c.shape
        if measure in ("generalized", "kw"):
            fails = (~c).sum(0)
            if measure == "generalized":
                pi = torch.bincount(fails, minlength=size + 1).double() / n
                p1 = sum(i / size * pi[i] for i in range(size + 1))
                p2 = sum(i * (i - 1) / (size * (size - 1)) * pi[i] for i in range(size + 1))
                scores.append(float(p2 / p1))
            else:
                right = size - fails
                scores.append(1 - float((right * (size - right)).sum()) / (n * size**2))
            continue
        pair_scores = []
        for i, j in itertools.combinations(range(size), 2):
            a, b = c[i], c[j]
            n11, n00 = int((a & b).sum()), int((~a & ~b).sum())
            n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
            if measure == "disagreement":
                pair_scores.append(1 - (n10 + n01) / n)
            elif measure == "q":
                den = n11 * n00 + n01 * n10
                pair_scores.append((n11 * n00 - n01 * n10) / den if den else float(n01 + n10 == 0))
            else:
                same_constant = (p[i] == p[i][0]).all() and (p[j] == p[i][0]).all()
                pair_scores.append(1.0 if same_constant else cohen_kappa_score(p[i], p[j]))
        scores.append(sum(pair_scores) / len(pair_scores))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("measure", MEASURES)
def test_focal_diversity_matches_a_literal_computation(measure) -> None:
    probs, labels = _pool(m=5, n=80)
    preds = probs.argmax(-1)
    correct = preds == labels
    for team in ([0, 1], [1, 3, 4], [0, 1, 2, 3, 4]):
        got = focal_diversity(probs, labels, team, measure=measure)
        assert got == pytest.approx(_reference_focal(preds, correct, team, measure), abs=1e-5)


def test_pairwise_disagreement_matrix() -> None:
    probs, _ = _pool()
    d = pairwise_disagreement(probs)
    assert d.shape == (5, 5)
    assert torch.equal(d, d.T) and d.diagonal().abs().max() == 0
    preds = probs.argmax(-1)
    assert d[1, 3] == pytest.approx(float((preds[1] != preds[3]).float().mean()))


def test_evaluate_reports_members_ensemble_and_diversity() -> None:
    probs, labels = _pool()
    result = evaluate(probs, labels, selected=[0, 2, 4])
    assert [m["index"] for m in result["members"]] == [0, 1, 2, 3, 4]
    assert result["members"][1]["accuracy"] == pytest.approx(accuracy(probs[1], labels))
    assert result["ensemble"]["nll"] == pytest.approx(nll(probs[[0, 2, 4]].mean(0), labels))
    div = result["diversity"]
    errors = [1 - result["members"][i]["accuracy"] for i in (0, 2, 4)]
    d = pairwise_disagreement(probs[[0, 2, 4]])
    assert div["disagreement"] == pytest.approx(float(d.sum() / 6))
    assert div["disagreement_error_ratio"] == pytest.approx(div["disagreement"] / (sum(errors) / 3))
    assert div["prediction_variance"] > 0
    weighted = evaluate(probs, labels, selected=[0, 1], weights=[3, 1], combiner="weighted")
    assert weighted["ensemble"]["accuracy"] == pytest.approx(
        accuracy(0.75 * probs[0] + 0.25 * probs[1], labels))
    single = evaluate(probs, labels, selected=[2])
    assert single["diversity"]["disagreement"] is None and single["diversity"]["focal_diversity"] is None
    with pytest.raises(PatError, match="selected must name at least one member"):
        evaluate(probs, labels, selected=[])
    with pytest.raises(PatError, match="outside"):
        evaluate(probs, labels, selected=[7])


def test_accuracy_vs_size() -> None:
    probs, labels = _pool()
    order = [3, 0, 4]
    curve = accuracy_vs_size(probs, labels, order)
    assert curve.shape == (3,)
    for k in range(1, 4):
        assert curve[k - 1] == pytest.approx(accuracy(probs[order[:k]].mean(0), labels))


def test_plots_write_png_files(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from pat.ensemble.plots import accuracy_vs_size_plot, disagreement_heatmap, reliability_diagram

    probs, labels = _pool()
    files = [
        reliability_diagram(probs.mean(0), labels, tmp_path / "rel.png"),
        accuracy_vs_size_plot({"index order": accuracy_vs_size(probs, labels)}, tmp_path / "size.png"),
        disagreement_heatmap(pairwise_disagreement(probs), tmp_path / "d" / "heat.png"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
