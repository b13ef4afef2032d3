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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pat.errors import PatError

__all__ = [
    "ChannelGroup",
    "dependency_graph",
    "channel_groups",
    "kept_channels",
    "slim",
    "rebuild_physical",
]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are kept or removed together.

    Attributes:
        root: module name of the group's root Conv/Linear (its output channels are the
            group's ``channels`` units).
        channels: number of units n.
        params: what a pruned unit zeroes in a masked child, as
            ``(parameter name, dim, positions along dim, root unit of each position)``:
            the output rows and biases of every coupled layer and the entries of the
            norm layers that follow them. Input-side weights are left alone: they only
            ever see the zero activation.
    """

    root: str
    channels: int
    params: tuple[tuple[str, int, tuple[int, ...], tuple[int, ...]], ...]


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*example_inputs)


def dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    """torch-pruning's ``DependencyGraph`` of ``model``, traced on ``example_inputs``.

    The model's train/eval modes are restored afterwards (tracing switches to eval).

    Raises:
        PatError: the model cannot be traced; names the innermost layer that was running.
    """
    from pat.masks._tp import torch_pruning

    tp = torch_pruning()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)  # so torch-pruning does not unpack the batch
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []  # names of the modules whose forward has not returned yet

    def enter(module: nn.Module, _inputs: Any) -> None:
        running.append(names[module])

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        running.pop()

    hooks = [
        h
        for m in model.modules()
        for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            # Our own forward_fn: torch-pruning's default retries a failed call with other
            # argument packing, which hides the first (informative) error.
            return tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=_forward, verbose=False
            )
    except Exception as e:  # noqa: BLE001 - torch-pruning raises anything from assert to KeyError
        where = f" at layer {running[-1]!r}" if running and running[-1] else ""
        raise PatError(
            f"torch-pruning cannot trace {type(model).__name__}{where} ({_first_line(e)}); "
            "use level='connection' or exclude that layer."
        ) from None
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode


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
        cannot be zeroed per channel (attention) are left out.
    """
    from pat.masks.apply import PRUNABLE_TYPES

    graph = dependency_graph(model, example_inputs)
    allowed = set(roots)
    names = {m: n for n, m in model.named_modules()}
    ignored = [
        m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and n not in allowed
    ]
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES):
        root = group[0].dep.target.module
        members: list[tuple[str, int, tuple[int, ...], tuple[int, ...]]] = []
        for item in group:
            target = item.dep.target.module
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
            n = graph.get_pruner_of_module(root).get_out_channels(root)
            groups.append(ChannelGroup(root=names[root], channels=int(n), params=tuple(members)))
    return groups


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

    This is the whole record of a physical child: :func:`slim` replays it.
    """
    kept = {}
    for g in groups:
        name, dim, pos, root = g.params[0]  # the root layer's own weight
        m = masks[name].movedim(dim, 0)
        whole = m.reshape(m.shape[0], -1).all(1).tolist()
        kept[g.root] = sorted(r for p, r in zip(pos, root, strict=True) if whole[p])
    return kept


def slim(model: nn.Module, kept: Mapping[str, Sequence[int]], example_inputs: Any) -> nn.Module:
    """Remove, in place, every output channel of each root not in ``kept[root]``.

    Coupled layers (norms, the inputs of the layers that follow, the other branch of a
    residual add, the slices of a concatenation) shrink with their root.

    Returns:
        ``model``, now thinner.
    """
    graph = dependency_graph(model, example_inputs)
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
                    f"torch-pruning cannot remove channels of layer {root!r} ({_first_line(e)})."
                ) from None
    return model


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
