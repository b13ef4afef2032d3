"""Removing pruned channels for real, through torch-pruning, and tracing a model for it.

torch-pruning's dependency graph (:func:`dependency_graph`) finds which output channels are
coupled (:mod:`pat.masks.groups` turns that into the groups a neuron mask decides on) and
:func:`slim` removes a child's pruned channels through it.

A physical child is recorded as ``kept = {root module name: [kept output channels]}`` in
the parent's numbering; :func:`rebuild_physical` replays it onto a fresh parent
architecture, so a checkpoint holds only that dict and the slim state dict.

References:
    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (torch-pruning).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pat.errors import PatError, first_line
from pat.io import REBUILDERS
from pat.masks.limits import LIMITS, bounded, memory_limit, time_limit
from pat.modes import eval_mode, restored_modes

__all__ = [
    "dependency_graph",
    "slim",
    "check_runs",
    "ChildDoesNotRun",
    "parent_outputs",
    "rebuild_physical",
]


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*example_inputs)


@contextmanager
def _innermost_layer(model: nn.Module) -> Iterator[list[str]]:
    """Yield a list whose last entry is the module whose forward is running (hooks)."""
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []  # names of the modules whose forward has not returned yet

    def enter(module: nn.Module, _inputs: Any) -> None:
        running.append(names.get(module, ""))

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        if running:
            running.pop()

    hooks = [
        h
        for m in model.modules()
        for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    try:
        yield running
    finally:
        for h in hooks:
            h.remove()


def _at(running: list[str]) -> str:
    return f" at layer {running[-1]!r}" if running and running[-1] else ""


def dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    """torch-pruning's ``DependencyGraph`` of ``model``, traced on ``example_inputs``.

    The model's train/eval modes are restored afterwards (tracing switches to eval). The
    trace runs within :data:`pat.masks.limits.LIMITS`.

    Raises:
        PatError: the model cannot be traced (names the innermost layer that was
            running), or tracing outgrew its memory or time bound.
    """
    from pat.masks._tp import torch_pruning

    tp = torch_pruning()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)  # so torch-pruning does not unpack the batch
    what = f"tracing {type(model).__name__} with torch-pruning"
    block = _is_block(model)
    with (
        restored_modes(model),  # tracing switches to eval
        bounded(what, max_bytes=memory_limit(model, block=block), max_seconds=time_limit(block=block)),
        _innermost_layer(model) as running,
        torch.enable_grad(),
    ):
        try:
            # Our own forward_fn: torch-pruning's default retries a failed call with
            # other argument packing, which hides the first (informative) error.
            return tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=_forward, verbose=False
            )
        except (KeyboardInterrupt, PatError):
            raise
        except Exception as e:  # noqa: BLE001 - torch-pruning raises anything from assert to KeyError
            raise PatError(
                f"torch-pruning cannot trace {type(model).__name__}{_at(running)} "
                f"({first_line(e)}); use level='connection' or exclude that layer."
            ) from None


def _is_block(model: nn.Module) -> bool:
    from pat.masks.scopes import Sunk

    return isinstance(model, Sunk)


def _describe(model: nn.Module, scope: str) -> str:
    return f"{type(model).__name__} block {scope!r}" if scope else type(model).__name__


def _as_args(example_inputs: Any) -> Any:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs


def parent_outputs(model: nn.Module, example_inputs: Any) -> Any:
    """The parent's eval-mode outputs on ``example_inputs``, for :func:`check_runs`."""
    with eval_mode(model), torch.no_grad():
        return _forward(model, _as_args(example_inputs))


class ChildDoesNotRun(PatError):
    """A slimmed child fails on the example input; ``layer`` is where (may be empty)."""

    def __init__(self, message: str, layer: str = "") -> None:
        super().__init__(message)
        self.layer = layer


def check_runs(child: nn.Module, example_inputs: Any, expected: Any, *, model_name: str) -> None:
    """Run a slimmed child once; refuse it unless its outputs have ``expected``'s shapes.

    Raises:
        ChildDoesNotRun: names the model and the first layer that failed.
    """
    with eval_mode(child), _innermost_layer(child) as running, torch.no_grad():
        try:
            out = _forward(child, _as_args(example_inputs))
        except Exception as e:  # noqa: BLE001 - any shape error from any layer
            raise ChildDoesNotRun(
                f"the physical child of {model_name} does not run{_at(running)} "
                f"({first_line(e)}); use physical=False or exclude that layer.",
                running[-1] if running else "",
            ) from None
    got, want = _shapes(out), _shapes(expected)
    if got != want:
        raise ChildDoesNotRun(
            f"the physical child of {model_name} returns shape {got}, the parent {want}; "
            "use physical=False."
        )


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, Mapping):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return [_shapes(v) for v in out]
    return type(out).__name__


def slim(model: nn.Module, kept: Mapping[str, Sequence[int]], example_inputs: Any) -> nn.Module:
    """Remove, in place, every output channel of each root not in ``kept[root]``.

    Coupled layers (norms, the inputs of the layers that follow, the other branch of a
    residual add, the slices of a concatenation) shrink with their root. Roots named
    ``"scope/root"`` are traced within the submodule ``scope`` (:mod:`pat.masks.scopes`).

    Returns:
        ``model``, now thinner.
    """
    from pat.masks.scopes import scope_inputs, split_key, sunk

    by_scope: dict[str, dict[str, Sequence[int]]] = {}
    for key, keep in kept.items():
        scope, root = split_key(key)
        by_scope.setdefault(scope, {})[root] = keep
    scoped = [s for s in by_scope if s]
    calls = scope_inputs(model, example_inputs, scoped) if scoped else {}
    for scope, roots in by_scope.items():
        if not scope:
            _slim_in(model, dependency_graph(model, example_inputs), roots, model)
            continue
        try:
            traced = sunk(model.get_submodule(scope), calls[scope][1]) if scope in calls else None
        except AttributeError:
            traced = None
        if traced is None:
            raise PatError(f"kept names scope {scope!r}, which the model does not run as one block.")
        _slim_in(traced, dependency_graph(traced, calls[scope][0]), roots, model)
    _update_widths(model)
    return model


def _slim_in(traced: nn.Module, graph: Any, kept: Mapping[str, Sequence[int]], model: nn.Module) -> None:
    what = f"removing channels of {type(traced).__name__}"
    with bounded(what, max_bytes=memory_limit(traced), max_seconds=LIMITS.seconds):
        for root, keep in kept.items():
            try:
                module = model.get_submodule(root)
            except AttributeError:
                raise PatError(f"kept names layer {root!r}, which the model does not have.") from None
            pruner = graph.get_pruner_of_module(module)
            n = pruner.get_out_channels(module) if pruner is not None else None
            keep_set = set(int(i) for i in keep)
            if n is None or not keep_set or not keep_set <= set(range(n)):
                raise PatError(
                    f"kept channels for layer {root!r} must be a non-empty subset of range({n}). "
                    f"Got {sorted(keep_set)[:8]}{'...' if len(keep_set) > 8 else ''}."
                )
            drop = [i for i in range(n) if i not in keep_set]
            if drop:
                try:
                    graph.get_pruning_group(module, pruner.prune_out_channels, drop).prune()
                except Exception as e:  # noqa: BLE001
                    raise PatError(
                        f"torch-pruning cannot remove channels of layer {root!r} ({first_line(e)})."
                    ) from None


def _update_widths(model: nn.Module) -> None:
    """Set the width attributes that some forwards read instead of their layers' shapes."""
    for m in model.modules():
        proj = getattr(m, "conv_proj", None)  # torchvision VisionTransformer
        if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(proj, nn.Conv2d):
            m.hidden_dim = proj.out_channels


def rebuild_physical(
    model: nn.Module,
    kept: Mapping[str, Sequence[int]],
    example_inputs: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Replay a physical child's channel removal onto a fresh parent architecture.

    Args:
        model: a freshly built parent (same architecture the child was cut from).
        kept: the child's record (:func:`kept_channels`).
        example_inputs: a batch for tracing; else ``torch.zeros(input_shape)``; else
            :func:`pat.masks.apply.default_example_inputs`.
        input_shape: the shape of a zero batch to trace on, e.g. ``(1, 3, 32, 32)``, when
            ``example_inputs`` is not given.

    Returns:
        ``model`` slimmed in place, ready for ``load_state_dict`` of the child's weights.
    """
    from pat.masks.apply import default_example_inputs

    if example_inputs is None and input_shape is not None:
        example_inputs = torch.zeros(*[int(s) for s in input_shape])
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if example_inputs is None:
        raise PatError(
            "rebuilding a physical child needs example_inputs (or input_shape); the model "
            "has no pat spec to derive them from."
        )
    return slim(model, kept, example_inputs)


@REBUILDERS.register("kept")
def _rebuild_kept(model: nn.Module, ckpt: Mapping[str, Any]) -> nn.Module:
    """A checkpoint of a physical child: replay its channel removal before its weights load."""
    return rebuild_physical(model, ckpt["kept"], input_shape=ckpt.get("input_shape"))
