"""Selective prediction: risk-coverage curves and AURC.

A model that may abstain answers its most confident samples first; the risk at coverage
k/N is the error rate among the k most confident samples. AURC is the mean risk over
k = 1..N (Geifman et al. 2018, "Bias-Reduced Uncertainty Estimation for Deep Neural
Classifiers"): lower is better, 0 for a model without errors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pat.ensemble.predict import check_probs, combine

__all__ = ["risk_coverage", "aurc", "selective_report"]


def risk_coverage(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``probs`` ``(N, C)`` → ``(coverage (N,), risk (N,))``, most confident sample first."""
    probs = check_probs(probs[None], labels)[0]
    conf, pred = probs.max(dim=1)
    order = torch.sort(conf, descending=True, stable=True).indices
    errors = (pred[order] != labels.long()[order]).double().cumsum(0)
    k = torch.arange(1, len(labels) + 1, dtype=torch.float64)
    return k / len(labels), errors / k


def aurc(probs: Tensor, labels: Tensor) -> float:
    """Area under the risk-coverage curve: the mean risk over k = 1..N."""
    return float(risk_coverage(probs, labels)[1].mean())


def selective_report(probs: Tensor, labels: Tensor) -> dict[str, Any]:
    """AURC of every member of ``probs`` ``(M, N, C)`` and of their mean."""
    probs = check_probs(probs, labels)
    return {"members": [aurc(p, labels) for p in probs], "ensemble": aurc(combine(probs), labels)}
