"""Shared ensemble tools: whatever made the members, select, combine, soup and evaluate them.

The flow: :func:`collect_probs` (or :func:`cached_probs`) turns members and a split into an
``(M, N, C)`` tensor of probabilities; selectors (:func:`create_selector`) choose a team on
the validation tensor; :func:`evaluate` reports member, ensemble and diversity metrics on
the test tensor. :class:`Ensemble` wraps members as one classifier; soups average weights.
Plots live in :mod:`pat.ensemble.plots` (matplotlib is imported only there).
"""

from pat.engine.batchnorm import recalibrate_bn
from pat.ensemble.calibration import (
    apply_temperature,
    calibrated_nll,
    deep_ensemble_equivalent,
    fit_temperature,
    size_curve,
)
from pat.ensemble.corruptions import corrupt, corrupt_split, list_corruptions, load_cifar_c
from pat.ensemble.diversity import MEASURES, focal_diversity, focal_scores
from pat.ensemble.ensemble import Ensemble
from pat.ensemble.metrics import (
    accuracy,
    accuracy_vs_size,
    brier,
    calibration_bins,
    classification_metrics,
    ece,
    evaluate,
    nll,
    pairwise_disagreement,
    prediction_variance,
)
from pat.ensemble.predict import cached_logits, cached_probs, collect_logits, collect_probs, combine
from pat.ensemble.select import (
    AllSelector,
    BruteForceSelector,
    FocalSelector,
    GreedySelector,
    RandomSelector,
    Selector,
    TopKSelector,
    create_selector,
    list_selectors,
)
from pat.ensemble.soups import average_state_dicts, greedy_soup, uniform_soup
from pat.store import EnsembleDir

__all__ = [
    "EnsembleDir",
    "Ensemble",
    "collect_logits",
    "collect_probs",
    "cached_logits",
    "cached_probs",
    "fit_temperature",
    "apply_temperature",
    "calibrated_nll",
    "size_curve",
    "deep_ensemble_equivalent",
    "combine",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "calibration_bins",
    "classification_metrics",
    "pairwise_disagreement",
    "prediction_variance",
    "accuracy_vs_size",
    "evaluate",
    "MEASURES",
    "focal_diversity",
    "focal_scores",
    "Selector",
    "AllSelector",
    "TopKSelector",
    "RandomSelector",
    "BruteForceSelector",
    "GreedySelector",
    "FocalSelector",
    "list_selectors",
    "create_selector",
    "average_state_dicts",
    "uniform_soup",
    "greedy_soup",
    "recalibrate_bn",
    "list_corruptions",
    "corrupt",
    "corrupt_split",
    "load_cifar_c",
]

