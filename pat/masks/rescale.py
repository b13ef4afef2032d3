"""Rescale a child's kept weights so that its layers start at the parent's scale.

Pruning half of a layer's weights halves, in expectation, each pre-activation it
computes; through L pruned ReLU layers the logits shrink about 2**L-fold, so a freshly
split child is badly under-confident and a brief tune does not repair it. Multiplying
each pruned tensor's kept weights by ``n / kept`` (``1 / (1 - s)``: the inverted-dropout
correction) restores every pre-activation's expected value.

A layer whose output goes straight into a normalisation layer (BatchNorm, LayerNorm,
GroupNorm, InstanceNorm, RMSNorm) is left alone: the normalisation removes any scale in
training, and a larger weight norm only lowers that layer's effective learning rate
(measured on a digits ResNet-8: the rescaled ensemble's NLL was 0.10 against 0.08).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

import torch
from torch import nn

from pat.masks.apply import PRUNABLE_TYPES, traced_forward

__all__ = ["NORM_TYPES", "normalized_layers", "rescale_kept_"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _storage(x: Any) -> int | None:
    return x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor) else None


def normalized_layers(model: nn.Module, example_inputs: Any = None) -> set[str]:
    """Names of the Conv/Linear modules whose output feeds a normalisation layer directly.

    Traced with forward hooks on ``example_inputs``: a layer counts when a norm module is
    called on its output or on a view of it (same storage: a permute before a
    LayerNorm, an in-place activation). Without inputs, by registration order: a layer
    immediately followed by a norm module (``conv1``, ``bn1``).
    """
    names = {m: name for name, m in model.named_modules()}
    if example_inputs is None:
        modules = list(model.modules())
        return {
            names[m] for m, nxt in zip(modules, modules[1:], strict=False)
            if isinstance(m, PRUNABLE_TYPES) and isinstance(nxt, NORM_TYPES)
        }  # fmt: skip
    produced: dict[int, nn.Module] = {}
    outputs: list[torch.Tensor] = []  # kept alive, so that no storage is reused mid-trace
    found: set[str] = set()

    def after_layer(mod: nn.Module, _inp: Any, out: Any) -> None:
        if (ptr := _storage(out)) is not None:
            produced[ptr] = mod
            outputs.append(out)

    def before_norm(_mod: nn.Module, inp: tuple[Any, ...]) -> None:
        if inp and (layer := produced.get(_storage(inp[0]))) is not None:  # type: ignore[arg-type]
            found.add(names[layer])

    hooks = [
        m.register_forward_hook(after_layer) if isinstance(m, PRUNABLE_TYPES)
        else m.register_forward_pre_hook(before_norm)
        for m in model.modules() if isinstance(m, (*PRUNABLE_TYPES, *NORM_TYPES))
    ]  # fmt: skip
    traced_forward(model, example_inputs, hooks)
    return found


@torch.no_grad()
def rescale_kept_(
    model: nn.Module, masks: Mapping[str, torch.Tensor], skip: Set[str] = frozenset()
) -> dict[str, float]:
    """Multiply each masked tensor's weights by ``numel / kept``, in place.

    Args:
        model: the child, its masked weights already zero.
        masks: ``{parameter name: bool mask}``.
        skip: module names to leave alone (:func:`normalized_layers`).

    Returns:
        ``{parameter name: factor}`` for the tensors rescaled.
    """
    params = dict(model.named_parameters())
    factors = {}
    for name, mask in masks.items():
        kept = int(mask.count_nonzero())
        if name.rpartition(".")[0] in skip or kept in (0, mask.numel()):
            continue
        factors[name] = mask.numel() / kept
        params[name].mul_(factors[name])
    return factors
