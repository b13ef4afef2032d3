"""Coupled output channels, and removing pruned channels for real, through torch-pruning.

Channels joined by a residual add, a concatenation or a depthwise convolution must be
kept or removed together, or the slimmed network no longer fits together. torch-pruning's
dependency graph finds these groups; a neuron mask makes one decision per group channel,
so it always describes a network that :func:`slim` can build.

A physical child is recorded as ``kept = {root module name: [kept output channels]}`` in
the parent's numbering; :func:`rebuild_physical` replays it onto a fresh parent
architecture, so a checkpoint holds only that dict and the slim state dict.

References:
    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (torch-pruning).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pat.errors import PatError, first_line
from pat.io import REBUILDERS
from pat.masks.limits import LIMITS, OutOfBounds, bounded, memory_limit, time_limit
from pat.modes import eval_mode, restored_modes

__all__ = [
    "ChannelGroup",
    "dependency_graph",
    "channel_groups",
    "kept_channels",
    "slim",
    "check_runs",
    "ChildDoesNotRun",
    "parent_outputs",
    "rebuild_physical",
]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are kept or removed together.

    Attributes:
        root: module name of the group's root Conv/Linear.
        channels: number of units n, the decisions a mask makes for the group.
        repeat: how many channels one unit stands for. A group through a grouped
            convolution (ResNeXt, RegNet) must keep the same channels in every conv group,
            so unit ``u`` is the root's channels ``u, u + n, ..., u + (repeat - 1) n``
            (what torch-pruning's own pruners do); 1 otherwise.
        params: what a pruned unit zeroes in a masked child, as
            ``(parameter name, dim, positions along dim, root unit of each position)``:
            the output rows and biases of every coupled layer and the entries of the
            norm layers that follow them. Input-side weights are left alone: they only
            ever see the zero activation.
    """

    root: str
    channels: int
    params: tuple[tuple[str, int, tuple[int, ...], tuple[int, ...]], ...]
    repeat: int = 1
    modules: tuple[str, ...] = ()  # every layer the group touches, inputs included
    scope: str = ""  # the submodule it was traced in, "" for the whole model

    @property
    def key(self) -> str:
        """The group's name in a kept record: its root, ``"scope/root"`` if traced in a scope."""
        return f"{self.scope}/{self.root}" if self.scope else self.root


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


def _unit_params(module: Any, out_side: bool) -> list[tuple[str, int]] | None:
    """``(parameter, dim)`` a pruned unit zeroes in ``module``; None if unsupported."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels > 1
        if not (out_side or depthwise):
            return []  # input side: sees only zeros
        return [("weight", 1 if module.transposed else 0), ("bias", 0)]
    if isinstance(module, nn.Linear):
        return [("weight", 0), ("bias", 0)] if out_side else []
    if isinstance(module, (*_NORMS, nn.LayerNorm)):
        if getattr(module, "weight", None) is None or getattr(module, "bias", None) is None:
            return None  # no affine terms: a zero channel would come out as -mean/std
        dim = -1 if isinstance(module, nn.LayerNorm) else 0  # LayerNorm: the last dims
        return [("weight", dim), ("bias", dim)]
    if isinstance(module, nn.PReLU):
        return [("weight", 0)] if module.num_parameters > 1 else []
    if isinstance(module, nn.Module) and next(module.parameters(recurse=False), None) is None:
        return []  # adds, concatenations, reshapes: nothing to zero
    return None  # attention blocks, bare parameters: left to connection level


def channel_groups(
    model: nn.Module, example_inputs: Any, *, roots: Iterable[str]
) -> list[ChannelGroup]:
    """The coupled-channel groups whose every output-pruned layer is in ``roots``.

    Args:
        model: the parent network.
        example_inputs: a batch for tracing, e.g. ``(1, C, 32, 32)``.
        roots: names of the Conv/Linear modules allowed to lose output channels (the
            prunable layers, without the classifier); a group that would also remove
            outputs of another layer (say the classifier, or an excluded first layer) is
            left whole.

    Returns:
        Groups in the dependency graph's order. Groups through layers whose parameters
        cannot be zeroed per channel (attention) are left out. Where the whole model cannot
        be traced or grouped within its bounds, the groups internal to the blocks that can
        (:func:`pat.masks.scopes.traced_scopes`); the whole model's error if there are none.
    """
    try:
        return _groups_of(model, "", model, dependency_graph(model, example_inputs), roots)
    except OutOfBounds as e:
        if e.outer:
            raise  # the caller's deadline, not this trace's
        whole = PatError(str(e))  # not e: its traceback holds the failed graph's memory
    except PatError as e:
        whole = PatError(str(e))
    gc.collect()
    # Not traceable as a whole: shrink what is internal to the blocks that are.
    from pat.masks.scopes import traced_scopes

    groups = traced_scopes(
        model, example_inputs, lambda scope, traced, graph: _groups_of(model, scope, traced, graph, roots)
    )
    if not groups:
        raise whole
    return groups


def _groups_of(
    model: nn.Module, scope: str, traced: nn.Module, graph: Any, roots: Iterable[str]
) -> list[ChannelGroup]:
    """The channel groups of ``graph``, traced on ``traced``.

    ``traced`` is ``model`` itself (``scope`` ``""``) or the submodule ``scope`` of it
    followed by a sink (:mod:`pat.masks.scopes`).
    """
    from pat.masks.apply import PRUNABLE_TYPES
    from pat.masks.scopes import is_sink, join

    allowed = set(roots)
    sub = model.get_submodule(scope) if scope else model
    names = {m: join(scope, n) for n, m in sub.named_modules()}
    pnames = {p: join(scope, n) for n, p in sub.named_parameters()}
    params = dict(model.named_parameters())
    ignored = [m for m, n in names.items() if isinstance(m, PRUNABLE_TYPES) and n not in allowed]
    ignored += [m for m in traced.modules() if is_sink(m)]
    what = f"grouping the coupled channels of {_describe(model, scope)}"
    block = bool(scope)
    with bounded(what, max_bytes=memory_limit(traced, block=block), max_seconds=time_limit(block=block)):
        found = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES))
    groups = []
    for group in found:
        if any(is_sink(item.dep.target.module) for item in group):
            continue  # reaches the scope's output: not internal to it
        root = group[0].dep.target.module
        members: list[tuple[str, int, tuple[int, ...], tuple[int, ...]]] = []
        for item in group:
            target = item.dep.target.module
            if isinstance(target, nn.MultiheadAttention):
                spec = _attention_params(names[target], target, item.idxs, item.root_idxs)
                if spec is None:
                    members = []
                    break
                members += spec
                continue
            if isinstance(target, nn.Parameter):  # a bare parameter (layer scale, class token)
                dim = item.dep.target.pruning_dim % target.dim()
                members.append((pnames[target], dim, tuple(item.idxs), tuple(item.root_idxs)))
                continue
            spec = _unit_params(target, graph.is_out_channel_pruning_fn(item.dep.handler))
            if spec is None:
                members = []
                break
            for pname, dim in spec:
                if isinstance(getattr(target, pname, None), nn.Parameter):
                    full = f"{names[target]}.{pname}"
                    dim = dim % getattr(target, pname).dim()
                    members.append((full, dim, tuple(item.idxs), tuple(item.root_idxs)))
        if members:
            n = int(graph.get_pruner_of_module(root).get_out_channels(root))
            repeat = _conv_groups(group)
            if n % repeat or n // repeat < 2 or not _in_bounds(members, n, params):
                continue  # not evenly split, one unit, or positions torch-pruning mis-mapped
            if _packed_qkv(model, names[root], n):
                continue
            touched = tuple(dict.fromkeys(
                names[t] if t in names else pnames[t].rpartition(".")[0]
                for t in (i.dep.target.module for i in group)
                if t in names or t in pnames
            ))  # fmt: skip
            groups.append(
                ChannelGroup(
                    root=names[root], channels=n // repeat, params=tuple(members), repeat=repeat,
                    modules=touched, scope=scope,
                )
            )
    return groups


def _conv_groups(group: Any) -> int:
    """The conv groups (or attention heads) a channel group passes through (1 if none).

    Depthwise convolutions (one channel per group) shrink with any choice and do not count.
    An attention layer's embedding splits into ``num_heads`` heads: every head keeps the
    same dimensions, so each keeps the same width and the heads stay whole.
    """
    counts = [1]
    for item in group:
        m = item.dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups != m.out_channels:
            counts.append(m.groups)
        if isinstance(m, nn.MultiheadAttention):
            counts.append(m.num_heads)
    return max(counts)


def _packed_qkv(model: nn.Module, root: str, n: int) -> bool:
    """Whether ``root`` is a packed q/k/v projection (timm's ``Attention.qkv``).

    Its forward reshapes the attention output back to the *input* width, so its heads
    cannot shrink on their own; the group is left whole (the MLPs still shrink).
    """
    owner, _, leaf = root.rpartition(".")
    attn = model.get_submodule(owner) if owner else model
    heads = getattr(attn, "num_heads", None)
    return leaf == "qkv" and isinstance(heads, int) and n % (3 * heads) == 0


def _in_bounds(members: Sequence[tuple[str, int, tuple[int, ...], tuple[int, ...]]], n: int,
               params: Mapping[str, torch.Tensor]) -> bool:  # fmt: skip
    for name, dim, pos, root in members:
        if pos and max(pos) >= params[name].shape[dim] or root and max(root) >= n:
            return False
    return True


def _attention_params(
    name: str, attn: nn.MultiheadAttention, idxs: Sequence[int], root: Sequence[int]
) -> list[tuple[str, int, tuple[int, ...], tuple[int, ...]]] | None:
    """What a pruned embedding unit zeroes in ``nn.MultiheadAttention``.

    That is the q, k and v rows of the packed input projection and the output projection's
    row; None for separate q, k, v weights, which the group is left whole for.
    """
    if attn.in_proj_weight is None:
        return None
    d, idxs, root = attn.embed_dim, tuple(idxs), tuple(root)
    qkv = tuple(i + k * d for k in range(3) for i in idxs)
    out = [(f"{name}.in_proj_weight", 0, qkv, root * 3), (f"{name}.out_proj.weight", 0, idxs, root)]
    if attn.in_proj_bias is not None:
        out.append((f"{name}.in_proj_bias", 0, qkv, root * 3))
    if attn.out_proj.bias is not None:
        out.append((f"{name}.out_proj.bias", 0, idxs, root))
    return out


def expand_units(
    groups: Sequence[ChannelGroup],
    keeps: Sequence[torch.Tensor],
    params: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Turn one keep decision per group unit into a mask set over every member parameter.

    Args:
        groups: from :func:`channel_groups`.
        keeps: one bool tensor ``(group.channels,)`` per group, True = keep.
        params: the model's parameters by name (shapes and devices).
    """
    masks: dict[str, torch.Tensor] = {}
    for group, keep in zip(groups, keeps, strict=True):
        keep = keep.repeat(group.repeat)  # unit u -> root channels u + k * channels
        for name, dim, pos, root in group.params:
            p = params[name]
            if name not in masks:
                masks[name] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
            drop = ~keep.to(p.device)[torch.tensor(root, device=p.device)]
            masks[name].index_fill_(dim, torch.tensor(pos, device=p.device)[drop], False)
    return masks


def kept_channels(
    groups: Sequence[ChannelGroup], masks: Mapping[str, torch.Tensor]
) -> dict[str, list[int]]:
    """``{root module name: sorted kept output channels}`` of a neuron mask set.

    This is the whole record of a physical child: :func:`slim` replays it. A group traced
    in a submodule (:mod:`pat.masks.scopes`) is named ``"scope/root"``.
    """
    kept = {}
    for g in groups:
        name, dim, pos, root = g.params[0]  # the root layer's own weight
        m = masks[name].movedim(dim, 0)
        whole = m.reshape(m.shape[0], -1).all(1).tolist()
        kept[g.key] = sorted(r for p, r in zip(pos, root, strict=True) if whole[p])
    return kept


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
