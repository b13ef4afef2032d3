"""Temperature scaling and the Deep Ensemble Equivalent (DEE).

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides a
model's logits by one scalar ``T`` fitted to minimise NLL on held-out data: accuracy is
unchanged (the argmax is), confidence is shrunk (``T > 1``) or sharpened (``T < 1``).
Comparing ensembles on raw NLL mixes how good a predictor is with how well its
confidence happens to be scaled; Ashukha et al. (ICLR 2020, "Pitfalls of In-Domain
Uncertainty Estimation and Ensembling in Deep Learning") therefore compare on the
*calibrated* NLL, with the temperature fitted on validation data — never on test.

For an ensemble, ``T`` scales the log of the combined probabilities: the calibrated
ensemble predicts ``softmax(log(mean_m p_m) / T)``. Each member has a temperature of its
own for when it is used alone.

DEE (same paper): the number k of independently trained models whose (calibrated) deep
ensemble reaches the same calibrated NLL, read off the curve of calibrated NLL against k
by linear interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from pat.errors import PatError, check

__all__ = [
    "T_BOUNDS",
    "as_log_probs",
    "fit_temperature",
    "apply_temperature",
    "calibrated_nll",
    "size_curve",
    "deep_ensemble_equivalent",
]

T_BOUNDS = (0.02, 50.0)  # a fitted T at a bound means the data asked for more
_ITERATIONS = 80  # golden-section steps: the bracket shrinks 0.618^80, far below float32 noise


def as_log_probs(scores: Tensor, *, kind: str = "auto") -> Tensor:
    """``(N, C)`` logits or probabilities → a ``(N, C)`` float tensor usable as logits.

    ``softmax(log p / T)`` equals ``softmax(z / T)`` for ``p = softmax(z)``, so scaling
    log-probabilities is scaling the logits. ``kind="auto"`` treats ``scores`` as
    probabilities when every row is non-negative and sums to 1.
    """
    check(kind in ("auto", "logits", "probs"), f"kind must be auto, logits or probs. Got {kind!r}.")
    if scores.dim() != 2:
        raise PatError(f"scores must be (N, C). Got shape {tuple(scores.shape)}.")
    check(scores.is_floating_point(), f"scores must be a float tensor. Got {scores.dtype}.")
    scores = scores.detach().float()
    check(bool(torch.isfinite(scores).all()) or kind == "probs", "scores hold non-finite values.")
    if kind == "auto":
        rows = scores.sum(dim=1)
        kind = "probs" if bool((scores >= 0).all()) and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-4)) else "logits"
    return scores.clamp_min(1e-12).log() if kind == "probs" else scores


def _labels(labels: Tensor, n: int, c: int) -> Tensor:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise PatError(f"labels must be ({n},). Got shape {tuple(labels.shape)}.")
    check(not labels.is_floating_point(), f"labels must be integers. Got {labels.dtype}.")
    labels = labels.long()
    if n and (labels.min() < 0 or labels.max() >= c):
        raise PatError(f"labels must be in [0, {c}). Got values in [{int(labels.min())}, {int(labels.max())}].")
    return labels


def fit_temperature(scores: Tensor, labels: Tensor, *, kind: str = "auto") -> float:
    """The temperature ``T`` minimising ``NLL(softmax(z / T), labels)``.

    A golden-section search over ``log T`` in :data:`T_BOUNDS`: the NLL is convex in
    ``1/T`` (a log-sum-exp minus a linear term), hence unimodal in ``log T``, so the
    search finds the minimum without gradients, a learning rate or randomness, and the
    same inputs always give the same ``T``.

    Args:
        scores: ``(N, C)`` logits, or probabilities (see :func:`as_log_probs`).
        labels: ``(N,)`` integer labels of held-out (validation) samples.
        kind: ``"auto"``, ``"logits"`` or ``"probs"``.
    """
    z = as_log_probs(scores, kind=kind)
    y = _labels(labels, *z.shape)
    check(z.shape[0] > 0, "fit_temperature needs at least one sample. Got 0.")

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    a, b = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(_ITERATIONS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


def apply_temperature(scores: Tensor, temperature: float, *, kind: str = "auto") -> Tensor:
    """``(N, C)`` logits or probabilities → calibrated probabilities ``softmax(z / T)``."""
    check(temperature > 0 and math.isfinite(temperature),
          f"temperature must be a positive number. Got {temperature}.")
    return (as_log_probs(scores, kind=kind) / temperature).softmax(dim=1)


def calibrated_nll(val_probs: Tensor, val_labels: Tensor, test_probs: Tensor, test_labels: Tensor) -> float:
    """NLL on test of ``(N, C)`` probabilities after a temperature fitted on validation."""
    t = fit_temperature(val_probs, val_labels, kind="probs")
    calibrated = apply_temperature(test_probs, t, kind="probs")
    y = _labels(test_labels, *calibrated.shape)
    return float(-calibrated.gather(1, y[:, None]).clamp_min(1e-12).log().mean())


def size_curve(
    val_probs: Tensor,
    val_labels: Tensor,
    test_probs: Tensor,
    test_labels: Tensor,
    *,
    max_subsets: int = 16,
    seed: int = 0,
) -> Tensor:
    """Calibrated test NLL of mean-combined ensembles of k members, k = 1..M.

    For each k the NLL is averaged over up to ``max_subsets`` distinct size-k subsets of the
    M members (all of them when there are fewer; else seeded random draws), each calibrated
    with its own temperature on validation.

    Args:
        val_probs: ``(M, N_val, C)`` member probabilities on validation, for the temperatures.
        val_labels: ``(N_val,)`` validation labels.
        test_probs: ``(M, N_test, C)`` member probabilities on test, where the NLL is measured.
        test_labels: ``(N_test,)`` test labels.
        max_subsets: size-k subsets averaged at most, for each k.
        seed: seeds the random draws of subsets.

    Returns:
        ``(M,)`` float64 curve, entry k-1 for ensembles of k members.
    """
    m = val_probs.shape[0]
    check(test_probs.shape[0] == m, f"val_probs and test_probs hold {m} and {test_probs.shape[0]} members.")
    check(max_subsets >= 1, f"max_subsets must be >= 1. Got {max_subsets}.")
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for k in range(1, m + 1):
        teams = _subsets(m, k, max_subsets, gen)
        curve.append(sum(calibrated_nll(val_probs[t].mean(0), val_labels, test_probs[t].mean(0), test_labels)
                         for t in teams) / len(teams))
    return torch.tensor(curve, dtype=torch.float64)


def _subsets(m: int, k: int, limit: int, gen: torch.Generator) -> list[list[int]]:
    if math.comb(m, k) <= limit:
        from itertools import combinations

        return [list(t) for t in combinations(range(m), k)]
    seen: set[tuple[int, ...]] = set()
    while len(seen) < limit:
        seen.add(tuple(sorted(torch.randperm(m, generator=gen)[:k].tolist())))
    return [list(t) for t in sorted(seen)]


def deep_ensemble_equivalent(nll: float, curve: Sequence[float] | Tensor) -> tuple[float, str]:
    """How many independent models an ensemble of calibrated NLL ``nll`` is worth.

    ``curve[k-1]`` is the calibrated NLL of a deep ensemble of k independent models
    (:func:`size_curve` of a reference pool). The DEE is the k at which the curve reaches
    ``nll``, linearly interpolated between neighbouring sizes (Ashukha et al. 2020).

    Returns:
        ``(dee, bound)``: ``bound`` is ``""`` inside the curve, ``"<"`` when ``nll`` is worse
        than one reference model (dee is then 1.0: at most one model's worth) and ``">"`` when
        it beats the largest reference ensemble (dee is then its size: at least that many).
    """
    c = [float(v) for v in curve]
    check(c, "curve must hold at least one size. Got [].")
    check(math.isfinite(nll), f"nll must be finite. Got {nll}.")
    if nll >= c[0]:
        return 1.0, "<" if nll > c[0] else ""
    best = min(range(len(c)), key=lambda i: c[i])
    for i in range(1, best + 1):  # first crossing on the way down to the curve's minimum
        if c[i] <= nll:
            span = c[i - 1] - c[i]
            return i + (c[i - 1] - nll) / span if span > 0 else float(i + 1), ""
    return float(best + 1), ">"
