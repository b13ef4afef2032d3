"""Which tensors are pruned, and keeping masked entries at zero while a child trains.

A mask set is plain data: ``{parameter name: bool tensor of the parameter's shape}``,
``True`` = keep. Applying it is a separate step from making it (``generate.py``).

Masks are enforced by zeroing the masked weights *and* their optimizer state after every
optimizer step (:class:`pat.engine.masking.MaskEnforcer`, which runs a :class:`MaskPlan`), not
by forward hooks: a hook adds a multiply to every forward, breaks ``deepcopy`` and leaves the
stored weights dense.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pat.errors import PatError
from pat.records import child_record, masks_of

__all__ = [
    "MaskSet",
    "PRUNABLE_TYPES",
    "default_example_inputs",
    "require_example_inputs",
    "prunable_parameters",
    "apply_masks",
    "enforce_masks",
    "MaskPlan",
    "check_masks",
    "bake",
    "sparsity_report",
    "count_params_macs",
]

MaskSet = dict[str, torch.Tensor]  # parameter name -> bool tensor, same shape; True = keep
PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)  # Conv1d/2d/3d (+transposed), Linear


def default_example_inputs(model: nn.Module) -> torch.Tensor | None:
    """A ``(1, in_channels, S, S)`` zero batch for tracing, or None when it cannot be known.

    ``in_channels`` comes from the pat spec (:func:`pat.models.create_model`); ``S`` is the
    model's ``image_size`` attribute when it has one (torchvision ViTs need 224), else 32.
    """
    from pat.models import spec_of

    spec = spec_of(model) or {}
    channels = spec.get("kwargs", {}).get("in_channels")
    if not isinstance(channels, int):
        return None
    size = getattr(model, "image_size", 32)
    size = size if isinstance(size, int) and not isinstance(size, bool) else 32
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros(1, channels, size, size, device=device)


def require_example_inputs(model: nn.Module, example_inputs: Any, why: str) -> Any:
    """``example_inputs``, else :func:`default_example_inputs`, else a PatError on ``why``."""
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if example_inputs is None:
        raise PatError(
            f"{why} needs example_inputs (e.g. torch.randn(1, 3, 32, 32)) to trace "
            f"{type(model).__name__}; it has no pat spec to derive them from."
        )
    return example_inputs


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def traced_forward(model: nn.Module, example_inputs: Any, hooks: list[Any]) -> None:
    """One forward pass on ``example_inputs`` that leaves ``model`` as it was.

    The pass runs in eval mode under ``no_grad`` (BatchNorm statistics do not move); then
    ``hooks`` are removed and every train/eval flag is restored.

    Raises:
        PatError: the forward pass failed (one line, with the model's own error).
    """
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward
        raise PatError(
            f"example_inputs: the forward pass of {type(model).__name__} failed "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})."
        ) from None
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode


def forward_order(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """Conv/Linear modules in the order a forward pass first calls them (eval, no grad)."""
    seen: dict[nn.Module, None] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, _inp: seen.setdefault(mod, None))
        for m in model.modules()
        if isinstance(m, PRUNABLE_TYPES)
    ]
    traced_forward(model, example_inputs, hooks)
    return list(seen)


def _classifier(model: nn.Module, order: Callable[[], list[nn.Module]]) -> nn.Module | None:
    from pat.models import get_classifier

    try:
        return get_classifier(model)
    except PatError:
        layers = order()
        return layers[-1] if layers else None  # e.g. a 1x1-conv head: the last layer run


def prunable_parameters(
    model: nn.Module,
    *,
    include_first: bool = True,
    include_classifier: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    example_inputs: Any = None,
) -> dict[str, nn.Parameter]:
    """The weights a mask may prune: those of ``Conv*d`` and ``Linear`` layers.

    Biases and normalisation parameters are never pruned at connection level. The
    classifier is found by identity (:func:`pat.models.get_classifier`), not by position.
    The first layer is the first Conv/Linear a forward pass calls, traced on
    ``example_inputs`` (or :func:`default_example_inputs`); without inputs, the first one
    registered.

    Args:
        model: any ``nn.Module``.
        include_first: prune the first layer too (the paper does).
        include_classifier: prune the final classifier layer too.
        include: fnmatch patterns on module names; when given, only matching layers.
        exclude: fnmatch patterns on module names to leave dense.
        example_inputs: a batch (or tuple of forward arguments) for the trace.

    Returns:
        ``{"<module>.weight": parameter}`` in registration order.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    registered = list(layers.values())

    def order() -> list[nn.Module]:
        # Traced only when needed: the first layer, or a classifier found by position.
        inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
        return registered if inputs is None else (forward_order(model, inputs) or registered)

    skip: set[int] = set()
    if not include_classifier and (head := _classifier(model, order)) is not None:
        skip.add(id(head))
    if not include_first and (first := order()):
        skip.add(id(first[0]))
    out: dict[str, nn.Parameter] = {}
    for name, m in layers.items():
        if id(m) in skip or not isinstance(getattr(m, "weight", None), nn.Parameter):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out[f"{name}.weight" if name else "weight"] = m.weight
    return out


def _lookup(
    model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    params = dict(model.named_parameters())
    out = []
    for name, mask in masks.items():
        p = params.get(name)
        if p is None:
            raise PatError(f"masks name parameter {name!r}, which the model does not have.")
        if tuple(mask.shape) != tuple(p.shape):
            raise PatError(
                f"mask for {name!r} has shape {tuple(mask.shape)}; the parameter has {tuple(p.shape)}."
            )
        out.append((name, p, mask))
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, every entry whose mask is False."""
    for _, p, mask in _lookup(model, masks):
        p.masked_fill_(~mask.to(p.device, torch.bool), 0)


def _state_tensors(optimizer: Any, p: torch.Tensor) -> list[torch.Tensor]:
    """Optimizer state shaped like ``p``: SGD momentum, Adam moments, ..."""
    if optimizer is None:
        return []
    state = optimizer.state.get(p, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape]


@torch.no_grad()
def enforce_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer: Any = None
) -> None:
    """Zero masked weights and the optimizer state that belongs to them.

    Zero the momentum too, or the next step revives pruned weights.
    """
    MaskPlan(model, masks).run(optimizer)


class MaskPlan:
    """Pre-resolved (parameter, float keep-mask) pairs, so each step is one foreach multiply."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.items = [
            (p, mask.to(device=p.device, dtype=p.dtype)) for _, p, mask in _lookup(model, masks)
        ]

    def run(self, optimizer: Any) -> None:
        """Zero the masked entries of every parameter and of its state in ``optimizer``."""
        tensors, factors = [], []
        for p, keep in self.items:
            tensors.append(p.data)
            factors.append(keep)
            for t in _state_tensors(optimizer, p):
                tensors.append(t)
                factors.append(keep if t.dtype == keep.dtype else keep.to(t.dtype))
        if tensors:
            torch._foreach_mul_(tensors, factors)


@torch.no_grad()
def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`PatError` when a masked entry of the model is non-zero.

    Catches a child whose stored masks do not belong to its weights.
    """
    for name, p, mask in _lookup(model, masks):
        leaked = int(p[~mask.to(p.device, torch.bool)].count_nonzero())
        if leaked:
            raise PatError(
                f"masks do not match the weights: {leaked} masked entries of {name!r} are non-zero."
            )


def bake(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Make the zeros permanent: apply the masks and drop them from the model's child record.

    The returned model (the same object) trains densely from then on.
    """
    masks = masks if masks is not None else masks_of(model) or {}
    apply_masks(model, masks)
    record = child_record(model)
    if record is not None:
        record.masks = {}
    return model


@torch.no_grad()
def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per masked tensor: name, shape, kept, total, sparsity, nonzero; then a ``total`` row.

    ``kept`` counts the mask's True entries; ``nonzero`` the weights that are non-zero now.
    """
    rows: list[dict[str, Any]] = []
    for name, p, mask in _lookup(model, masks):
        kept, total = int(mask.sum()), mask.numel()
        rows.append({
            "name": name, "shape": list(p.shape), "kept": kept, "total": total,
            "sparsity": 1.0 - kept / total if total else 0.0, "nonzero": int(p.count_nonzero()),
        })  # fmt: skip
    kept = sum(r["kept"] for r in rows)
    total = sum(r["total"] for r in rows)
    rows.append({
        "name": "total", "shape": None, "kept": kept, "total": total,
        "sparsity": 1.0 - kept / total if total else 0.0,
        "nonzero": sum(r["nonzero"] for r in rows),
    })  # fmt: skip
    return rows


def count_params_macs(
    model: nn.Module, example_inputs: Any, masks: Mapping[str, torch.Tensor] | None = None
) -> tuple[int, int]:
    """``(parameters, MACs)`` of one forward pass on ``example_inputs``.

    For a masked child (``masks``, or its record's) the parameters count only
    the kept entries; the MACs stay dense, since masked zeros are still multiplied. A
    physical child is genuinely smaller in both.
    """
    from pat.masks._tp import torch_pruning

    tp = torch_pruning()
    if not isinstance(example_inputs, (tuple, list, Mapping)):
        example_inputs = (example_inputs,)  # so torch-pruning does not unpack the batch
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    masks = masks if masks is not None else masks_of(model) or {}
    pruned = sum(int((~m.bool()).sum()) for _, _, m in _lookup(model, masks))
    return int(params) - pruned, int(macs)
