"""PNG figures of an ensemble's predictions (matplotlib, imported only when a plot is made).

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so making a plot
neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pat.ensemble.metrics import N_BINS, calibration_bins, ece
from pat.errors import check

__all__ = ["reliability_diagram", "risk_coverage_plot", "accuracy_vs_size_plot", "disagreement_heatmap"]


def _figure(width: float = 4.5, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def reliability_diagram(
    probs: Tensor, labels: Tensor, path: str | os.PathLike, *, n_bins: int = N_BINS,
    title: str = "Reliability",
) -> Path:
    """Accuracy against confidence in ``n_bins`` equal-width bins, with the ECE in the title.

    Args:
        probs: ``(N, C)`` combined (or one member's) probabilities.
        labels: ``(N,)`` true classes.
        path: the PNG file written (its directory is created).
        n_bins: confidence bins over [0, 1].
        title: the figure's title; the ECE is appended to it.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    acc, conf, count = (t.cpu().numpy() for t in calibration_bins(probs, labels, n_bins))
    centers = (torch.arange(n_bins).numpy() + 0.5) / n_bins
    fig = _figure()
    ax = fig.add_subplot()
    filled = count > 0
    ax.bar(centers[filled], acc[filled], width=1 / n_bins, edgecolor="black", label="accuracy")
    ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=1 / n_bins,
           color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title} (ECE {ece(probs, labels, n_bins):.3f})")
    ax.legend(loc="upper left")
    return _save(fig, path)


def accuracy_vs_size_plot(
    curves: Tensor | Mapping[str, Tensor], path: str | os.PathLike, *, ylabel: str = "accuracy"
) -> Path:
    """Ensemble accuracy against the number of members, one line per curve.

    Args:
        curves: ``(K,)`` values for sizes 1..K (e.g. :func:`pat.ensemble.accuracy_vs_size`),
            or ``{label: (K_i,) values}`` to compare orders or methods.
        path: the PNG file written (its directory is created).
        ylabel: the y axis's label, for curves of something other than accuracy.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    if isinstance(curves, Tensor):
        curves = {"ensemble": curves}
    check(curves, "curves must hold at least one curve. Got none.")
    fig = _figure(5.0, 3.5)
    ax = fig.add_subplot()
    for label, values in curves.items():
        values = torch.as_tensor(values).detach().cpu().flatten().tolist()
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set(xlabel="ensemble size", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def disagreement_heatmap(
    matrix: Tensor, path: str | os.PathLike, *, names: Sequence[str] | None = None
) -> Path:
    """Heatmap of an ``(M, M)`` pairwise matrix (e.g. :func:`pat.ensemble.pairwise_disagreement`)."""
    check(matrix.dim() == 2 and matrix.shape[0] == matrix.shape[1],
          f"matrix must be (M, M). Got shape {tuple(matrix.shape)}.")
    m = matrix.shape[0]
    names = list(names) if names is not None else [str(i) for i in range(m)]
    check(len(names) == m, f"names must have one entry per member ({m}). Got {len(names)}.")
    fig = _figure(1.5 + 0.45 * m, 1.0 + 0.45 * m)
    ax = fig.add_subplot()
    image = ax.imshow(matrix.detach().cpu().float().numpy(), cmap="viridis", vmin=0)
    ax.set_xticks(range(m), names, rotation=90)
    ax.set_yticks(range(m), names)
    ax.set_title("pairwise disagreement")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def risk_coverage_plot(
    curves: Mapping[str, tuple[Tensor, Tensor]], path: str | os.PathLike
) -> Path:
    """Risk against coverage (:func:`pat.ensemble.selective.risk_coverage`), one line per name.

    Each line's AURC is given in the legend.
    """
    check(curves, "curves must hold at least one curve. Got none.")
    fig = _figure()
    ax = fig.add_subplot()
    for name, (coverage, risk) in curves.items():
        coverage, risk = (torch.as_tensor(t).detach().cpu().double().flatten()
                          for t in (coverage, risk))
        check(len(coverage) == len(risk) > 0, f"curves[{name!r}] must be two equal non-empty "
              f"(N,) tensors. Got {len(coverage)} and {len(risk)}.")
        ax.plot(coverage.numpy(), risk.numpy(), label=f"{name} (AURC {float(risk.mean()):.4f})")
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage", ylabel="risk (error among answered)",
           title="Selective prediction")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)
