"""Exact selection of the ``m`` smallest hashed scores, without sorting them.

:func:`lowest` is what every mask method reduces to (see :mod:`pat.masks.generate`): one
pass over each tensor's hash writes the mask at the expected threshold, and the few
elements by which the count misses are found by inverting the hash
(:mod:`pat.masks.hashing`). :func:`ranks_below` is the plain stable sort, for scores that
are not a hash.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from pat.masks.hashing import WordHash, hash_chunks, one_thread_per_op, unhash_, word_hash

__all__ = ["ranks_below", "lowest"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_WINDOW = 1 << 20  # score values inverted at once per tensor by _nearest() (4 MiB of int32)

Unit = tuple[int, tuple[int, int], "torch.device | str"]  # (n, stream key, device)


def ranks_below(scores: Sequence[torch.Tensor], m: int) -> list[torch.Tensor]:
    """Bool masks, one per score tensor, of the ``m`` elements with the smallest scores.

    Exact, by a stable sort of everything: ties go to the earlier tensor, then to the
    lower index. For scores that are not a hash (a few channels); hashed tensors of any
    size take :func:`lowest`.
    """
    flat = [s.reshape(-1) for s in scores]
    n = sum(s.numel() for s in flat)
    keep = torch.zeros(n, dtype=torch.bool)
    if m > 0:
        keep[torch.sort(torch.cat([s.cpu() for s in flat]), stable=True).indices[:m]] = True
    return [
        k.to(s.device).view(s.shape)
        for k, s in zip(keep.split([s.numel() for s in flat]), scores, strict=True)
    ]


def lowest(units: Sequence[Unit], ms: Iterable[int]) -> dict[int, list[torch.Tensor]]:
    """For each ``m``: bool masks of the ``m`` lowest hash scores over all ``units``.

    Equal to ``ranks_below([hash_scores(*u) for u in units], m)`` (ties between tensors go
    to the earlier one), without storing or sorting the scores: one pass hashes each
    cache-sized chunk and writes ``score < c`` at the expected ``m``-th smallest score
    ``c``, counting as it goes. That misses ``m`` by ``delta``, about ``sqrt(n)/2``;
    :func:`_nearest` finds the ``|delta|`` elements just past ``c`` by inverting the hash,
    and they are switched on (or off). Several ``m`` share the pass.

    Args:
        units: ``(n, key, device)`` per tensor, as for :func:`hash_scores`.
        ms: how many to select.

    Returns:
        ``{m: [bool (n,) per unit]}``.
    """
    n = sum(u[0] for u in units)
    out: dict[int, list[torch.Tensor]] = {}
    todo = []
    for m in sorted(set(ms)):
        if 0 < m < n:
            todo.append(m)
        else:  # nothing or everything
            out[m] = [torch.full((u[0],), m > 0, dtype=torch.bool, device=u[2]) for u in units]
    if not todo:
        return out
    guess = {m: min(_INT32_MAX, _INT32_MIN + round(m / n * 2.0**32)) for m in todo}
    masks = {m: [torch.empty(u[0], dtype=torch.bool, device=u[2]) for u in units] for m in todo}
    counts: dict[int, list[torch.Tensor]] = {m: [] for m in todo}
    with one_thread_per_op():
        for j, (nu, key, device) in enumerate(units):
            for start, part in hash_chunks(nu, key, device):
                for m, c in guess.items():
                    below = masks[m][j][start : start + part.numel()]
                    torch.lt(part, c, out=below)
                    # while in cache; a uint8 sum is cheaper than count_nonzero
                    counts[m].append(below.view(torch.uint8).sum(dtype=torch.int32))
    found = torch.stack([torch.stack(counts[m]).sum(dtype=torch.int64) for m in todo]).tolist()
    hashers = [word_hash(nu, key) for nu, key, _ in units]
    for (m, c), count in zip(guess.items(), found, strict=True):
        delta = m - count
        for j, idx in _nearest(hashers, [u[2] for u in units], c, delta).items():
            masks[m][j][idx] = delta > 0
        out[m] = masks[m]
    return out


def _nearest(
    hashers: list[WordHash], devices: list[torch.device | str], c: int, delta: int
) -> dict[int, torch.Tensor]:
    """``{unit: indices}`` of the ``|delta|`` scores nearest ``c`` on one side, over all units.

    These are the ``delta`` smallest scores ``>= c`` (``delta > 0``), or the ``-delta``
    largest scores ``< c`` (``delta < 0``), in the order of (score, unit, index).
    """
    want = abs(delta)
    n = sum(h.n for h in hashers)
    picked: dict[int, list[torch.Tensor]] = {}
    lo = hi = c  # the score values [lo, hi) inverted so far
    while want:
        # a window expected to hold 1.25x what is still wanted (+16), at most _WINDOW
        # values of any one tensor
        width = math.ceil((want * 1.25 + 16) / n * 2.0**32)
        width = min(width, _WINDOW * min(h.step for h in hashers))
        if delta > 0:
            a, b = hi, min(hi + width, _INT32_MAX + 1)
            hi = b
        else:
            a, b = max(lo - width, _INT32_MIN), lo
            lo = a
        if a >= b:  # cannot happen: the units hold m scores below c and n - m above
            raise RuntimeError("mask selection ran out of scores")
        vals, owners, idxs = [], [], []
        for j, (h, device) in enumerate(zip(hashers, devices, strict=True)):
            first = -(-a // h.step) * h.step  # the word's first value >= a
            if first >= b:
                continue
            v = torch.arange(first, b, h.step, dtype=torch.int64, device=device).to(torch.int32)
            i = unhash_(v.clone(), h)
            hit = i >= 0
            vals.append(v[hit].cpu())
            idxs.append(i[hit].cpu())
            owners.append(torch.full((vals[-1].numel(),), j, dtype=torch.int64))
        if not vals:
            continue
        v_all, u_all, i_all = torch.cat(vals), torch.cat(owners), torch.cat(idxs)
        order = torch.sort(v_all, stable=True).indices  # ties: earlier unit (cat order)
        order = order[:want] if delta > 0 else order[max(0, order.numel() - want) :]
        want -= order.numel()
        for j in u_all[order].unique().tolist():
            sel = order[u_all[order] == j]
            picked.setdefault(j, []).append(i_all[sel].to(torch.int64))
    return {j: torch.cat(parts).to(devices[j]) for j, parts in picked.items()}
