"""Selective prediction: risk-coverage curves and AURC.

A model that may abstain answers its most confident samples first (confidence = max
probability); the risk at coverage k/N is the error rate among the k most confident
samples. AURC is the mean risk over k = 1..N; lower is better, 0 for a model without
errors. Excess AURC subtracts the AURC of a perfect ranking with the same number of
errors E, ``(1/N) sum_k max(0, k - (N - E)) / k``, leaving only the ranking's share
(Geifman et al., ICLR 2019 (arXiv 2018), "Bias-Reduced Uncertainty Estimation for Deep
Neural Classifiers").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pat.ensemble.predict import check_probs, combine
from pat.errors import PatError, check

__all__ = ["risk_coverage", "aurc", "excess_aurc", "selective_report"]


def _errors(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence and 0/1 error ``(N,)`` each of ``probs`` ``(N, C)``."""
    if probs.dim() != 2:
        raise PatError(f"probs must be (N, C). Got shape {tuple(probs.shape)}.")
    check(probs.shape[0] > 0,
          f"probs must hold at least one sample. Got shape {tuple(probs.shape)}.")
    probs = check_probs(probs[None], labels)[0]
    conf, pred = probs.max(dim=1)
    return conf, (pred != labels.to(pred.device).long()).double()


def risk_coverage(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Risk-coverage curve, most confident sample first.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` true classes.

    Returns:
        ``coverage`` ``(N,)`` = k/N and ``risk`` ``(N,)`` = error rate among the k most
        confident samples, for k = 1..N (float64). Tied confidences keep their sample order
        (stable sort).
    """
    conf, wrong = _errors(probs, labels)
    order = torch.sort(conf, descending=True, stable=True).indices
    k = torch.arange(1, len(conf) + 1, dtype=torch.float64, device=conf.device)
    return k / len(conf), wrong[order].cumsum(0) / k


def aurc(probs: Tensor, labels: Tensor) -> float:
    """Area under the risk-coverage curve: the mean risk over k = 1..N."""
    return float(risk_coverage(probs, labels)[1].mean())


def excess_aurc(probs: Tensor, labels: Tensor) -> float:
    """:func:`aurc` minus the AURC of a perfect ranking with the same error count (>= 0)."""
    _, wrong = _errors(probs, labels)
    n, e = len(wrong), int(wrong.sum())
    k = torch.arange(1, n + 1, dtype=torch.float64)
    optimal = float(((k - (n - e)).clamp_min(0) / k).mean())
    return aurc(probs, labels) - optimal


def selective_report(probs: Tensor, labels: Tensor) -> dict[str, Any]:
    """AURC of every member of ``probs`` ``(M, N, C)`` and of their mean.

    Returns:
        ``{"members": [aurc] * M, "ensemble": aurc}``.
    """
    probs = check_probs(probs, labels)
    return {"members": [aurc(p, labels) for p in probs], "ensemble": aurc(combine(probs), labels)}
