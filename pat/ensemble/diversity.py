"""Focal diversity of a team: the EnsembleBench measures.

For each member of the team taken as the *focal* model, keep the samples the focal model
gets wrong and compute a diversity measure of the whole team on those samples; the focal
diversity is the mean over focal models. A team whose other members are right where the
focal model is wrong scores as diverse.

Every measure here is oriented so that LOWER = MORE DIVERSE, and 1.0 is the worst value
(members that fail together and predict alike):

================  =============================================================  =========
measure           score on the focal samples                                     range
================  =============================================================  =========
``generalized``   1 - GD; GD = 1 - p(2)/p(1), p(k) = chance that k members drawn  [0, 1]
                  without replacement all fail (Partridge & Krzanowski 1997)
``kw``            1 - KW; KW = mean over samples of l (L - l) / L^2, l = members   [0.75, 1]
                  right, L = team size (Kohavi & Wolpert 1996)
``disagreement``  1 - mean pairwise binary disagreement (one right, one wrong)   [0, 1]
``kappa``         mean pairwise Cohen's kappa of the predicted labels; 1 when    [-1, 1]
                  both members always predict the same single class
``q``             mean pairwise Yule's Q of right/wrong; 1 when a pair never     [-1, 1]
                  disagrees, 0 when Q's denominator is 0 otherwise
================  =============================================================  =========

The pairwise measures average over all pairs of the team, the focal model included.
Unlike EnsembleBench, which averages three draws of 100 focal samples, all of the focal
model's mistakes are used (the result is exact and needs no seed). A focal model without
mistakes contributes nothing; a team none of whose members errs scores 1.0.

References:
    Wu, Liu et al., "Boosting Ensemble Accuracy by Revisiting Ensemble Diversity Metrics",
    CVPR 2021.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from pat.ensemble.predict import check_probs
from pat.errors import check

__all__ = ["MEASURES", "WORST", "focal_scores", "focal_diversity"]

MEASURES = ("generalized", "kw", "disagreement", "kappa", "q")
WORST = 1.0
_PAIRWISE = ("disagreement", "kappa", "q")


def _pair_tables(preds: Tensor, correct: Tensor, measure: str, num_classes: int) -> Tensor:
    """``T[f, i, j]``: the pairwise score of members i, j on focal model f's mistakes (NaN if none)."""
    m = preds.shape[0]
    out = torch.full((m, m, m), float("nan"))
    for f in range(m):
        err = ~correct[f]
        n = int(err.sum())
        if n == 0:
            continue
        if measure == "kappa":
            p = preds[:, err]
            agree = (p[:, None, :] == p[None, :, :]).float().mean(-1)
            freq = F.one_hot(p, num_classes).float().mean(1)  # (M, C) label frequencies
            chance = freq @ freq.T
            # chance == 1 only when both members always predict one and the same class.
            out[f] = torch.where(chance < 1 - 1e-9, (agree - chance) / (1 - chance).clamp_min(1e-9),
                                 torch.ones_like(agree))
            continue
        c = correct[:, err].float()
        n11 = c @ c.T  # both right
        n10 = c @ (1 - c).T  # i right, j wrong
        n01 = n10.T
        n00 = n - n11 - n10 - n01
        if measure == "disagreement":
            out[f] = 1 - (n10 + n01) / n
        else:  # Yule's Q
            den = n11 * n00 + n01 * n10
            undefined = torch.where(n01 + n10 == 0, 1.0, 0.0)
            out[f] = torch.where(den > 0, (n11 * n00 - n01 * n10) / den.clamp_min(1), undefined)
    return out


def focal_scores(
    preds: Tensor,
    correct: Tensor,
    teams: Tensor,
    *,
    measure: str = "generalized",
    num_classes: int | None = None,
    budget: int = 2**24,
) -> Tensor:
    """Focal diversity of many teams at once (lower = more diverse).

    Args:
        preds: ``(M, N)`` predicted labels of every member.
        correct: ``(M, N)`` bool, ``preds == labels``.
        teams: ``(B, S)`` member indices, S >= 2.
        measure: one of :data:`MEASURES`.
        num_classes: needed by ``"kappa"`` (default: ``preds.max() + 1``).
        budget: elements of ``(b, S, N)`` held at once; teams are processed in chunks.

    Returns:
        ``(B,)`` float scores.
    """
    check(measure in MEASURES, f"measure must be one of {list(MEASURES)}. Got {measure!r}.")
    b_total, size = teams.shape
    check(size >= 2, f"focal diversity needs teams of at least 2 members. Got {size}.")
    if measure in _PAIRWISE:
        c = num_classes if num_classes is not None else int(preds.max()) + 1
        table = _pair_tables(preds, correct, measure, c)
        pairs = torch.tensor(list(itertools.combinations(range(size), 2)))
        i, j = teams[:, pairs[:, 0]], teams[:, pairs[:, 1]]  # (B, P)
        per_focal = torch.stack([table[teams[:, s, None], i, j].mean(-1) for s in range(size)], 1)
    else:
        fails = (~correct).float()
        chunk = max(1, budget // max(1, size * preds.shape[1]))
        parts = []
        for start in range(0, b_total, chunk):
            t = teams[start:start + chunk]
            team_fails = fails[t]  # (b, S, N)
            lost = team_fails.sum(1)  # members wrong per sample, (b, N)
            scores = []
            for s in range(size):
                mask = team_fails[:, s]  # the focal model's mistakes
                n = mask.sum(-1)
                if measure == "generalized":
                    p1 = (mask * lost).sum(-1) / size
                    p2 = (mask * lost * (lost - 1)).sum(-1) / (size * (size - 1))
                    score = p2 / p1.clamp_min(1e-12)  # 1 - GD
                else:
                    right = size - lost
                    score = 1 - (mask * right * lost).sum(-1) / (n.clamp_min(1) * size**2)
                scores.append(torch.where(n > 0, score, float("nan")))
            parts.append(torch.stack(scores, 1))
        per_focal = torch.cat(parts)
    return per_focal.nanmean(1).nan_to_num(WORST)


def focal_diversity(
    probs: Tensor,
    labels: Tensor,
    team: Sequence[int] | None = None,
    *,
    measure: str = "generalized",
) -> float:
    """Focal diversity of one team (default: all members) of ``probs`` ``(M, N, C)``."""
    probs = check_probs(probs, labels)
    if team is not None:
        team = [int(i) for i in team]
        bad = [i for i in team if not 0 <= i < probs.shape[0]]
        check(not bad, f"team holds member indices outside [0, {probs.shape[0]}): {bad}.")
        probs = probs[team]
    preds = probs.argmax(-1)
    scores = focal_scores(preds, preds == labels, torch.arange(probs.shape[0])[None],
                          measure=measure, num_classes=probs.shape[2])
    return float(scores[0])
