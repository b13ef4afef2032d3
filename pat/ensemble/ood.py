"""Out-of-distribution detection from member logits.

Scores, each oriented so that higher means "more in-distribution" (``p_m``: member m's
softmax, ``p``: their mean, ``H``: entropy in nats):

- ``msp``: ``max_c p`` (Hendrycks & Gimpel 2017, "A Baseline for Detecting Misclassified
  and Out-of-Distribution Examples in Neural Networks").
- ``entropy``: ``-H(p)``.
- ``mutual_information``: ``-(H(p) - mean_m H(p_m))``, minus the members' disagreement
  (Lakshminarayanan et al. 2017; Malinin & Gales 2018); 0 for one member, so members get
  no such score.
- ``energy``: ``mean_m logsumexp(z_m)``, minus the free energy (Liu et al. 2020,
  "Energy-based Out-of-distribution Detection").

Metrics (in-distribution samples are the positives): AUROC, AUPR-in, AUPR-out (OOD as
positives, scores negated) and FPR at 95% TPR, from torchmetrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pat.errors import PatError, check

__all__ = ["ood_scores", "member_ood_scores", "ood_metrics", "ood_report"]


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _check_logits(logits: Tensor, name: str = "logits") -> Tensor:
    if logits.dim() != 3:
        raise PatError(f"{name} must be (M, N, C). Got shape {tuple(logits.shape)}.")
    check(logits.numel() > 0, f"{name} must be non-empty. Got shape {tuple(logits.shape)}.")
    logits = logits.detach().float()
    bad = int((~torch.isfinite(logits)).sum())
    check(bad == 0, f"{name} must be finite. Got {bad} non-finite values.")
    return logits


def ood_scores(logits: Tensor) -> dict[str, Tensor]:
    """Per-sample scores of the mean-combined ensemble (see module docstring).

    Args:
        logits: ``(M, N, C)`` member logits.

    Returns:
        ``{"msp", "entropy", "mutual_information", "energy"}``, each ``(N,)``; higher is
        more in-distribution.
    """
    logits = _check_logits(logits)
    probs = logits.softmax(-1)
    mean = probs.mean(0)
    # clamp: H(mean p) >= mean H(p_m) by concavity; only rounding makes it negative
    info = (_entropy(mean) - _entropy(probs).mean(0)).clamp_min(0)
    return {"msp": mean.max(-1).values, "entropy": -_entropy(mean),
            "mutual_information": -info, "energy": torch.logsumexp(logits, -1).mean(0)}


def member_ood_scores(logits_m: Tensor) -> dict[str, Tensor]:
    """``msp``, ``entropy`` and ``energy`` ``(N,)`` of one member's logits ``(N, C)``."""
    if logits_m.dim() != 2:
        raise PatError(f"logits_m must be (N, C). Got shape {tuple(logits_m.shape)}.")
    scores = ood_scores(logits_m[None])
    del scores["mutual_information"]
    return scores


def _ranks(scores: Tensor) -> Tensor:
    """Scores mapped into [0, 1] keeping order and ties.

    torchmetrics applies a sigmoid to scores outside [0, 1]; for energies above ~37 that
    saturates to 1.0 even in float64 and merges distinct scores into ties.
    """
    values, inverse = torch.unique(scores, return_inverse=True)
    return inverse.double() / max(len(values) - 1, 1)


def _check_score(score: Tensor, name: str) -> None:
    check(score.dim() == 1 and score.numel() > 0,
          f"{name} must be a non-empty 1-D tensor. Got shape {tuple(score.shape)}.")
    bad = int((~torch.isfinite(score)).sum())
    check(bad == 0, f"{name} must be finite. Got {bad} non-finite values.")


def ood_metrics(score_in: Tensor, score_out: Tensor) -> dict[str, float]:
    """How well a score separates in-distribution from OOD samples.

    Args:
        score_in: ``(N_in,)`` scores of in-distribution samples (higher = more in-dist.).
        score_out: ``(N_out,)`` scores of OOD samples.

    Returns:
        ``auroc``; ``aupr_in`` (in-distribution positive); ``aupr_out`` (OOD positive,
        scores negated); ``fpr95``: the fraction of OOD samples scored at or above the
        highest threshold that keeps 95% of in-distribution samples.
    """
    from torchmetrics.functional.classification import (  # slow import
        binary_auroc,
        binary_average_precision,
        binary_roc,
    )

    _check_score(score_in, "score_in")
    _check_score(score_out, "score_out")
    scores = _ranks(torch.cat([score_in.detach(), score_out.detach()]).double().cpu())
    target = torch.cat([torch.ones(len(score_in)), torch.zeros(len(score_out))]).long()
    fpr, tpr, _ = binary_roc(scores, target)
    return {"auroc": float(binary_auroc(scores, target)),
            "aupr_in": float(binary_average_precision(scores, target)),
            "aupr_out": float(binary_average_precision(1 - scores, 1 - target)),
            "fpr95": float(fpr[tpr >= 0.95].min())}


def ood_report(logits_in: Tensor, logits_out: Tensor) -> dict[str, Any]:
    """Every score's :func:`ood_metrics` for the ensemble and for each member alone.

    Args:
        logits_in: ``(M, N_in, C)`` member logits on in-distribution samples.
        logits_out: ``(M, N_out, C)`` the same members' logits on OOD samples.

    Returns:
        ``{"ensemble": {score: metrics}, "members": [{score: metrics}] * M}``; members have
        no ``mutual_information``.
    """
    logits_in = _check_logits(logits_in, "logits_in")
    logits_out = _check_logits(logits_out, "logits_out")
    (m, _, c), (m_out, _, c_out) = logits_in.shape, logits_out.shape
    check(m == m_out, f"logits_out must have the members of logits_in ({m}). Got {m_out}.")
    check(c == c_out, f"logits_out must have the classes of logits_in ({c}). Got {c_out}.")
    ens_in, ens_out = ood_scores(logits_in), ood_scores(logits_out)
    members = []
    for z_in, z_out in zip(logits_in, logits_out, strict=True):
        s_in, s_out = member_ood_scores(z_in), member_ood_scores(z_out)
        members.append({k: ood_metrics(s_in[k], s_out[k]) for k in s_in})
    return {"ensemble": {k: ood_metrics(ens_in[k], ens_out[k]) for k in ens_in}, "members": members}
