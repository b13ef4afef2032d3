"""Split a parent into differently pruned children: the pruning API for any classifier.

>>> children = split(parent, 6, method="anti-random")         # masked, connection level
>>> children = split(parent, 4, method="cyclic", sparsity=0.5,
...                  level="neuron", physical=True)            # thinner dense networks

A child is a deep copy of the parent, so it trains, evaluates and saves like any module.
It carries one typed record, ``child.pat_child`` (:class:`pat.records.Child`): its recipe,
its masks (``{parameter name: bool tensor}``, True = keep; empty for a physical child, whose
pruned channels are gone), a physical child's kept channels, and once tuned its metrics and
cost.

Train a masked child with :class:`pat.engine.masking.MaskEnforcer` among the callbacks so that the
masked weights stay zero; save and load it with :func:`save_child` / :func:`load_child`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from pat.engine.checkpoint import load_model, save_model
from pat.errors import PatError
from pat.masks.apply import (
    apply_masks,
    check_masks,
    default_example_inputs,
    prunable_parameters,
    require_example_inputs,
)
from pat.masks.generate import check_recipe, generate_masks
from pat.masks.groups import channel_groups, kept_channels
from pat.masks.limits import LIMITS, bounded, memory_limit
from pat.masks.physical import ChildDoesNotRun, check_runs, parent_outputs, slim
from pat.masks.rescale import normalized_layers, rescale_kept_
from pat.records import Child, child_record

__all__ = ["split", "iter_split", "save_child", "load_child"]


def _patterns(value: Sequence[str] | str, argument: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)  # one pattern, not its characters
    if not all(isinstance(p, str) for p in value):
        raise PatError(f"{argument} must be fnmatch patterns (strings). Got {value!r}.")
    return tuple(value)


def split(
    model: nn.Module,
    children: int = 6,
    *,
    method: Literal["random", "anti-random", "partition", "cyclic"] = "anti-random",
    sparsity: float | None = None,
    level: Literal["connection", "neuron"] = "connection",
    scope: Literal["layer", "global"] = "layer",
    physical: bool = False,
    seed: int = 0,
    example_inputs: Any = None,
    include_first: bool = True,
    include_classifier: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rescale: bool | None = None,
) -> list[nn.Module]:
    """Clone ``model`` into ``children`` pruned copies, each with its own mask.

    All children are held at once; :func:`iter_split` makes the same children one at a time
    (what ``pat split`` uses, so that its memory does not grow with the number of children).

    Args:
        model: the trained parent, any ``nn.Module`` classifier; it is not modified.
        children: number of children N.
        method: ``anti-random`` (complement pairs), ``random``, ``partition`` or
            ``cyclic``; see :func:`pat.masks.generate_masks`.
        sparsity: fraction pruned. None: the method's own, 0.5 (``partition``: 1 - 1/N).
        level: ``connection`` (single weights) or ``neuron`` (whole output channels).
        scope: ``layer`` (each tensor at the exact sparsity) or ``global`` (one ranking).
        physical: remove pruned channels for real (neuron level only): each child is a
            thinner dense network, cheaper to tune and to run.
        seed: the masks are a pure function of it, the same on CPU and CUDA.
        example_inputs: a batch for tracing, e.g. ``torch.randn(1, 3, 32, 32)``; needed
            at neuron level for models without a pat spec, optional otherwise.
        include_first: prune the first layer too (the one a forward pass calls first).
        include_classifier: prune the final classifier layer too.
        include: fnmatch patterns on module names; when given, only matching layers.
        exclude: fnmatch patterns on module names to leave dense. These four choose the
            pruned layers as in :func:`pat.masks.prunable_parameters`.
        rescale: multiply each pruned tensor's kept weights by ``n / kept`` so that the
            child starts at the parent's scale, except layers that feed a normalisation
            layer (:mod:`pat.masks.rescale`). None: on at connection level; neuron level
            does not rescale.

    Returns:
        N children, deep copies of ``model``, each carrying its :class:`pat.records.Child`
        record as ``pat_child``.
    """
    return list(iter_split(
        model, children, method=method, sparsity=sparsity, level=level, scope=scope, physical=physical,
        seed=seed, example_inputs=example_inputs, include_first=include_first,
        include_classifier=include_classifier, include=include, exclude=exclude, rescale=rescale,
    ))  # fmt: skip


def iter_split(
    model: nn.Module,
    children: int = 6,
    *,
    method: Literal["random", "anti-random", "partition", "cyclic"] = "anti-random",
    sparsity: float | None = None,
    level: Literal["connection", "neuron"] = "connection",
    scope: Literal["layer", "global"] = "layer",
    physical: bool = False,
    seed: int = 0,
    example_inputs: Any = None,
    include_first: bool = True,
    include_classifier: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rescale: bool | None = None,
) -> Iterator[nn.Module]:
    """:func:`split`, one child at a time (same arguments, same children, in order).

    Every check runs and the masks are made before this returns; each child is copied from
    the parent only when the iterator is advanced, so at most one child is in memory beside
    the masks.
    """
    if not isinstance(model, nn.Module):
        hint = " (a checkpoint's path? pat.load_model(path) reads it)" if isinstance(model, (str, os.PathLike)) else ""
        raise PatError(f"model must be a torch.nn.Module. Got {type(model).__name__}{hint}.")
    d = check_recipe(children, method, sparsity, None, level, scope, seed)
    if physical and level != "neuron":
        raise PatError(
            f"physical=True removes whole channels and needs level='neuron'. Got level={level!r}."
        )
    if rescale is not None and not isinstance(rescale, bool):
        raise PatError(f"rescale must be True, False or None. Got {rescale!r}.")
    if rescale and level != "connection":
        raise PatError(
            "rescale=True compensates connection-level pruning; neuron level does not rescale. "
            f"Got level={level!r}."
        )
    rescale = level == "connection" if rescale is None else rescale
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    params = prunable_parameters(
        model, include_first=include_first, include_classifier=include_classifier,
        include=include, exclude=exclude, example_inputs=example_inputs,
    )  # fmt: skip
    if not params:
        raise PatError(
            f"nothing to prune in {type(model).__name__}: no Conv/Linear weight selected "
            f"(include={list(include)}, exclude={list(exclude)})."
        )
    groups = None
    if level == "neuron":
        example_inputs = require_example_inputs(model, example_inputs, "level='neuron'")
        if physical:
            input_shape = _input_shape(model, example_inputs)
        roots = [name.rpartition(".")[0] for name in params]

    def masks_of(groups: Any) -> list[Any]:
        return generate_masks(
            model if level == "neuron" else params, children=children, method=method,
            sparsity=sparsity, level=level, scope=scope, seed=seed, groups=groups,
        )  # fmt: skip

    first = None
    what = f"choosing the channels of {type(model).__name__}'s physical children"
    with bounded(what, max_bytes=2 * memory_limit(model), max_seconds=LIMITS.seconds) if physical \
            else contextlib.nullcontext():  # fmt: skip
        if level == "neuron":
            groups = channel_groups(model, example_inputs, roots=roots)
        masks = masks_of(groups)
        if physical:
            groups, masks, first = _runnable(model, groups, masks, masks_of, example_inputs)
    normalized = normalized_layers(model, example_inputs) if rescale else set()
    recipe = {"method": method, "sparsity": float(1 - d), "level": level, "scope": scope,
              "seed": seed, "physical": bool(physical), "children": children,
              "rescale": rescale}  # fmt: skip
    example = input_shape if physical else None
    expected = parent_outputs(model, example_inputs) if physical else None
    return _children(model, masks, recipe, groups, example_inputs, example, expected,
                     normalized if rescale else None, first)


def _children(model: nn.Module, masks: list[dict[str, torch.Tensor]], recipe: dict[str, Any], groups: Any,
              example_inputs: Any, input_shape: list[int] | None, expected: Any,
              normalized: set[str] | None, first: nn.Module | None = None) -> Iterator[nn.Module]:
    """Make the children one at a time; ``first`` is child 0 already slimmed (physical)."""
    physical, rescale = input_shape is not None, normalized is not None
    for index in range(len(masks)):
        mask, masks[index] = masks[index], {}  # the list no longer holds a mask once it is a child's
        slimmed = index == 0 and first is not None
        child = first if slimmed else copy.deepcopy(model)
        first = None
        if physical:
            kept = kept_channels(groups, mask)
            if not slimmed:
                slim(child, kept, example_inputs)
                check_runs(child, example_inputs, expected, model_name=type(model).__name__)
            child.pat_child = Child(recipe={**recipe, "index": index, "input_shape": input_shape}, kept=kept)
        else:
            apply_masks(child, mask)
            if rescale:
                rescale_kept_(child, mask, skip=normalized)
            child.pat_child = Child(recipe={**recipe, "index": index}, masks=mask)
        yield child


_RETRIES = 16  # layers whose channel groups may be left whole before a model is refused


def _runnable(
    model: nn.Module, groups: list[Any], masks: list[Any], masks_of: Any, example_inputs: Any
) -> tuple[list[Any], list[Any], nn.Module]:
    """Slim the first child; while it fails at a layer, leave that layer's groups whole.

    torch-pruning maps channels through most reshapes and splits, not all; a group it
    mis-maps gives a child that fails at a layer of that group. Leaving those groups whole
    keeps the rest of the model physical instead of refusing it.

    Returns:
        The groups and masks to use, and the first child, already slimmed and checked.
    """
    expected = parent_outputs(model, example_inputs)
    failed: dict[str, int] = {}  # failing layer -> how many times
    error: ChildDoesNotRun | None = None
    t0 = time.monotonic()
    for _ in range(_RETRIES + 1):
        if failed and time.monotonic() - t0 > LIMITS.seconds:
            raise PatError(
                f"the physical child of {type(model).__name__} still does not run after "
                f"{LIMITS.seconds:g} s of leaving layers whole ({error}); use physical=False."
            )
        child = copy.deepcopy(model)
        slim(child, kept_channels(groups, masks[0]), example_inputs)
        try:
            check_runs(child, example_inputs, expected, model_name=type(model).__name__)
            return groups, masks, child
        except ChildDoesNotRun as e:
            error = e
            if not e.layer:
                raise
            # The layer's own groups first; if it fails again, those of its enclosing block.
            failed[e.layer] = failed.get(e.layer, -1) + 1
            parts = e.layer.split(".")
            scope = ".".join(parts[: max(len(parts) - failed[e.layer], 1)])
            kept = [g for g in groups if not any(_within(m, scope) for m in g.modules)]
            if not kept or len(kept) == len(groups) and scope == parts[0]:
                raise
            if len(kept) < len(groups):
                groups, masks = kept, masks_of(kept)
    raise error  # type: ignore[misc]


def _within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def _input_shape(model: nn.Module, example_inputs: Any) -> list[int]:
    """The shape that rebuilds a physical child's trace (checked before any work)."""
    record = child_record(model)
    if record is not None and record.kept:
        raise PatError(
            "model is already a physical child; split its parent, whose architecture "
            "checkpoints can rebuild."
        )
    x = example_inputs
    if isinstance(x, (tuple, list)) and len(x) == 1:
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise PatError(
            "physical=True needs example_inputs to be one tensor, so that loading can rebuild "
            f"the child. Got {type(example_inputs).__name__}."
        )
    return list(x.shape)


def save_child(
    path: str | os.PathLike, child: nn.Module, *, arch: dict[str, Any] | None = None, **extra: Any
) -> None:
    """Save a child (weights, masks, recipe, kept channels) as a ``kind="child"`` checkpoint.

    Args:
        path: the ``.pt`` file, written atomically.
        child: from :func:`split` (or any model; then no masks are stored).
        arch: architecture spec ``{"name", "kwargs"}`` of the *parent*; defaults to the
            spec :func:`pat.models.create_model` attached.
        **extra: more plain entries (config, metrics, ...).
    """
    record = child_record(child) or Child()
    payload: dict[str, Any] = {
        "masks": {k: v.detach().cpu() for k, v in record.masks.items()},
        "recipe": dict(record.recipe),
        **extra,
    }
    if record.kept:
        payload["kept"] = {k: [int(i) for i in v] for k, v in record.kept.items()}
        payload["input_shape"] = payload["recipe"].get("input_shape")
    save_model(path, child, kind="child", arch=arch, **payload)


def load_child(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a child saved by :func:`save_child`, masks reattached and checked.

    A physical child is rebuilt from the parent's architecture by replaying its kept
    channels, then its weights are loaded.

    Raises:
        PatError: not a child checkpoint, or masks that do not match the weights.
    """
    model, ckpt = load_model(path, device=device, argument="child")
    if ckpt.get("kind") != "child":
        raise PatError(
            f"child {str(path)!r} is not a child checkpoint (kind={ckpt.get('kind')!r})."
        )
    masks = {k: v.to(device=device, dtype=torch.bool) for k, v in (ckpt.get("masks") or {}).items()}
    check_masks(model, masks)
    kept = {k: list(v) for k, v in ckpt["kept"].items()} if ckpt.get("kept") else None
    model.pat_child = Child(recipe=dict(ckpt.get("recipe") or {}), masks=masks, kept=kept,
                            metrics=ckpt.get("metrics"), cost=ckpt.get("cost"))
    return model
