"""Model soups: average the weights of members of one architecture, then refresh BatchNorm.

Averaging is a pure function of state dicts (:func:`average_state_dicts`); BatchNorm
statistics of the average are not the average of the statistics, so a soup with BatchNorm
should be recalibrated on training data (:func:`pat.engine.batchnorm.recalibrate_bn`, which wraps
``torch.optim.swa_utils.update_bn``). Masked children can be souped: a pruned weight is 0
in its child, so the soup holds the average over all members (it is as dense as the union
of the masks).

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pat.engine.batchnorm import recalibrate_bn
from pat.ensemble.metrics import accuracy, nll
from pat.ensemble.predict import collect_probs, normalize_weights
from pat.errors import PatError, check

__all__ = ["average_state_dicts", "uniform_soup", "greedy_soup"]


def _check_same_layout(states: Sequence[Mapping[str, Tensor]]) -> None:
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != ref.keys():
            only0 = sorted(set(ref) - set(state))[:3]
            only_i = sorted(set(state) - set(ref))[:3]
            raise PatError(
                f"members 0 and {i} have different parameters: only in 0: {only0}, only in "
                f"{i}: {only_i}; only members of one architecture can be souped."
            )
        for key, value in ref.items():
            if state[key].shape != value.shape:
                raise PatError(
                    f"members 0 and {i} have different shapes: {key} {tuple(value.shape)} vs "
                    f"{tuple(state[key].shape)}; only members of one architecture can be souped."
                )


def average_state_dicts(
    states: Sequence[Mapping[str, Tensor]], weights: Any = None
) -> dict[str, Tensor]:
    """Weighted average of state dicts of one architecture (pure: inputs are not modified).

    Floating-point tensors are averaged (accumulated in at least float32, returned in their
    own dtype, on the first state's device); integer and bool buffers such as BatchNorm's
    ``num_batches_tracked`` are copied from the first state.

    Args:
        states: M state dicts with the same keys and shapes.
        weights: ``(M,)`` non-negative, normalised to sum to 1 (default: uniform).
    """
    states = list(states)
    check(states, "states must hold at least one state dict. Got 0.")
    _check_same_layout(states)
    w = normalize_weights(weights if weights is not None else torch.ones(len(states)), len(states))
    out: dict[str, Tensor] = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = ref.detach().clone()
            continue
        dtype = torch.promote_types(ref.dtype, torch.float32)
        total = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
        for wi, state in zip(w.tolist(), states, strict=True):
            total += wi * state[key].detach().to(ref.device, dtype)
        out[key] = total.to(ref.dtype)
    return out


def uniform_soup(models: Sequence[nn.Module], *, bn_loader: Iterable[Any] | None = None) -> nn.Module:
    """A copy of the first member holding the uniform average of all members' weights.

    With ``bn_loader`` (training data) the soup's BatchNorm statistics are recomputed.
    """
    models = list(models)
    check(models, "models must hold at least one member. Got 0.")
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(average_state_dicts([m.state_dict() for m in models]))
    if bn_loader is not None:
        recalibrate_bn(soup, bn_loader)
    return soup


def _soup_score(model: nn.Module, val_loader: Iterable[Any], metric: str) -> float:
    probs, labels = collect_probs([model], val_loader, path="loop")
    # higher is better for both: accuracy, and NLL negated
    return accuracy(probs[0], labels) if metric == "accuracy" else -nll(probs[0], labels)


def greedy_soup(
    models: Sequence[nn.Module],
    val_loader: Iterable[Any],
    train_loader_for_bn: Iterable[Any] | None = None,
    *,
    metric: str = "accuracy",
) -> tuple[nn.Module, list[int]]:
    """Greedy soup (Wortsman et al. 2022): members added best first while the soup improves.

    Members are sorted by validation score, then each is added to the soup only if the
    soup's validation score does not drop. Every candidate soup has its BatchNorm statistics
    recomputed on ``train_loader_for_bn`` (skip with None) before it is scored.

    Args:
        models: the members, all with the same architecture and parameter names.
        val_loader: yields ``(x, y)`` validation batches; re-iterable, as every candidate
            is scored on it.
        train_loader_for_bn: training batches for the BatchNorm statistics; None: keep them.
        metric: ``"accuracy"`` (higher is better) or ``"nll"`` (lower is better).

    Returns:
        The soup and the indices of its ingredients, in the order they were added.
    """
    models = list(models)
    check(models, "models must hold at least one member. Got 0.")
    check(metric in ("accuracy", "nll"), f"metric must be 'accuracy' or 'nll'. Got {metric!r}.")
    _check_same_layout([m.state_dict() for m in models])
    scores = [_soup_score(m, val_loader, metric) for m in models]
    order = sorted(range(len(models)), key=lambda i: (-scores[i], i))
    ingredients, soup, best = [order[0]], copy.deepcopy(models[order[0]]), scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([models[j] for j in ingredients + [i]], bn_loader=train_loader_for_bn)
        score = _soup_score(candidate, val_loader, metric)
        if score >= best:
            ingredients, soup, best = ingredients + [i], candidate, score
    return soup, ingredients
