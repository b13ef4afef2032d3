"""Coupled output channels: which channels a neuron mask must keep or remove together.

Channels joined by a residual add, a concatenation or a depthwise convolution must be
kept or removed together, or the slimmed network no longer fits together. torch-pruning's
dependency graph (:func:`pat.masks.physical.dependency_graph`) finds these groups; a neuron
mask makes one decision per group channel, so it always describes a network that
:func:`pat.masks.physical.slim` can build. :func:`kept_channels` turns a child's masks
into its kept record.

References:
    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (torch-pruning).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pat.errors import PatError
from pat.masks.limits import OutOfBounds, bounded, memory_limit, time_limit
from pat.masks.physical import _describe, dependency_graph

__all__ = ["ChannelGroup", "channel_groups", "expand_units", "kept_channels"]

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
