"""Metrics of members and ensembles, computed from cached probabilities.

Definitions (``p``: ``(N, C)`` probabilities, ``y``: labels):

- accuracy: fraction of samples with ``argmax p == y`` (torchmetrics, micro average).
- NLL: ``mean(-log p[y])``, probabilities clamped at 1e-12.
- ECE: 15 equal-width confidence bins over [0, 1], ``sum_b |B_b|/N * |acc_b - conf_b|``
  with confidence = max probability (torchmetrics ``multiclass_calibration_error``, L1;
  Guo et al. 2017, "On Calibration of Modern Neural Networks").
- Brier: ``mean_n sum_c (p_nc - onehot(y)_nc)^2`` (multi-class Brier 1950; range [0, 2]).
- pairwise disagreement: fraction of samples on which two members' argmax differ.
- disagreement-error ratio: mean pairwise disagreement / mean member error.
- prediction variance: mean over samples and classes of the (population) variance of the
  members' probabilities.
- focal diversity: :mod:`pat.ensemble.diversity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from pat.ensemble.diversity import focal_diversity
from pat.ensemble.predict import check_probs, combine
from pat.errors import PatError, check

__all__ = [
    "N_BINS",
    "accuracy",
    "nll",
    "sample_nll",
    "ece",
    "brier",
    "calibration_bins",
    "classification_metrics",
    "pairwise_disagreement",
    "prediction_variance",
    "batch_metrics",
    "team_metrics",
    "accuracy_vs_size",
    "evaluate",
]

N_BINS = 15
_EPS = 1e-12


def _pair(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if probs.dim() != 2:
        raise PatError(f"probs must be (N, C). Got shape {tuple(probs.shape)}.")
    check_probs(probs[None], labels)
    return probs.float(), labels.long()


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``probs`` ``(N, C)`` against ``labels`` ``(N,)``."""
    from torchmetrics.functional.classification import multiclass_accuracy  # slow import

    probs, labels = _pair(probs, labels)
    return float(multiclass_accuracy(probs, labels, num_classes=probs.shape[1], average="micro"))


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    return float(sample_nll(probs, labels).mean())


def sample_nll(probs: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` negative log-likelihood of each sample's true class, for paired comparisons."""
    probs, labels = _pair(probs, labels)
    return -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(_EPS).log()


def ece(probs: Tensor, labels: Tensor, n_bins: int = N_BINS) -> float:
    """Expected calibration error: equal-width confidence bins, L1 (see module docstring)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = _pair(probs, labels)
    return float(multiclass_calibration_error(
        probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score: squared error summed over classes, averaged over samples."""
    probs, labels = _pair(probs, labels)
    onehot = F.one_hot(labels, probs.shape[1]).to(probs)
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def calibration_bins(
    probs: Tensor, labels: Tensor, n_bins: int = N_BINS
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin accuracy, mean confidence and count ``(n_bins,)`` each, for reliability plots.

    Bins are ``[k/n, (k+1)/n)``, the binning of :func:`ece`, so ``sum(count/N * |acc -
    conf|)`` equals it — except that torchmetrics keeps confidences of exactly 1.0 apart
    while this puts them in the last bin.
    """
    probs, labels = _pair(probs, labels)
    conf, pred = probs.max(dim=1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).float()
    hits = torch.bincount(idx, weights=(pred == labels).float(), minlength=n_bins)
    total = torch.bincount(idx, weights=conf, minlength=n_bins)
    safe = count.clamp_min(1)
    return hits / safe, total / safe, count


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """accuracy, nll, ece and brier of one ``(N, C)`` prediction."""
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
            "ece": ece(probs, labels), "brier": brier(probs, labels)}


def pairwise_disagreement(probs: Tensor) -> Tensor:
    """``(M, M)`` matrix: fraction of samples on which members i and j predict differently."""
    preds = check_probs(probs).argmax(dim=-1)  # (M, N)
    return (preds[:, None, :] != preds[None, :, :]).float().mean(dim=-1)


def _mean_off_diagonal(matrix: Tensor) -> float | None:
    m = matrix.shape[0]
    if m < 2:
        return None
    return float((matrix.sum() - matrix.diagonal().sum()) / (m * (m - 1)))


def prediction_variance(probs: Tensor) -> float:
    """Mean over samples and classes of the variance across members (population, ddof 0)."""
    return float(check_probs(probs).var(dim=0, correction=0).mean())


def batch_metrics(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Accuracy and NLL of K predictions at once: ``probs`` ``(K, N, C)`` → two ``(K,)``."""
    k, n, _ = probs.shape
    acc = (probs.argmax(-1) == labels).float().mean(-1)
    true = probs.gather(2, labels.expand(k, n)[..., None]).squeeze(-1)
    return acc, -true.clamp_min(_EPS).log().mean(-1)


def team_metrics(
    probs: Tensor, labels: Tensor, teams: Tensor, *, budget: int = 2**24
) -> tuple[Tensor, Tensor]:
    """Accuracy and NLL of the mean-combined ensemble of each team.

    Args:
        probs: ``(M, N, C)`` member probabilities.
        labels: ``(N,)`` true classes.
        teams: ``(B, S)`` member indices, one team per row.
        budget: elements of ``(b, N, C)`` held at once; teams are processed in chunks.

    Returns:
        ``accuracy`` ``(B,)`` and ``nll`` ``(B,)``.
    """
    _, n, c = probs.shape
    chunk = max(1, budget // max(1, n * c))
    accs, nlls = [], []
    for start in range(0, teams.shape[0], chunk):
        t = teams[start:start + chunk]
        mean = probs[t[:, 0]].clone()
        for s in range(1, t.shape[1]):
            mean += probs[t[:, s]]
        acc, loss = batch_metrics(mean / t.shape[1], labels)
        accs.append(acc)
        nlls.append(loss)
    return torch.cat(accs), torch.cat(nlls)


def accuracy_vs_size(probs: Tensor, labels: Tensor, order: Sequence[int] | None = None) -> Tensor:
    """Accuracy of the mean of the first k members of ``order``, for k = 1..len(order).

    Returns:
        ``(len(order),)`` accuracies (``order`` defaults to ``0..M-1``).
    """
    probs = check_probs(probs, labels)
    order = list(range(probs.shape[0])) if order is None else [int(i) for i in order]
    check(order, "order must name at least one member. Got [].")
    bad = [i for i in order if not 0 <= i < probs.shape[0]]
    check(not bad, f"order holds member indices outside [0, {probs.shape[0]}): {bad}.")
    running = probs[order].cumsum(dim=0)  # (K, N, C); the argmax of a sum is that of a mean
    return (running.argmax(-1) == labels).float().mean(-1)


def evaluate(
    probs: Tensor,
    labels: Tensor,
    *,
    selected: Sequence[int] | None = None,
    weights: Any = None,
    combiner: str = "mean",
    focal_measure: str = "generalized",
) -> dict[str, Any]:
    """Members, ensemble and diversity metrics of one split.

    Args:
        probs: ``(M, N, C)`` member probabilities.
        labels: ``(N,)`` true classes.
        selected: indices of the team (default: every member).
        weights: per selected member, for ``combiner="weighted"``.
        combiner: ``"mean"``, ``"weighted"`` or ``"vote"`` (:func:`combine`).
        focal_measure: the measure of the focal diversity reported.

    Returns:
        ``{"members": [per-member metrics of every member, with "index"],
        "selected": [...], "ensemble": {accuracy, nll, ece, brier},
        "diversity": {disagreement, disagreement_error_ratio, prediction_variance,
        focal_diversity}}``. Diversity is over the selected members; values undefined for a
        single member (or a perfect team's error ratio) are None.
    """
    probs = check_probs(probs, labels)
    labels = labels.long()
    m = probs.shape[0]
    team = list(range(m)) if selected is None else [int(i) for i in selected]
    check(team, "selected must name at least one member. Got [].")
    bad = [i for i in team if not 0 <= i < m]
    check(not bad, f"selected holds member indices outside [0, {m}): {bad}.")
    members = [{"index": i, **classification_metrics(probs[i], labels)} for i in range(m)]
    sub = probs[team]
    ensemble = classification_metrics(combine(sub, combiner, weights), labels)
    disagreement = _mean_off_diagonal(pairwise_disagreement(sub))
    error = sum(1.0 - members[i]["accuracy"] for i in team) / len(team)
    ratio = disagreement / error if disagreement is not None and error > 0 else None
    focal = focal_diversity(sub, labels, measure=focal_measure) if len(team) > 1 else None
    return {
        "members": members,
        "selected": team,
        "ensemble": ensemble,
        "diversity": {
            "disagreement": disagreement,
            "disagreement_error_ratio": ratio,
            "prediction_variance": prediction_variance(sub),
            "focal_diversity": focal,
            "focal_measure": focal_measure,
        },
    }

