from __future__ import annotations

import pytest
import torch

from pat.ensemble.plots import risk_coverage_plot
from pat.ensemble.selective import aurc, excess_aurc, risk_coverage, selective_report
from pat.errors import PatError


def _ranked(n: int, e: int, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities whose e least confident of n samples are the only errors."""
    conf = torch.linspace(0.99, 0.6, n)  # strictly decreasing, all above 1/2
    probs = torch.zeros(n, c)
    probs[:, 0], probs[:, 1] = conf, 1 - conf
    probs[n - e:, 0], probs[n - e:, 1] = 1 - conf[n - e:], conf[n - e:]
    return probs, torch.zeros(n, dtype=torch.long)


def _closed_form(n: int, e: int) -> float:
    return sum(max(0, k - (n - e)) / k for k in range(1, n + 1)) / n


@pytest.mark.parametrize(("n", "e"), [(50, 12), (7, 1), (10, 10)])
def test_aurc_of_a_perfect_ranking_has_its_closed_form(n, e):
    probs, labels = _ranked(n, e)
    assert aurc(probs, labels) == pytest.approx(_closed_form(n, e))
    assert excess_aurc(probs, labels) == pytest.approx(0.0, abs=1e-12)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert aurc(probs[shuffled], labels) == pytest.approx(_closed_form(n, e))


def test_curve_is_coverage_k_over_n_and_running_error_rate():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])  # by confidence: 0.9 right, 0.8 right, 0.7 right, 0.6 wrong
    coverage, risk = risk_coverage(probs, labels)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == [0.0, 0.0, 0.0, 0.25]


def test_ties_keep_sample_order():
    probs = torch.full((3, 2), 0.5)  # all tie; argmax is class 0
    coverage, risk = risk_coverage(probs, torch.tensor([1, 0, 0]))
    assert risk.tolist() == pytest.approx([1.0, 0.5, 1 / 3])


def test_no_errors_give_zero_and_a_bad_ranking_gives_excess():
    probs, labels = _ranked(20, 0)
    assert aurc(probs, labels) == 0.0 and excess_aurc(probs, labels) == 0.0
    probs, labels = _ranked(20, 5)
    errors_first = probs.clone()
    errors_first[15:, 1] = 0.995  # the 5 errors become the most confident samples
    errors_first[15:, 0] = 0.005
    assert aurc(errors_first, labels) > aurc(probs, labels)
    assert excess_aurc(errors_first, labels) > 0.1


def test_selective_report_has_every_member_and_the_mean():
    right, labels = _ranked(30, 0)
    wrong, _ = _ranked(30, 30)
    report = selective_report(torch.stack([right, wrong]), labels)
    assert report["members"] == [0.0, 1.0]
    mean = (right + wrong) / 2  # the ensemble is scored on the members' mean
    assert report["ensemble"] == pytest.approx(aurc(mean, labels))


LABELS3, LABELS4 = torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: aurc(torch.ones(2, 3, 4) / 4, LABELS3), r"probs must be \(N, C\)"),
    (lambda: aurc(torch.ones(0, 3), LABELS3[:0]), "at least one sample"),
    (lambda: risk_coverage(torch.ones(3, 3) / 3, LABELS4), "labels must be"),
    (lambda: risk_coverage(torch.ones(4, 3) / 3, LABELS4 + 3), r"labels must be in \[0, 3\)"),
    (lambda: selective_report(torch.ones(4, 3) / 3, LABELS4), r"must be \(M, N, C\)"),
])
def test_bad_input_is_a_pat_error(call, match):
    with pytest.raises(PatError, match=match):
        call()


def test_risk_coverage_plot_writes_a_png(tmp_path):
    probs, labels = _ranked(40, 6)
    path = risk_coverage_plot({"ranked": risk_coverage(probs, labels)}, tmp_path / "sub" / "rc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PatError, match="curves must hold"):
        risk_coverage_plot({}, tmp_path / "none.png")
