"""Tracing a model block by block where torch-pruning cannot trace it whole.

Some forwards defeat torch-pruning's tracer as a whole: ShuffleNet's channel shuffle (a
view, a transpose and a view back) makes its reshape mapping divide by zero, Swin's
shifted-window attention sends its channel search into unbounded recursion. Their blocks
are still ordinary networks inside. :func:`traced_scopes` walks the module tree from the
top and traces each submodule on the input it receives in the model's forward; where one
traces, its *internal* channel groups (an MLP's hidden width, a bottleneck's middle) can
shrink without touching anything outside it, and where it does not, its own submodules
are tried. A group that reaches the submodule's output is never internal: the traced
module ends in a fixed *sink* layer that consumes the output, and groups that touch the
sink are left whole (:func:`is_sink`).

A physical child cut this way names its roots ``"<scope>/<root>"`` in its kept record, so
replaying it (:func:`pat.masks.physical.slim`) traces the same submodules, not the model.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from pat.errors import PatError
from pat.masks.limits import OutOfBounds
from pat.modes import eval_mode

__all__ = ["Sunk", "scope_inputs", "sunk", "traced_scopes", "is_sink", "split_key", "join"]

T = TypeVar("T")
_CONVS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


class Sunk(nn.Module):
    """``body`` followed by a fixed layer that consumes its output channels."""

    def __init__(self, body: nn.Module, sink: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``sink(body(x))``."""
        return self.sink(self.body(x))


def is_sink(module: Any) -> bool:
    """Whether ``module`` is a sink added for tracing, not a layer of the model."""
    return getattr(module, "_pat_sink", False)


def join(scope: str, name: str) -> str:
    """The full name of ``name`` inside the submodule ``scope`` (either may be ``""``)."""
    return f"{scope}.{name}" if scope and name else scope or name


def split_key(key: str) -> tuple[str, str]:
    """``"scope/root"`` -> ``("scope", "root")``; a plain root has scope ``""``."""
    scope, _, root = key.rpartition("/")
    return scope, root


def scope_inputs(
    model: nn.Module, example_inputs: Any, names: Sequence[str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (input, output)}`` of the single-tensor modules in one forward.

    Recorded are the modules called exactly once, with one tensor argument and returning one
    tensor, in one eval-mode forward of ``model``. ``names`` limits which modules are
    watched (default: all but the model itself).
    """
    from pat.masks.physical import _as_args, _forward

    watched = {n: m for n, m in model.named_modules() if n and (names is None or n in names)}
    seen: dict[str, list[Any]] = {}

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            ok = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor)  # fmt: skip
            seen.setdefault(name, []).append((args[0].detach(), out.detach()) if ok else None)
        return record

    hooks = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in watched.items()]
    try:
        with eval_mode(model), torch.no_grad():
            _forward(model, _as_args(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return {n: calls[0] for n, calls in seen.items() if len(calls) == 1 and calls[0] is not None}


def sunk(body: nn.Module, output: torch.Tensor) -> Sunk | None:
    """``body`` with a sink over its output channels, or None if they cannot be told.

    The channel dimension is the one the body's last Conv/Linear writes: dim 1 after a
    convolution, the last dim after a Linear.
    """
    from pat.masks.apply import PRUNABLE_TYPES

    layers = [m for m in body.modules() if isinstance(m, PRUNABLE_TYPES)]
    if not layers or output.dim() < 2:
        return None
    if isinstance(layers[-1], nn.modules.conv._ConvNd) and output.dim() in _CONVS:
        sink: nn.Module = _CONVS[output.dim()](output.shape[1], 1, 1)
    else:
        sink = nn.Linear(output.shape[-1], 1)
    sink = sink.to(device=output.device, dtype=output.dtype)
    sink.requires_grad_(False)
    sink._pat_sink = True
    return Sunk(body, sink)


def traced_scopes(
    model: nn.Module,
    example_inputs: Any,
    groups_of: Callable[[str, Sunk, Any], list[T]],
    *,
    min_layers: int = 2,
) -> list[T]:
    """Channel groups found scope by scope, for models torch-pruning cannot trace whole.

    ``groups_of(scope, sunk module, dependency graph)`` for the outermost submodules that
    torch-pruning can trace and group, top down, concatenated.

    Where tracing or grouping a submodule fails (or outgrows its memory bound), its own
    submodules are tried. Submodules with fewer than ``min_layers`` Conv/Linear layers hold
    no internal group and are skipped; ones called more than once, or not with a single
    tensor, are looked into instead.
    """
    from pat.masks.apply import PRUNABLE_TYPES
    from pat.masks.physical import dependency_graph

    calls = scope_inputs(model, example_inputs)
    found: list[T] = []
    # Blocks of one class fail alike: try one of them. Containers only alike in shapes too.
    failed: set[tuple] = set()

    def walk(scope: str, module: nn.Module) -> None:
        for name, sub in module.named_children():
            full = join(scope, name)
            if sum(isinstance(m, PRUNABLE_TYPES) for m in sub.modules()) < min_layers:
                continue
            kind: tuple = (type(sub),)
            if isinstance(sub, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                kind += tuple(tuple(p.shape) for p in sub.parameters())
            wrapped = sunk(sub, calls[full][1]) if full in calls and kind not in failed else None
            groups = None
            if wrapped is not None:
                try:
                    groups = groups_of(full, wrapped, dependency_graph(wrapped, calls[full][0]))
                except OutOfBounds as e:
                    if e.outer:
                        raise  # the enclosing deadline: every deeper trace would stop too
                    failed.add(kind)
                except PatError:
                    failed.add(kind)
                if groups is None:
                    gc.collect()  # what the failed trace held, before the next one grows
            if groups is not None:
                found.extend(groups)
            else:
                walk(full, sub)

    walk("", model)
    return found
