"""Counter-based random scores that are the same on every device, and exact order statistics.

A mask must be a pure function of (seed, draw, tensor name, element index) so that a
child made on a GPU can be checked against one made on a CPU. ``torch.Generator``
streams differ between CPU and CUDA, so the scores here are a hash of the element index
computed with int32 tensor ops on the tensor's own device::

    score[i] = mix32(i * K + B)         (all arithmetic mod 2**32)

``K`` (odd) and ``B`` come from (seed, draw, name); ``mix32`` is MurmurHash3's finaliser
``fmix32`` without its final xor-shift (x ^= x >> 16; x *= C1; x ^= x >> 13; x *= C2).
The dropped step only stirs the low 16 bits, which decide ranks only between scores
that share their top 16 bits, and it is a quarter of the work. Every step is a bijection
on 32-bit words, so the scores of one tensor (fewer than 2**31 elements) are all
distinct: ranks have no ties. torch has no unsigned 32-bit arithmetic on every device,
so the words live in int32: multiplication wraps the same way as uint32, and a logical
right shift is an arithmetic shift with the sign bits masked off.

References:
    Appleby, "MurmurHash3" (2011), the 32-bit finaliser ``fmix32``.
    Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011
    (counter-based generators).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from pat.errors import PatError

__all__ = ["stream_key", "hash_scores", "ranks_below", "lowest"]

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3 fmix32 multipliers
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
# int32 elements per CPU chunk: 128 KiB, so a chunk's passes run from cache; and no more
# than torch's parallel grain size, so each op runs on one thread: handing a chunk this
# small to a second thread costs more than it saves, badly so on a busy machine
# (measured: 2-4x slower with 2^16-element chunks on 2 shared cores).
_CPU_CHUNK = 1 << 15
_SMALL = 1 << 16  # up to this many scores, a full sort is cheaper than the band search
_KEEP = 1 << 28  # up to this many scores (1 GiB), lowest() keeps them for its last pass
# From this many elements, one tensor is selected by _direct(): its correction window
# (about sqrt(n)/2 * 2**32 / n scores to invert) is then small against the band search's
# extra passes (measured on CPU: 2.5x the bare hash at 3.7M elements against 3.8x; at
# 1.8M the window costs more than the band).
_DIRECT = 1 << 21
_C1_INV, _C2_INV = pow(_C1, -1, 1 << 32), pow(_C2, -1, 1 << 32)
_WINDOW = 1 << 22  # scores inverted at once by _direct() (16 MiB of int32)


def _s32(x: int) -> int:
    """The signed int32 with the same bits as ``x mod 2**32`` (what torch accepts)."""
    x &= _M32
    return x - (1 << 32) if x >> 31 else x


def _fmix32(x: int) -> int:
    """MurmurHash3's finaliser (Python ints), for the per-tensor constants."""
    x = _mix32(x)
    return x ^ (x >> 16)


def _mix32(x: int) -> int:
    """``fmix32`` without its last xor-shift: the per-element hash (see the module doc)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 13
    return (x * _C2) & _M32


def stream_key(seed: int, draw: int, name: str) -> tuple[int, int]:
    """The per-tensor constants ``(K, B)`` (signed int32, ``K`` odd) of one random draw.

    The name is hashed with CRC-32, not Python's ``hash()``, which is salted per process.
    """
    h = _fmix32(seed & _M32)
    h = _fmix32(h ^ ((seed >> 32) & _M32))
    h = _fmix32(h ^ (draw & _M32))
    h = _fmix32(h ^ zlib.crc32(name.encode("utf-8")))
    k = _fmix32(h ^ 0x9E3779B9) | 1  # odd, so i -> i*K + B is a bijection mod 2**32
    b = _fmix32(h ^ 0x7F4A7C15)
    return _s32(k), _s32(b)


def _mix_(h: torch.Tensor, tmp: torch.Tensor) -> None:
    """:func:`_mix32` in place on int32 ``h`` (``tmp``: scratch of the same shape)."""
    for shift, mult in ((16, _C1), (13, _C2)):
        torch.bitwise_right_shift(h, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)  # arithmetic -> logical shift
        h.bitwise_xor_(tmp)
        h.mul_(_s32(mult))


def _chunk_size(n: int, device: torch.device | str) -> int:
    # CPU: cache-sized chunks, so the passes of the hash (and of the selection in
    # lowest()) run from cache. Accelerators are memory-bound here: one chunk.
    return max(1, min(n, _CPU_CHUNK)) if torch.device(device).type == "cpu" else max(1, n)


def _hash_chunks(
    n: int, key: tuple[int, int], device: torch.device | str, out: torch.Tensor | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, scores[start:start + len])`` chunk by chunk.

    Without ``out`` the chunks share one scratch buffer: use each before the next.
    """
    if n >= 2**31:
        raise PatError(f"tensors of 2**31 elements or more cannot be masked. Got {n}.")
    k, b = key
    chunk = _chunk_size(n, device)
    base = torch.arange(chunk, dtype=torch.int32, device=device).mul_(k)  # i*K for i < chunk
    tmp = torch.empty(chunk, dtype=torch.int32, device=device)
    scratch = torch.empty(chunk, dtype=torch.int32, device=device) if out is None else None
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        part = scratch[:m] if out is None else out[start : start + m]
        torch.add(base[:m], _s32(start * k + b), out=part)  # (start + i)*K + B, wrapped
        _mix_(part, tmp[:m])
        yield start, part


def hash_scores(n: int, key: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores ``(n,)`` int32, pairwise distinct, uniform over the int32 range.

    Args:
        n: number of elements (< 2**31).
        key: ``(K, B)`` from :func:`stream_key`.
        device: where to compute; the result is bit-identical on every device.
    """
    h = torch.empty(n, dtype=torch.int32, device=device)
    for _ in _hash_chunks(n, key, device, out=h):
        pass
    return h


def _band(n: int, m: int) -> tuple[int, int]:
    """An int32 value range that holds the ``m``-th smallest of ``n`` uniform scores.

    Its half-width is 8 standard deviations of the binomial count below a value, so for
    hashed scores it misses with probability below 1e-15.
    """
    width = (8.0 * math.sqrt(m * (n - m) / n) + 64.0) / n * 2.0**32
    est = _INT32_MIN + (m - 0.5) / n * 2.0**32
    return max(_INT32_MIN, math.floor(est - width)), min(_INT32_MAX, math.ceil(est + width))


def _sorted_below(flat: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    """Exact by a stable sort of everything: ties go to the earlier tensor, then index."""
    order = torch.sort(torch.cat([s.cpu() for s in flat]), stable=True).indices[:m]
    keep = torch.zeros(sum(s.numel() for s in flat), dtype=torch.bool)
    keep[order] = True
    return [
        k.to(s.device) for k, s in zip(keep.split([s.numel() for s in flat]), flat, strict=True)
    ]


def _resolve(
    masks: list[torch.Tensor],
    idx: list[torch.Tensor],
    vals: list[torch.Tensor],
    m: int,
    below: int | None = None,
) -> bool:
    """Complete ``masks`` (True below the band) with the band's smallest, to ``m`` in all.

    ``idx``/``vals``: positions and scores inside the band, per tensor, in index order.
    Returns False when the band does not hold the ``m``-th smallest.
    """
    if below is None:
        below = sum(int(x.count_nonzero()) for x in masks)
    count = sum(i.numel() for i in idx)
    if not below < m <= below + count:
        return False
    take = torch.sort(torch.cat([v.cpu() for v in vals]), stable=True).indices[: m - below]
    start = 0
    for x, i in zip(masks, idx, strict=True):
        sel = take[(take >= start) & (take < start + i.numel())] - start
        x[i[sel.to(i.device)]] = True
        start += i.numel()
    return True


def ranks_below(scores: Sequence[torch.Tensor], m: int) -> list[torch.Tensor]:
    """Bool masks, one per score tensor, of the ``m`` elements with the smallest scores.

    Exact: ties (possible only between different tensors) go to the earlier tensor, then
    to the lower index. Large inputs avoid a full sort (see :func:`lowest`).
    """
    flat = [s.reshape(-1) for s in scores]
    n = sum(s.numel() for s in flat)
    if m <= 0 or m >= n:
        return [torch.full_like(s, m > 0, dtype=torch.bool) for s in scores]
    if n > _SMALL:
        lo, hi = _band(n, m)
        masks = [s < lo for s in flat]
        idx = [((s >= lo) & (s <= hi)).nonzero().squeeze(1) for s in flat]
        if _resolve(masks, idx, [s[i] for s, i in zip(flat, idx, strict=True)], m):
            return [x.view(s.shape) for x, s in zip(masks, scores, strict=True)]
    return [x.view(s.shape) for x, s in zip(_sorted_below(flat, m), scores, strict=True)]


def lowest(
    units: Sequence[tuple[int, tuple[int, int], torch.device | str]], ms: Iterable[int]
) -> dict[int, list[torch.Tensor]]:
    """For each ``m``: bool masks of the ``m`` lowest hash scores over all ``units``.

    Equal to ``ranks_below([hash_scores(*u) for u in units], m)``. Exact selection by
    ``kthvalue`` or a sort costs ~1.8 s for 36.5M elements on 2 cores; hashed scores are
    uniform, so the ``m``-th smallest lies in a narrow value band around the ``m/n``
    quantile. While each chunk of scores is in cache, it counts what lies below the band
    and keeps the few scores inside it; those alone are sorted to find the threshold
    ``t``, and each mask is then one comparison, ``score <= t`` (or ``< t``), per tensor.
    One tensor of ``_DIRECT`` elements or more takes :func:`_direct` instead (one pass,
    the hash inverted over a narrow value window).

    Args:
        units: ``(n, key, device)`` per tensor, as for :func:`hash_scores`.
        ms: how many to select; several values share one pass over the scores.

    Returns:
        ``{m: [bool (n,) per unit]}``.
    """
    n = sum(u[0] for u in units)
    ms = sorted(set(ms))
    out = {m: [torch.full((u[0],), m > 0, dtype=torch.bool, device=u[2]) for u in units]
           for m in ms if m <= 0 or m >= n}  # fmt: skip
    todo = [m for m in ms if 0 < m < n]
    if not todo:
        return out
    if n <= _SMALL:
        scores = [hash_scores(*u) for u in units]
        return {**out, **{m: _sorted_below(scores, m) for m in todo}}
    if len(units) == 1 and n >= _DIRECT:
        return {**out, **{m: [x] for m, x in _direct(units[0], todo).items()}}
    bands = {m: _band(n, m) for m in todo}
    # Scores are kept for the final comparison unless that would take too much memory;
    # then they are computed a second time.
    keep = n <= _KEEP
    scores: list[torch.Tensor | None] = []
    vals: dict[int, list[torch.Tensor]] = {m: [] for m in todo}
    nbelow = dict.fromkeys(todo, 0)
    for nu, key, device in units:
        h = torch.empty(nu, dtype=torch.int32, device=device) if keep else None
        tmp = torch.empty(_chunk_size(nu, device), dtype=torch.int32, device=device)
        found: dict[int, list[torch.Tensor]] = {m: [] for m in todo}
        sums: dict[int, list[torch.Tensor]] = {m: [] for m in todo}
        for _, part in _hash_chunks(nu, key, device, out=h):
            t = tmp if part.numel() == tmp.numel() else tmp[: part.numel()]
            for m, (lo, hi) in bands.items():
                # lo <= s <= hi in one comparison: s - lo as an unsigned word, <= hi - lo;
                # in int32 that is s - lo - 2**31 (wrapped) <= INT32_MIN + hi - lo.
                torch.sub(part, _s32(lo + 2**31), out=t)
                found[m].append(torch.masked_select(part, t <= _INT32_MIN + hi - lo))
                if lo > _INT32_MIN:  # clamp to {lo - 1, lo}: the sum counts what is below lo
                    sums[m].append(torch.clamp(part, lo - 1, lo, out=t).sum())
        for m, (lo, _) in bands.items():
            vals[m].append(torch.cat(found[m]))
            if lo > _INT32_MIN:
                nbelow[m] += lo * nu - int(torch.stack(sums[m]).sum())
        scores.append(h)
    for m in todo:
        below = _threshold(vals[m], m - nbelow[m])
        if below is None:  # scores far from uniform: cannot happen for a hash, but stay exact
            out[m] = _sorted_below([hash_scores(*u) for u in units], m)
        else:
            out[m] = [_below(s, u, t, inclusive) for s, u, (t, inclusive)
                      in zip(scores, units, below, strict=True)]  # fmt: skip
    return out


def _threshold(vals: list[torch.Tensor], k: int) -> list[tuple[int, bool]] | None:
    """Per unit, the threshold ``(t, inclusive)`` that completes the ``k`` smallest of ``vals``.

    ``vals``: each unit's scores inside the band (distinct within a unit). The ``k``-th
    smallest ``t`` of them all, ties to the earlier unit, is kept by the units whose
    ``t`` is among the ``k`` (inclusive) and not by the others. None when the band does
    not hold the ``k``-th smallest.
    """
    flat = torch.cat([v.cpu() for v in vals])
    if not 0 < k <= flat.numel():
        return None
    order = torch.sort(flat, stable=True).indices[:k]
    t = int(flat[order[-1]])
    taken = order[flat[order] == t].tolist()  # at most one per unit: scores are distinct
    starts = [0]
    for v in vals:
        starts.append(starts[-1] + v.numel())
    return [
        (t, any(a <= i < b for i in taken)) for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


def _below(
    h: torch.Tensor | None,
    unit: tuple[int, tuple[int, int], torch.device | str],
    t: int,
    inclusive: bool,
) -> torch.Tensor:
    """Bool ``(n,)``: ``score <= t`` (``inclusive``) or ``score < t``, from ``h`` or rehashed."""
    compare = torch.le if inclusive else torch.lt
    if h is not None:
        return compare(h, t)
    n, key, device = unit
    mask = torch.empty(n, dtype=torch.bool, device=device)
    for start, part in _hash_chunks(n, key, device):
        compare(part, t, out=mask[start : start + part.numel()])
    return mask


def _direct(
    unit: tuple[int, tuple[int, int], torch.device | str], ms: list[int]
) -> dict[int, torch.Tensor]:
    """:func:`lowest` for one large tensor, in one pass over its scores.

    While a chunk is in cache, the mask is written at the expected ``m``-th smallest
    score ``c`` (``score < c``). That misses the exact count by ``delta``, about
    ``sqrt(n)/2`` units. The hash is a bijection, so the elements whose scores lie just
    above ``c`` (or just below) are found by inverting the hash over those score values,
    in value order, and ``|delta|`` of them are switched on (or off). Nothing is sorted
    and the scores are never stored.
    """
    n, key, device = unit
    guess = {m: max(_INT32_MIN, min(_INT32_MAX, _INT32_MIN + round(m / n * 2.0**32))) for m in ms}
    masks = {m: torch.empty(n, dtype=torch.bool, device=device) for m in ms}
    counts: dict[int, list[torch.Tensor]] = {m: [] for m in ms}
    for start, part in _hash_chunks(n, key, device):
        for m, c in guess.items():
            below = masks[m][start : start + part.numel()]
            torch.lt(part, c, out=below)
            counts[m].append(below.count_nonzero())  # while in cache, on one thread
    for m, c in guess.items():
        delta = m - int(torch.stack(counts[m]).sum())
        if delta:
            masks[m][_nearest(n, key, device, c, delta)] = delta > 0
    return masks


def _nearest(
    n: int, key: tuple[int, int], device: torch.device | str, c: int, delta: int
) -> torch.Tensor:
    """Indices (int64) of the ``delta`` elements with the smallest scores ``>= c``
    (``delta > 0``) or the ``-delta`` with the largest scores ``< c`` (``delta < 0``)."""
    want, found = abs(delta), []
    # CPU: cache-sized windows, each op on one thread, as for the hash itself.
    step = _chunk_size(min(_WINDOW, max(1 << 12, math.ceil(want * 1.25 * 2.0**32 / n))), device)
    a = b = c  # the score values [a, b) inverted so far
    while want:
        if delta > 0:
            a, b = b, min(b + step, _INT32_MAX + 1)
        else:
            a, b = max(a - step, _INT32_MIN), a
        if a >= b:  # cannot happen: the tensor holds m elements below and n - m above
            raise RuntimeError("mask selection ran out of scores")
        v = torch.arange(b - a, dtype=torch.int32, device=device).add_(_s32(a))
        _unhash_(v, key)  # now i + INT32_MIN, for every element index i < n
        idx = torch.masked_select(v, v < _INT32_MIN + n).to(torch.int64).add_(2**31)
        # idx is in score order: keep the ones nearest to c
        idx = idx[:want] if delta > 0 else idx[max(0, idx.numel() - want) :]
        found.append(idx)
        want -= idx.numel()
    return torch.cat(found)


def _unhash_(v: torch.Tensor, key: tuple[int, int]) -> None:
    """In place: scores -> ``i + INT32_MIN`` (wrapped), ``i`` the index whose score it is.

    Inverts :func:`hash_scores` step by step: multiplications by the inverses mod 2**32;
    ``x ^= x >>> 16`` is its own inverse; ``x ^= x >>> 13`` is undone by
    ``x ^= (x >>> 13) ^ (x >>> 26)``. Values that are no index below ``n`` land at or
    above ``INT32_MIN + n``.
    """
    k, b = key
    k_inv = pow(k & _M32, -1, 1 << 32)
    tmp = torch.empty_like(v)
    v.mul_(_s32(_C2_INV))
    torch.bitwise_right_shift(v, 13, out=tmp).bitwise_and_((1 << 19) - 1)  # x >>> 13
    v.bitwise_xor_(tmp)
    v.bitwise_xor_(tmp.bitwise_right_shift_(13))  # (x >>> 13) >>> 13 = x >>> 26
    v.mul_(_s32(_C1_INV))
    torch.bitwise_right_shift(v, 16, out=tmp).bitwise_and_((1 << 16) - 1)
    v.bitwise_xor_(tmp)
    v.mul_(_s32(k_inv)).add_(_s32(2**31 - (b & _M32) * k_inv))  # (x - B) / K + 2**31
