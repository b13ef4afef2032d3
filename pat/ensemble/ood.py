"""Out-of-distribution detection from member logits.

Scores, each oriented so that higher means "more in-distribution":

- ``msp``: maximum softmax probability of the mean prediction (Hendrycks & Gimpel 2017).
- ``entropy``: minus the predictive entropy of the mean prediction.
- ``mutual_information``: minus the members' disagreement, ``H(mean p) - mean_m H(p_m)``
  (Lakshminarayanan et al. 2017; Malinin & Gales 2018); zero for one member.
- ``energy``: mean over members of ``logsumexp`` of the logits, i.e. minus the free energy
  (Liu et al. 2020, "Energy-based Out-of-distribution Detection").

Metrics (in-distribution samples are the positives): AUROC, AUPR-in, AUPR-out (OOD as
positives, scores negated) and FPR at 95% TPR, from torchmetrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pat.errors import PatError, check

__all__ = ["ood_scores", "ood_metrics", "ood_report"]


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def ood_scores(logits: Tensor) -> dict[str, Tensor]:
    """``logits`` ``(M, N, C)`` → per-sample scores ``(N,)`` of the mean-combined ensemble."""
    if logits.dim() != 3:
        raise PatError(f"logits must be (M, N, C). Got shape {tuple(logits.shape)}.")
    probs = logits.float().softmax(-1)
    mean = probs.mean(0)
    return {"msp": mean.max(-1).values, "entropy": -_entropy(mean),
            "mutual_information": -(_entropy(mean) - _entropy(probs).mean(0)).clamp_min(0),
            "energy": torch.logsumexp(logits.float(), -1).mean(0)}


def ood_metrics(score_in: Tensor, score_out: Tensor) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR@95%TPR of separating ``score_in`` from ``score_out``."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

    for name, s in (("score_in", score_in), ("score_out", score_out)):
        check(s.dim() == 1 and s.numel() > 0, f"{name} must be a non-empty 1-D tensor. Got shape {tuple(s.shape)}.")
        check(bool(torch.isfinite(s).all()), f"{name} holds non-finite values.")
    scores = torch.cat([score_in, score_out]).double()
    target = torch.cat([torch.ones(len(score_in)), torch.zeros(len(score_out))]).long()
    fpr, tpr, _ = binary_roc(scores, target)
    return {"auroc": float(binary_auroc(scores, target)),
            "aupr_in": float(binary_average_precision(scores, target)),
            "aupr_out": float(binary_average_precision(-scores, 1 - target)),
            "fpr95": float(fpr[tpr >= 0.95].min())}


def ood_report(logits_in: Tensor, logits_out: Tensor) -> dict[str, Any]:
    """Every score's metrics for the ensemble and for each member alone (no MI for one)."""
    ens_in, ens_out = ood_scores(logits_in), ood_scores(logits_out)
    members = []
    for z_in, z_out in zip(logits_in, logits_out, strict=True):
        s_in, s_out = ood_scores(z_in[None]), ood_scores(z_out[None])
        members.append({k: ood_metrics(s_in[k], s_out[k]) for k in s_in if k != "mutual_information"})
    return {"ensemble": {k: ood_metrics(ens_in[k], ens_out[k]) for k in ens_in}, "members": members}
