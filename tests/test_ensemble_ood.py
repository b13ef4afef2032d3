from __future__ import annotations

import pytest
import torch

from pat.ensemble.ood import member_ood_scores, ood_metrics, ood_report, ood_scores
from pat.errors import PatError

NAN = float("nan")


def _confident(m: int, n: int, c: int = 10, seed: int = 0) -> torch.Tensor:
    """``(m, n, c)`` logits with one class 8 above near-zero noise: one-hot-ish softmax."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, c, generator=g) * 0.1
    z[:, torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 8.0
    return z


def _flat(m: int, n: int, c: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, n, c, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_separable_in_and_out_give_auroc_one_and_fpr95_zero():
    report = ood_report(_confident(3, 300), _flat(3, 200))
    assert set(report["ensemble"]) == {"msp", "entropy", "mutual_information", "energy"}
    assert len(report["members"]) == 3 and set(report["members"][0]) == {"msp", "entropy", "energy"}
    for scores in [report["ensemble"], *report["members"]]:
        for name in ("msp", "entropy", "energy"):
            # one swapped pair of the 300 x 200 would cost 1.7e-5; float32 rounding costs 6e-8
            assert scores[name]["auroc"] == pytest.approx(1.0, abs=1e-6) and scores[name]["fpr95"] == 0.0, name
            assert scores[name]["aupr_in"] == pytest.approx(1.0) == scores[name]["aupr_out"], name


def test_identically_distributed_in_and_out_give_auroc_near_half():
    report = ood_report(_confident(2, 4000, seed=2), _confident(2, 4000, seed=3))
    for name, metrics in report["ensemble"].items():
        assert abs(metrics["auroc"] - 0.5) < 0.05, name
        assert 0.9 < metrics["fpr95"] <= 1.0, name


def test_metrics_do_not_saturate_on_large_scores():
    # torchmetrics would squash these through a sigmoid, which rounds them all to 1.0
    metrics = ood_metrics(torch.tensor([50.0, 51.0, 60.0]), torch.tensor([40.0, 41.0]))
    assert metrics["auroc"] == 1.0 and metrics["fpr95"] == 0.0
    assert metrics["aupr_in"] == pytest.approx(1.0) == metrics["aupr_out"]
    flipped = ood_metrics(torch.tensor([40.0, 41.0]), torch.tensor([50.0, 51.0, 60.0]))
    assert flipped["auroc"] == 0.0 and flipped["fpr95"] == 1.0


def test_fpr95_counts_ood_samples_at_or_above_the_threshold():
    score_in = torch.arange(100.0)  # keeping 95% of them puts the threshold at 5
    score_out = torch.tensor([5.0, 4.9, 7.0, -1.0])  # 5 ties the threshold and counts
    assert ood_metrics(score_in, score_out)["fpr95"] == 0.5


def test_mutual_information_is_zero_when_members_agree_and_positive_when_not():
    z = torch.randn(1, 50, 4, generator=torch.Generator().manual_seed(0))
    agree = ood_scores(z.expand(3, 50, 4))["mutual_information"]
    assert torch.allclose(agree, torch.zeros(50), atol=1e-5)
    labels = torch.arange(50) % 4
    disagree = torch.stack([9 * torch.eye(4)[labels], 9 * torch.eye(4)[(labels + 1) % 4]])
    assert (ood_scores(disagree)["mutual_information"] < -0.5).all()  # MI > 0, near log 2


def test_energy_of_one_member_is_its_logsumexp():
    z = torch.randn(30, 7, generator=torch.Generator().manual_seed(4)) * 5
    assert torch.allclose(member_ood_scores(z)["energy"], torch.logsumexp(z, -1))
    assert torch.allclose(ood_scores(z[None])["energy"], torch.logsumexp(z, -1))
    ens = ood_scores(torch.stack([z, 2 * z]))["energy"]
    assert torch.allclose(ens, (torch.logsumexp(z, -1) + torch.logsumexp(2 * z, -1)) / 2)


def test_member_scores_match_a_one_member_ensemble():
    z = torch.randn(20, 5, generator=torch.Generator().manual_seed(5))
    member, ensemble = member_ood_scores(z), ood_scores(z[None])
    assert set(member) == {"msp", "entropy", "energy"}
    for name in member:
        assert torch.equal(member[name], ensemble[name])
    assert torch.allclose(member["msp"], z.softmax(-1).max(-1).values)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: ood_metrics(torch.ones(3), torch.ones(2, 2)), "score_out must be a non-empty 1-D"),
    (lambda: ood_metrics(torch.ones(0), torch.ones(2)), "score_in must be a non-empty 1-D"),
    (lambda: ood_metrics(torch.tensor([1.0, NAN]), torch.ones(2)), "score_in must be finite"),
    (lambda: ood_scores(torch.ones(3, 4)), r"logits must be \(M, N, C\)"),
    (lambda: ood_scores(torch.full((1, 2, 3), float("inf"))), "logits must be finite"),
    (lambda: member_ood_scores(torch.ones(2, 3, 4)), r"logits_m must be \(N, C\)"),
    (lambda: ood_report(torch.ones(2, 5, 3), torch.ones(3, 5, 3)), "must have the members"),
    (lambda: ood_report(torch.ones(2, 5, 3), torch.ones(2, 5, 4)), "must have the classes"),
])
def test_bad_input_is_a_pat_error(call, match):
    with pytest.raises(PatError, match=match):
        call()
