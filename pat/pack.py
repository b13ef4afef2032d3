"""Packed ensembles: disjoint physical children run as one grouped network.

Physical children of a ``partition`` split have the same widths and share no channel of
the parent. :func:`pack` assembles M of them into one network: every Conv becomes a grouped
Conv (``groups = M x`` the child's groups, group ``i`` holding child ``i``'s channels),
every Linear a block-diagonal :class:`PackedLinear`, every BatchNorm one BatchNorm over the
concatenated channels (each child's statistics kept in its own slice). The input is fanned
out to the M groups and the output split per child: ``forward`` returns ``(M, B, C)`` logits.

A model whose forward mixes channels outside its layers (a concatenation, a channel
shuffle, a LayerNorm over channels) cannot be laid out this way; :func:`pack` runs the
packed network once against the children and refuses, naming the first layer whose output
differs.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pat.errors import PatError, check, first_line
from pat.masks.apply import default_example_inputs
from pat.modes import eval_mode
from pat.records import Child, child_record

__all__ = ["PackedLinear", "PackedEnsemble", "group", "group_masks", "pack", "verify", "unpack", "child_state",
           "save_packed", "load_packed", "packed_header"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class PackedLinear(nn.Module):
    """M independent Linear layers on the M blocks of the last dimension (block-diagonal)."""

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """Apply member m's layer to block m of ``x``.

        Args:
            x: (..., M * in_features) the members' inputs side by side.

        Returns:
            (..., M * out_features) the members' outputs side by side.
        """
        x = x.unflatten(-1, (self.members, self.in_features))
        out = torch.einsum("...mi,moi->...mo", x, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.flatten(-2)

    def extra_repr(self) -> str:
        """The layer's sizes, shown in ``repr(module)``."""
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


class PackedEnsemble(nn.Module):
    """M children as one network; ``forward(x)`` returns ``(M, B, num_classes)`` logits."""

    def __init__(self, network: nn.Module, members: int, template: nn.Module,
                 kept: list[dict[str, list[int]]]) -> None:
        super().__init__()
        self.network, self.members = network, members
        self.kept = kept  # each child's kept record, in the parent's numbering
        # one child's architecture, for unpacking; kept out of the state dict and off the device
        object.__setattr__(self, "_template", template)

    def forward(self, x: Tensor) -> Tensor:
        """Run every child on the same batch.

        Args:
            x: (B, C, ...) one batch, the parent's input.

        Returns:
            (M, B, num_classes) each child's logits.
        """
        out = self.network(torch.cat([x] * self.members, dim=1))
        return out.unflatten(1, (self.members, -1)).transpose(0, 1)


def _packed_layer(name: str, layers: Sequence[nn.Module]) -> nn.Module | None:
    """The packed counterpart of the children's layer ``name`` (None: it has no parameters)."""
    m, n = layers[0], len(layers)

    def cat(attr: str) -> Tensor:
        return torch.cat([getattr(layer, attr).detach() for layer in layers])

    if type(m) is nn.Conv2d:
        new = nn.Conv2d(n * m.in_channels, n * m.out_channels, m.kernel_size, m.stride, m.padding,
                        m.dilation, n * m.groups, m.bias is not None, m.padding_mode)
    elif type(m) is nn.Linear:
        new = PackedLinear(n, m.in_features, m.out_features, m.bias is not None)
        with torch.no_grad():
            new.weight.copy_(torch.stack([layer.weight.detach() for layer in layers]))
            if m.bias is not None:
                new.bias.copy_(torch.stack([layer.bias.detach() for layer in layers]))
        return new.to(m.weight.device)
    elif type(m) in _NORMS:
        new = type(m)(n * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if m.track_running_stats:
            new.running_mean, new.running_var = cat("running_mean"), cat("running_var")
            new.num_batches_tracked = m.num_batches_tracked.detach().clone()
    elif next(m.parameters(recurse=False), None) is None and next(m.buffers(recurse=False), None) is None:
        return None
    else:
        raise PatError(f"pack: layer {name!r} ({type(m).__name__}) has parameters that cannot be "
                       "split into groups; pack supports Conv2d, Linear and BatchNorm.")
    with torch.no_grad():
        for attr in ("weight", "bias"):
            if getattr(m, attr, None) is not None:
                getattr(new, attr).copy_(cat(attr))
    device = next(iter([*m.parameters(recurse=False), *m.buffers(recurse=False)])).device
    return new.to(device)


def _check_children(children: Sequence[nn.Module]) -> None:
    check(len(children) >= 2, f"pack needs at least 2 children. Got {len(children)}.")
    kept = [(child_record(child) or Child()).kept for child in children]
    for i, record in enumerate(kept):
        if not record:
            raise PatError(f"pack: children[{i}] is not a physical neuron-level child; split with "
                           "level='neuron', method='partition', physical=True (--level neuron "
                           "--method partition --physical).")
    first = kept[0]
    for i, record in enumerate(kept[1:], start=1):
        check(set(record) == set(first), f"pack: children[{i}] was split over other layers than children[0].")
    for layer in first:
        seen: set[int] = set()
        for i, record in enumerate(kept):
            channels = set(record[layer])
            if channels & seen:
                raise PatError(f"pack: children[{i}] shares channels of layer {layer!r} with an earlier "
                               "child; pack needs disjoint children (method 'partition').")
            seen |= channels
    shapes = {k: v.shape for k, v in children[0].state_dict().items()}
    for i, child in enumerate(children[1:], start=1):
        for key, value in child.state_dict().items():
            if shapes.get(key) != value.shape:
                raise PatError(f"pack: children[{i}] has {key!r} of shape {tuple(value.shape)} where "
                               f"children[0] has {tuple(shapes.get(key, ()))}; pack needs equal widths "
                               "(channel counts divisible by the number of children).")


def _bare_copy(child: nn.Module) -> nn.Module:
    """A copy of ``child`` without the records :func:`pat.split` attaches to it."""
    copied = copy.deepcopy(child)
    copied.__dict__.pop("pat_child", None)
    return copied


def group(children: Sequence[nn.Module]) -> PackedEnsemble:
    """Lay out children of one architecture as the groups of one network (not verified).

    Unlike :func:`pack` the children may overlap or be masked (full-width) children: each
    group is an independent copy of its child, so the grouped network computes every child
    at once. Whether the model's forward keeps the groups apart is for the caller to check
    (:func:`verify`).
    """
    check(len(children) >= 2, f"grouping needs at least 2 children. Got {len(children)}.")
    first = children[0].state_dict()
    for i, child in enumerate(children[1:], start=1):
        state = child.state_dict()
        for key in first.keys() | state.keys():
            if key not in state or key not in first or state[key].shape != first[key].shape:
                mine = tuple(state[key].shape) if key in state else "missing"
                theirs = tuple(first[key].shape) if key in first else "missing"
                raise PatError(f"children[{i}] has {key!r} of shape {mine} where children[0] has "
                               f"{theirs}; children tuned or packed together need one architecture.")
    network = _bare_copy(children[0])
    per_child = [dict(child.named_modules()) for child in children]
    for name, _ in list(network.named_modules()):
        if not name:
            continue
        layers = [modules.get(name) for modules in per_child]
        if any(type(layer) is not type(layers[0]) for layer in layers):
            raise PatError(f"children differ at layer {name!r}; children tuned or packed together "
                           "need one architecture.")
        new = _packed_layer(name, layers)
        if new is not None:
            owner, _, attr = name.rpartition(".")
            setattr(network.get_submodule(owner) if owner else network, attr, new)
    return PackedEnsemble(network, len(children), _bare_copy(children[0]).to("meta"),
                          [dict((child_record(child) or Child()).kept or {}) for child in children])


def group_masks(packed: PackedEnsemble, masks: Sequence[dict[str, Tensor] | None]) -> dict[str, Tensor]:
    """Per-child masks laid out like :func:`group`'s parameters, keyed by ``network.<name>``.

    A child without a mask for a parameter (or without masks) keeps all of that parameter.
    """
    params = dict(packed.network.named_parameters())
    names = {key for mask in masks if mask for key in mask}
    out = {}
    for key in sorted(names):
        check(key in params, f"a mask names {key!r}, which the children do not have.")
        owner = packed.network.get_submodule(key.rpartition(".")[0])
        chunks = params[key].unbind(0) if isinstance(owner, PackedLinear) else params[key].chunk(packed.members, 0)
        parts = [(mask or {}).get(key, torch.ones_like(chunk, dtype=torch.bool)).to(chunk.device, torch.bool)
                 for mask, chunk in zip(masks, chunks, strict=True)]
        out[f"network.{key}"] = torch.stack(parts) if isinstance(owner, PackedLinear) else torch.cat(parts)
    return out


def pack(children: Sequence[nn.Module], *, example_inputs: Any = None, atol: float = 1e-4) -> PackedEnsemble:
    """Assemble disjoint physical children (:func:`pat.split` with ``physical=True``) into one network.

    The children are not modified. ``example_inputs`` (a batch, e.g. ``torch.randn(2, 3, 32,
    32)``; default from the pat spec) is run through the packed network and the children once,
    in eval mode: the packed network is returned only if its per-child outputs match.
    """
    _check_children(children)
    packed = group(children)
    x = example_inputs if example_inputs is not None else default_example_inputs(children[0])
    if x is None:
        raise PatError("pack: example_inputs is needed for a model without a pat spec, e.g. torch.randn(2, 3, 32, 32).")
    _verify(packed, children, x, atol)
    return packed


def verify(packed: PackedEnsemble, children: Sequence[nn.Module], example_inputs: Any, *,
           atol: float = 1e-4, what: str = "pack") -> None:
    """Refuse (:class:`PatError`) a grouped network whose outputs differ from its children's."""
    _verify(packed, children, example_inputs, atol, what=what)


@torch.no_grad()
def _verify(packed: PackedEnsemble, children: Sequence[nn.Module], x: Tensor, atol: float,
            what: str = "pack") -> None:
    """Refuse a packed network whose outputs differ from the children's, naming the first layer."""
    with contextlib.ExitStack() as stack:
        for module in (packed, *children):
            stack.enter_context(eval_mode(module))
        got, want = packed(x), torch.stack([child(x) for child in children])
        if torch.allclose(got, want, atol=atol, rtol=1e-4):
            return
        seen: dict[str, list[Tensor]] = {}
        order: list[tuple[str, Tensor]] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, []).append(out))
                 for child in children for name, m in child.named_modules()]
        hooks += [m.register_forward_hook(lambda _m, _i, out, name=name: order.append((name, out)))
                  for name, m in packed.network.named_modules()]
        try:
            for child in children:
                child(x)
            packed(x)
        finally:
            for h in hooks:
                h.remove()
    for name, out in order:
        mine = seen.get(name)
        if isinstance(out, Tensor) and mine and all(isinstance(t, Tensor) for t in mine) and name:
            if out.dim() < 2 or not torch.allclose(out, torch.cat(mine, dim=1), atol=atol, rtol=1e-4):
                raise PatError(f"{what}: the model mixes the children's channels before layer {name!r} "
                               "(a concatenation, reshape or channel-wide norm in its forward); its "
                               "children cannot be grouped into one network. They still tune and run "
                               "one by one.")
    raise PatError(f"{what}: the grouped network's outputs differ from the children's; they cannot be grouped.")


@torch.no_grad()
def child_state(packed: PackedEnsemble, index: int) -> dict[str, Tensor]:
    """Child ``index``'s state dict, as views into the packed network's tensors."""
    m = packed.members
    layers = dict(packed.network.named_modules())
    state = {}
    for key in packed._template.state_dict():
        owner, _, attr = key.rpartition(".")
        source = getattr(layers[owner], attr)
        if isinstance(layers[owner], PackedLinear):
            state[key] = source[index]
        elif attr == "num_batches_tracked":
            state[key] = source
        else:
            state[key] = source.chunk(m, dim=0)[index]
    return state


@torch.no_grad()
def unpack(packed: PackedEnsemble, *, device: str | torch.device | None = None) -> list[nn.Module]:
    """The M children a packed network holds, as separate modules with their current weights."""
    device = device if device is not None else next(packed.parameters()).device
    children = []
    for i in range(packed.members):
        child = copy.deepcopy(packed._template).to_empty(device=device)
        child.load_state_dict(child_state(packed, i))
        recipes = getattr(packed, "recipes", None)  # a packed file's (load_packed)
        child.pat_child = Child(recipe=dict(recipes[i]) if recipes else {}, kept=packed.kept[i])
        children.append(child)
    return children


# -- the packed member file ---------------------------------------------------------------
PACKED_KIND = "packed"


def save_packed(path: str | os.PathLike, packed: PackedEnsemble, names: Sequence[str], *,
                arch: dict[str, Any] | None = None, input_shape: Sequence[int] | None = None,
                recipes: Sequence[dict[str, Any]] | None = None, **extra: Any) -> None:
    """Save a packed ensemble as one ``kind="packed"`` checkpoint (plain data, ``weights_only``).

    Args:
        path: the ``.pt`` file, written atomically.
        packed: from :func:`pack` (or :func:`load_packed`).
        names: one member name per child, in the packed order.
        arch: the *parent's* architecture spec ``{"name", "kwargs"}``; default the spec
            :func:`pat.models.create_model` attached to the children.
        input_shape: the shape the parent was traced with when the children were slimmed;
            default ``recipes[0]["input_shape"]``.
        recipes: each child's recipe (the ``recipe`` of its :class:`pat.records.Child`).
        **extra: more plain entries (status, dataset, num_classes, ...).
    """
    from pat.engine.checkpoint import save_model
    from pat.models import spec_of

    m = packed.members
    names, recipes = [str(n) for n in names], [dict(r) for r in (recipes or [{} for _ in range(m)])]
    check(len(names) == m, f"names must have one entry per packed child ({m}). Got {len(names)}.")
    check(len(set(names)) == m, f"names must be distinct. Got {names}.")
    check(len(recipes) == m, f"recipes must have one entry per packed child ({m}). Got {len(recipes)}.")
    check(all(packed.kept), "save_packed needs physical children (each with its kept record).")
    input_shape = input_shape if input_shape is not None else recipes[0].get("input_shape")
    check(input_shape is not None, "save_packed needs input_shape (the shape the parent was traced with).")
    arch = dict(arch) if arch is not None else spec_of(packed._template)
    check(arch is not None, "save_packed needs arch, the parent's spec {'name', 'kwargs'}.")
    save_model(path, packed, kind=PACKED_KIND, arch=arch, input_shape=[int(s) for s in input_shape],
               members=m, names=names, recipes=recipes,
               kept=[{k: [int(i) for i in v] for k, v in kept.items()} for kept in packed.kept], **extra)


def load_packed(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                argument: str = "packed") -> PackedEnsemble:
    """Load a file written by :func:`save_packed`: ``.names`` and ``.recipes`` come with it.

    One child skeleton is rebuilt from the parent's architecture, child 0's kept record and
    ``input_shape`` (the children have equal widths), laid out M times as one grouped
    network, and the saved weights are loaded into it.
    """
    from pat.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, argument=argument)
    where = f"{argument} {str(path)!r}"
    header = packed_header(ckpt, where)
    skeleton = _skeleton(ckpt, where)
    skeleton.pat_child = Child(kept=header["kept"][0])
    packed = group([skeleton] * header["members"])
    packed.kept = header["kept"]
    try:
        packed.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise PatError(f"{where}: weights do not fit {header['members']} packed children of "
                       f"{ckpt['arch']['name']!r} ({first_line(e)}).") from None
    packed.names, packed.recipes = header["names"], header["recipes"]
    return packed.to(device)


def packed_header(ckpt: dict[str, Any], where: str) -> dict[str, Any]:
    """The plain entries of a packed checkpoint, checked: members, names, kept, recipes."""
    if ckpt.get("kind") != PACKED_KIND:
        raise PatError(f"{where} is not a packed checkpoint (kind={ckpt.get('kind')!r}).")
    m, names, kept = ckpt.get("members"), ckpt.get("names"), ckpt.get("kept")
    recipes = ckpt.get("recipes") or [{} for _ in range(m if isinstance(m, int) else 0)]
    if not isinstance(m, int) or m < 2 or not isinstance(names, list) or not isinstance(kept, list) \
            or not len(names) == len(kept) == len(recipes) == m or not all(kept):
        raise PatError(f"{where}: 'members', 'names', 'kept' and 'recipes' must describe the same "
                       f"children (at least 2). Got members={m!r} and {_count(names)} names, "
                       f"{_count(kept)} kept records, {_count(recipes)} recipes.")
    if not ckpt.get("arch") or not ckpt.get("input_shape") or not isinstance(ckpt.get("state_dict"), dict):
        raise PatError(f"{where}: a packed checkpoint needs 'arch', 'input_shape' and 'state_dict'.")
    return {"members": m, "names": [str(n) for n in names], "kept": [dict(k) for k in kept],
            "recipes": [dict(r) for r in recipes]}


def _count(value: Any) -> int | str:
    return len(value) if isinstance(value, list) else "no"


def _skeleton(ckpt: dict[str, Any], where: str) -> nn.Module:
    """One child's architecture (weights unset): the parent's, slimmed to child 0's channels."""
    from pat.masks.physical import rebuild_physical
    from pat.models import create_model

    arch = ckpt["arch"]
    model = create_model(arch["name"], **arch.get("kwargs", {}))
    try:
        return rebuild_physical(model, ckpt["kept"][0], input_shape=ckpt["input_shape"])
    except (KeyError, IndexError, RuntimeError) as e:
        raise PatError(f"{where}: child 0's kept record does not fit architecture {arch['name']!r} "
                       f"({first_line(e)}).") from None
