"""Mask generation: random, anti-random (complement, partition) and cyclic anti-random.

Generating is pure: the masks are a function of (seed, child, parameter or group name,
element index) and of nothing else: no global RNG, and the same bits on CPU and CUDA
(see :mod:`pat.masks.hashing`).

Every unit (a weight at connection level, an output channel at neuron level) gets a
random score; a tensor's units are ranked by score, rank r in [0, n) with position
u = r / n. Then

* ``random``: child c keeps the round((1 - s) * n) best-ranked units of its own draw;
* ``cyclic``: one draw for all N children; child i keeps the units with
  (u - i/N) mod 1 < d, d = 1 - s. Each unit is kept by floor(dN) or ceil(dN) children and
  each child keeps floor(dn) or ceil(dn) units of a tensor of n;
* ``partition`` is cyclic with d = 1/N (every unit in exactly one child);
* ``anti-random`` is cyclic with N = 2, d = 1/2 per pair of children, a fresh draw per
  pair: complement pairs (M, 1 - M).

Pair p of ``anti-random`` uses the same draw as ``cyclic``/``partition`` with p = 0, so
the three coincide at two children; ``random`` child c draws from its own stream.

References:
    Whitaker & Whitley, "Prune and Tune Ensembles: Low-Cost Ensemble Learning with Sparse
    Independent Subnetworks", AAAI 2022 (random and anti-random masks).
    Malaiya, "Antirandom testing: getting the most out of black-box testing", ISSRE 1995.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import nn

from pat.errors import PatError
from pat.masks.apply import MaskSet, prunable_parameters, require_example_inputs
from pat.masks.hashing import hash_scores, one_thread_per_op, stream_key
from pat.masks.selection import lowest, ranks_below

__all__ = [
    "METHODS",
    "LEVELS",
    "SCOPES",
    "resolve_density",
    "check_recipe",
    "decide",
    "generate_masks",
]

METHODS = ("random", "anti-random", "partition", "cyclic")
LEVELS = ("connection", "neuron")
SCOPES = ("layer", "global")
_INT32_MIN = -(2**31)
Unit = tuple[str, int, torch.device]  # (name hashed into the scores, number of units, device)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_density(
    method: str, children: int, sparsity: float | None = None, density: float | None = None
) -> Fraction:
    """Validate the recipe and return the density d = 1 - s each child keeps.

    The default is 1/2, except for ``partition`` (1/N). Values are read as fractions with
    denominators up to 10**6, so ``sparsity=0.9`` keeps exactly a tenth.

    Raises:
        PatError: one line naming the argument and the value.
    """
    if method not in METHODS:
        raise PatError(f"method must be one of {', '.join(map(repr, METHODS))}. Got {method!r}.")
    if not (isinstance(children, int) and not isinstance(children, bool) and children >= 1):
        raise PatError(f"children must be an integer >= 1. Got {children!r}.")
    if sparsity is not None and density is not None:
        raise PatError(
            f"give sparsity or density, not both. Got sparsity={sparsity!r}, density={density!r}."
        )
    d: Fraction | None = None
    if density is not None:
        if not (_is_number(density) and 0 < density <= 1):
            raise PatError(f"density must be in (0, 1]. Got {density!r}.")
        d = Fraction(density).limit_denominator(10**6)
    elif sparsity is not None:
        if not (_is_number(sparsity) and 0 <= sparsity < 1):
            raise PatError(f"sparsity must be in [0, 1). Got {sparsity!r}.")
        d = 1 - Fraction(sparsity).limit_denominator(10**6)
    given = f"sparsity={sparsity!r}" if sparsity is not None else f"density={density!r}"
    if method == "partition":
        if children < 2:
            raise PatError(f"method='partition' needs children >= 2. Got {children}.")
        if d is not None and d != Fraction(1, children):
            raise PatError(
                f"method='partition' with children={children} implies sparsity 1 - 1/{children}; "
                f"leave sparsity out or use method='cyclic'. Got {given}."
            )
        return Fraction(1, children)
    if method == "anti-random" and d is not None and d != Fraction(1, 2):
        raise PatError(
            "method='anti-random' makes complement pairs at sparsity 0.5; use method='cyclic' "
            f"for other sparsities. Got {given}."
        )
    return Fraction(1, 2) if d is None else d


def check_recipe(
    children: int,
    method: str,
    sparsity: float | None,
    density: float | None,
    level: str,
    scope: str,
    seed: int,
) -> Fraction:
    """All argument checks of :func:`generate_masks`, before any work; returns the density."""
    d = resolve_density(method, children, sparsity, density)
    if level not in LEVELS:
        raise PatError(f"level must be one of {', '.join(map(repr, LEVELS))}. Got {level!r}.")
    if scope not in SCOPES:
        raise PatError(f"scope must be one of {', '.join(map(repr, SCOPES))}. Got {scope!r}.")
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise PatError(f"seed must be an integer. Got {seed!r}.")
    return d


def _plan(method: str, children: int) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Draws and who uses them: ``[(draw, [(child, i, N), ...])]``; N = 0 means random."""
    if method == "random":
        return [(2 * c + 1, [(c, 0, 0)]) for c in range(children)]
    if method == "anti-random":
        plan = [(2 * p, [(2 * p, 0, 2), (2 * p + 1, 1, 2)]) for p in range(children // 2)]
        if children % 2:  # the unpaired last child: a random mask at s = 0.5
            plan.append((2 * children - 1, [(children - 1, 0, 0)]))
        return plan
    return [(0, [(c, c, children) for c in range(children)])]


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def decide(
    units: Sequence[Unit],
    *,
    children: int,
    method: str,
    density: Fraction,
    scope: str = "layer",
    seed: int = 0,
    min_one: bool = False,
) -> list[list[torch.Tensor]]:
    """Keep decisions ``[child][unit set] -> bool (n,)``, the core of every method.

    Args:
        units: ``(name, n, device)`` per unit set (a tensor, or a channel group).
        children: number of children N.
        method: ``random``, ``anti-random``, ``partition`` or ``cyclic``.
        density: d = 1 - s, exact.
        scope: ``layer`` ranks each unit set alone; ``global`` ranks all together.
        seed: the decisions are a pure function of it and of each unit set's name.
        min_one: ``random`` keeps at least one unit per set (neuron level: a layer with
            no channel left cannot be slimmed).
    """
    out: list[list[torch.Tensor | None]] = [[None] * len(units) for _ in range(children)]
    sets = [[i] for i in range(len(units))] if scope == "layer" else [list(range(len(units)))]
    jobs = [(members, draw, users) for members in sets for draw, users in _plan(method, children)]

    def run(job: tuple[list[int], int, list[tuple[int, int, int]]]) -> None:
        members, draw, users = job
        n = sum(units[i][1] for i in members)
        draws = [(units[i][1], stream_key(seed, draw, units[i][0]), units[i][2]) for i in members]
        for child, masks in _select(draws, n, users, method, density, min_one).items():
            for j, m in zip(members, masks, strict=True):
                out[child][j] = m

    # Each job (a tensor or set, one draw) runs its ops on one thread; on CPU the jobs
    # are spread over torch's threads, largest first. The result does not depend on it.
    jobs.sort(key=lambda job: -sum(units[i][1] for i in job[0]))
    with one_thread_per_op() as threads:
        on_cpu = all(torch.device(u[2]).type == "cpu" for u in units)
        if on_cpu and threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
                list(pool.map(run, jobs))  # list(): re-raise the first error
        else:
            for job in jobs:
                run(job)
    return out  # type: ignore[return-value]


def _select(
    draws: list[tuple[int, tuple[int, int], torch.device]],
    n: int,
    users: list[tuple[int, int, int]],
    method: str,
    density: Fraction,
    min_one: bool,
) -> dict[int, list[torch.Tensor]]:
    """The masks of the children that share one draw: ``{child: [bool (n_j,)]}``."""
    bounds: dict[int, tuple[int, int | None]] = {}
    for child, i, big_n in users:
        if big_n == 0:  # random: exactly round((1 - s) n), half up
            d = Fraction(1, 2) if method == "anti-random" else density
            bounds[child] = (math.floor(d * n + Fraction(1, 2)), None)
        else:  # cyclic: ranks r with (r/n - i/N) mod 1 < d, i.e. [a, b) taken cyclically
            start = Fraction(i, big_n)
            bounds[child] = (_ceil(start * n), _ceil((start + density) * n))
    if min_one and len(bounds) == 1 and next(iter(bounds.values()))[1] is None:
        # Each set's best unit is kept first, in every random draw (neuron level: a layer
        # with no channel left cannot be slimmed). Channel counts are small: plain scores.
        scores = [hash_scores(*d) for d in draws]
        for s in scores:
            s[s.argmin()] = _INT32_MIN
        ((child, (k, _)),) = bounds.items()
        return {child: ranks_below(scores, max(k, len(scores)))}
    # Which "m lowest" selections each child needs; the trivial ones (0, n) are never built.
    recipes: dict[int, tuple[str, int, int]] = {}
    for child, (a, b) in bounds.items():
        if b is None:
            recipes[child] = ("lowest", a, a)
        elif b > n:  # the window wraps around: [a, n) and [0, b - n)
            recipes[child] = ("wrap", b - n, a)
        elif a == 0:
            recipes[child] = ("lowest", b, b)
        elif b == n:
            recipes[child] = ("above", a, a)
        else:
            recipes[child] = ("between", b, a)
    below = lowest(draws, {m for _, x, y in recipes.values() for m in (x, y)})
    masks, taken = {}, set()
    for child, (kind, x, y) in recipes.items():
        if kind == "lowest":  # children never share a mask tensor
            masks[child] = below[x] if x not in taken else [t.clone() for t in below[x]]
            taken.add(x)
        elif kind == "above":
            masks[child] = [~t for t in below[x]]
        elif kind == "wrap":
            masks[child] = [t | ~u for t, u in zip(below[x], below[y], strict=True)]
        else:
            masks[child] = [t & ~u for t, u in zip(below[x], below[y], strict=True)]
    return masks


def generate_masks(
    params: Mapping[str, torch.Tensor] | nn.Module,
    *,
    children: int,
    method: Literal["random", "anti-random", "partition", "cyclic"],
    sparsity: float | None = None,
    density: float | None = None,
    level: Literal["connection", "neuron"] = "connection",
    scope: Literal["layer", "global"] = "layer",
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    example_inputs: Any = None,
) -> list[MaskSet]:
    """One mask set per child.

    Args:
        params: the tensors to prune by name (:func:`prunable_parameters`), or a model
            (its default prunable parameters). Neuron level needs the model.
        children: number of mask sets N.
        method: ``random``, ``anti-random`` (complement pairs, s = 0.5; with an odd N
            the last child is an unpaired random mask), ``partition`` (s = 1 - 1/N) or
            ``cyclic`` (any N and s).
        sparsity: fraction s pruned. Default 0.5 (1 - 1/N for partition).
        density: d = 1 - s, given instead of ``sparsity``.
        level: ``connection`` (single weights) or ``neuron`` (output channels / rows, with
            coupled channels deciding together, and their biases and norm entries).
        scope: ``layer`` (each tensor or channel group at the exact density) or
            ``global`` (one ranking over all of them).
        seed: the masks are a pure function of it.
        groups: precomputed :func:`pat.masks.groups.channel_groups` (neuron level).
        example_inputs: a batch to trace the model with (neuron level; default from the
            model's pat spec).

    Returns:
        ``N`` dicts ``{parameter name: bool tensor}`` (True = keep) on each parameter's
        device.
    """
    d = check_recipe(children, method, sparsity, density, level, scope, seed)
    if level == "connection":
        if isinstance(params, nn.Module):
            params = prunable_parameters(params, example_inputs=example_inputs)
        if not params:
            raise PatError("params: nothing to prune; no Conv/Linear weight was selected.")
        units = [(name, t.numel(), t.device) for name, t in params.items()]
        keeps = decide(units, children=children, method=method, density=d, scope=scope, seed=seed)
        return [
            {name: k.view(t.shape) for (name, t), k in zip(params.items(), child, strict=True)}
            for child in keeps
        ]

    from pat.masks.groups import channel_groups, expand_units

    if not isinstance(params, nn.Module):
        raise PatError(f"level='neuron' needs the model itself. Got {type(params).__name__}.")
    model = params
    if groups is None:
        example_inputs = require_example_inputs(model, example_inputs, "level='neuron'")
        prunable = prunable_parameters(model, example_inputs=example_inputs)
        groups = channel_groups(
            model, example_inputs, roots=[n.rpartition(".")[0] for n in prunable]
        )
    if not groups:
        raise PatError("level='neuron': no channel group can be pruned; use level='connection'.")
    named = dict(model.named_parameters())
    units = [(g.root, g.channels, named[g.params[0][0]].device) for g in groups]
    keeps = decide(
        units, children=children, method=method, density=d, scope=scope, seed=seed, min_one=True
    )
    for c, child in enumerate(keeps):
        for g, keep in zip(groups, child, strict=True):
            if not bool(keep.any()):
                raise PatError(
                    f"level='neuron': child {c} keeps no channel of layer {g.root!r} "
                    f"({g.channels} channels); use fewer children, a lower sparsity, or scope='layer'."
                )
    return [expand_units(groups, child, named) for child in keeps]
