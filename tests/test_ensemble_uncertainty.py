from __future__ import annotations

import pytest
import torch

from pat.ensemble.ood import ood_metrics, ood_report, ood_scores
from pat.ensemble.selective import aurc, risk_coverage, selective_report
from pat.errors import PatError


def _confident(n: int, c: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, n, c, generator=g) * 0.1
    z[:, torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 8.0
    return z


def test_ood_auroc_is_one_on_separable_sets_and_half_on_identical_ones():
    flat = torch.randn(2, 500, 10, generator=torch.Generator().manual_seed(1)) * 0.1
    report = ood_report(_confident(500), flat)
    for score in ("msp", "entropy", "energy"):
        assert report["ensemble"][score]["auroc"] == 1.0
        assert report["ensemble"][score]["fpr95"] == 0.0
        assert report["members"][0][score]["auroc"] == 1.0
    same = ood_report(_confident(4000, seed=2), _confident(4000, seed=3))
    for score in ("msp", "entropy", "energy"):
        assert abs(same["ensemble"][score]["auroc"] - 0.5) < 0.05


def test_mutual_information_is_zero_when_members_agree_and_negative_score_when_not():
    z = torch.randn(1, 50, 4)
    agree = ood_scores(z.expand(3, 50, 4))
    assert torch.allclose(agree["mutual_information"], torch.zeros(50), atol=1e-5)
    disagree = torch.stack([torch.eye(4)[torch.zeros(50, dtype=torch.long)] * 9,
                            torch.eye(4)[torch.ones(50, dtype=torch.long)] * 9])
    assert (ood_scores(disagree)["mutual_information"] < -0.5).all()
    one = ood_scores(z)
    assert torch.allclose(one["energy"], torch.logsumexp(z[0], -1))


def test_ood_metrics_bad_input():
    with pytest.raises(PatError, match="score_out must be"):
        ood_metrics(torch.ones(3), torch.ones(2, 2))
    with pytest.raises(PatError, match="logits must be"):
        ood_scores(torch.ones(3, 4))


def test_aurc_of_a_perfect_ranking_has_its_closed_form():
    n, e, c = 50, 12, 3
    labels = torch.zeros(n, dtype=torch.long)
    probs = torch.zeros(n, c)
    conf = torch.linspace(0.99, 0.6, n)  # decreasing confidence
    probs[:, 0] = conf
    probs[:, 1] = 1 - conf
    probs[n - e:, 0], probs[n - e:, 1] = 1 - conf[n - e:], conf[n - e:]  # the least confident are wrong
    expected = sum(max(0, k - (n - e)) / k for k in range(1, n + 1)) / n
    assert aurc(probs, labels) == pytest.approx(expected)
    coverage, risk = risk_coverage(probs, labels)
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(e / n)
    right = probs.clone()
    right[n - e:] = probs[: e]
    assert aurc(right, labels) == 0.0
    shuffled = probs[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    assert aurc(shuffled, labels) == pytest.approx(expected)  # order of samples is irrelevant


def test_selective_report_has_every_member_and_the_ensemble():
    probs = _confident(40).softmax(-1)
    report = selective_report(probs, probs[0].argmax(-1))
    assert len(report["members"]) == 2 and report["members"][0] == 0.0 and 0 <= report["ensemble"] <= 1
