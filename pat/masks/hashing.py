"""Counter-based random scores that are the same on every device, and their inverse.

A mask must be a pure function of (seed, draw, tensor name, element index) so that a
child made on a GPU can be checked against one made on a CPU. ``torch.Generator``
streams differ between CPU and CUDA, so a tensor's scores are a hash of the element
index computed with int32 tensor ops on the tensor's own device. For a tensor of ``n``
elements the hash works on ``k``-bit words, ``k = min(32, bit_length(n - 1) + 4)``::

    score[i] = mix_k(i * K + B)      (all arithmetic mod 2**k)

``K`` (odd) and ``B`` come from (seed, draw, name). ``mix_k`` is MurmurHash3's finaliser
``fmix32`` scaled to ``k`` bits, without its last xor-shift (which only stirs the low
bits that ranks barely see): ``x ^= x >> s1; x *= C1; x ^= x >> s2; x *= C2`` with
``s1 = ceil(k/2)``, ``s2 = round(13k/32)``; at ``k = 32`` it is exactly ``fmix32``'s
first four steps. Every step is a bijection on k-bit words, so the scores of one tensor
are all distinct: ranks have no ties.

Why ``k`` bits and not 32: an exact selection of the ``m`` smallest scores is done in
one pass (:func:`pat.masks.selection.lowest`): the mask is written at the expected ``m``-th smallest score,
which misses the count by about ``sqrt(n)/2`` elements, and the missing (or extra)
elements are found by *inverting* the hash over the score values just past the
threshold. Within ``k`` bits, ``n`` elements use at least 1/16 of the possible values, so
that inversion visits at most 16 values per element it finds; with 32-bit words it would
visit ``2**32 / n`` of them (18,000 for a 230k-element tensor).

The k-bit word is kept *left-aligned* in an int32 (its low ``32 - k`` bits zero): then
multiplications and additions wrap mod 2**k by themselves, scores of tensors of every
size compare directly (``global`` scope), and each xor-shift needs one ``and`` (torch has
no unsigned 32-bit arithmetic on every device: a logical right shift is an arithmetic
shift with the sign bits masked off, and the same mask drops the bits shifted out of the
word). Scores are compared as signed int32, a fixed relabelling of the unsigned order.

References:
    Appleby, "MurmurHash3" (2011), the 32-bit finaliser ``fmix32``.
    Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011
    (counter-based generators).
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from pat.errors import PatError

__all__ = [
    "stream_key",
    "hash_scores",
    "hash_chunks",
    "unhash_",
    "word_hash",
    "WordHash",
    "one_thread_per_op",
]

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3 fmix32 multipliers
_EXTRA_BITS = 4  # k - bit_length(n - 1): n elements fill at least 1/16 of the k-bit values
# int32 elements per CPU chunk (512 KiB): a chunk's passes run from cache, and each op is
# long enough that the Python call around it is cheap. The ops run on one thread each
# (one_thread_per_op); the cores work on different tensors instead (generate.decide).
# Measured per element for 0.2-3.7M-element tensors, 1 thread: 4.2-7.3 ns at 2^17 against
# 5.8-9.3 at 2^15; with torch's 2 threads per op on 2 shared cores, 6-35 ns, erratic.
_CPU_CHUNK = 1 << 17


def _s32(x: int) -> int:
    """The signed int32 with the same bits as ``x mod 2**32`` (what torch accepts)."""
    x &= _M32
    return x - (1 << 32) if x >> 31 else x


def _fmix32(x: int) -> int:
    """MurmurHash3's finaliser (Python ints), for the per-tensor constants."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 13
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int, draw: int, name: str) -> tuple[int, int]:
    """The per-tensor constants ``(K, B)`` (signed int32, ``K`` odd) of one random draw.

    The name is hashed with CRC-32, not Python's ``hash()``, which is salted per process.
    """
    h = _fmix32(seed & _M32)
    h = _fmix32(h ^ ((seed >> 32) & _M32))
    h = _fmix32(h ^ (draw & _M32))
    h = _fmix32(h ^ zlib.crc32(name.encode("utf-8")))
    k = _fmix32(h ^ 0x9E3779B9) | 1  # odd, so i -> i*K + B is a bijection
    b = _fmix32(h ^ 0x7F4A7C15)
    return _s32(k), _s32(b)


def _word_mask(k: int, shift: int) -> int:
    """The and-mask that makes ``x >> shift`` a logical shift of a left-aligned k-bit word.

    It clears the sign copies shifted in above and the bits shifted out below the word.
    """
    return _s32((_M32 >> shift) & ~((1 << (32 - k)) - 1))


class WordHash(NamedTuple):
    """The k-bit hash of one tensor, as left-aligned int32 constants."""

    n: int
    k: int  # word width in bits
    key: tuple[int, int]
    steps: tuple[tuple[int, int, int], ...]  # (shift, and-mask, multiplier) per round

    @property
    def step(self) -> int:
        """The distance between adjacent score values (the word's unit)."""
        return 1 << (32 - self.k)


def word_hash(n: int, key: tuple[int, int]) -> WordHash:
    """The hash of a tensor of ``n`` elements under ``key`` (:func:`stream_key`).

    Raises:
        PatError: ``n`` is 2**31 or more (element indices must fit an int32).
    """
    if not 0 < n < 2**31:
        raise PatError(f"tensors of 2**31 elements or more cannot be masked. Got {n}.")
    k = min(32, (n - 1).bit_length() + _EXTRA_BITS)
    shifts = ((k + 1) // 2, (13 * k + 16) // 32)  # (16, 13) at k = 32, as in fmix32
    steps = tuple((s, _word_mask(k, s), _s32(c)) for s, c in zip(shifts, (_C1, _C2), strict=True))
    return WordHash(n, k, key, steps)


_threads_lock = threading.Lock()
_threads_saved: list[int] = []  # torch's thread count, while one_thread_per_op is active


@contextlib.contextmanager
def one_thread_per_op() -> Iterator[int]:
    """Run torch's CPU ops on one thread each for the duration.

    Yields the thread count that was set before, for callers that spread independent work
    over threads.

    Elementwise ops on a cache-sized chunk finish in tens of microseconds; splitting each
    over several threads costs more than it saves (badly so on a busy machine). Nested
    and concurrent uses restore the count once, when the last one exits.
    """
    with _threads_lock:
        if not _threads_saved:
            _threads_saved.append(torch.get_num_threads())
            torch.set_num_threads(1)
        _threads_saved.append(0)
        before = _threads_saved[0]
    try:
        yield before
    finally:
        with _threads_lock:
            _threads_saved.pop()
            if len(_threads_saved) == 1:
                torch.set_num_threads(_threads_saved.pop())


def _chunk_size(n: int, device: torch.device | str) -> int:
    # CPU: cache-sized chunks, so the hash and the comparisons run from cache.
    # Accelerators are memory-bound here: one chunk.
    return max(1, min(n, _CPU_CHUNK)) if torch.device(device).type == "cpu" else max(1, n)


def hash_chunks(
    n: int, key: tuple[int, int], device: torch.device | str, out: torch.Tensor | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, scores[start:start + len])`` chunk by chunk.

    Without ``out`` the chunks share one scratch buffer: use each before the next.
    """
    hasher = word_hash(n, key)
    k_mul, b = key
    shift = 32 - hasher.k
    chunk = _chunk_size(n, device)
    # (i*K) << shift for i < chunk: the Weyl step, left-aligned
    base = torch.arange(chunk, dtype=torch.int32, device=device).mul_(_s32(k_mul << shift))
    tmp = torch.empty(chunk, dtype=torch.int32, device=device)
    scratch = torch.empty(chunk, dtype=torch.int32, device=device) if out is None else None
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        part = scratch[:m] if out is None else out[start : start + m]
        torch.add(base[:m], _s32((start * k_mul + b) << shift), out=part)
        t = tmp[:m]
        for s, mask, mult in hasher.steps:
            torch.bitwise_right_shift(part, s, out=t)
            t.bitwise_and_(mask)
            part.bitwise_xor_(t)
            part.mul_(mult)
        yield start, part


def hash_scores(n: int, key: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores ``(n,)`` int32, pairwise distinct, uniform over the int32 range.

    Args:
        n: number of elements (< 2**31).
        key: ``(K, B)`` from :func:`stream_key`.
        device: where to compute; the result is bit-identical on every device.
    """
    h = torch.empty(n, dtype=torch.int32, device=device)
    with one_thread_per_op():
        for _ in hash_chunks(n, key, device, out=h):
            pass
    return h


def unhash_(v: torch.Tensor, hasher: WordHash) -> torch.Tensor:
    """Scores -> element indices, in place; values no element of the tensor has become -1.

    Inverts the hash step by step: multiplications by the inverses (mod 2**32, hence mod
    2**k); ``x ^= x >>> s`` is undone by ``x ^= (x >>> s) ^ (x >>> 2s) ^ ...``.
    """
    k_mul, b = hasher.key
    shift = 32 - hasher.k
    tmp = torch.empty_like(v)
    acc = torch.empty_like(v)
    for s, _, mult in reversed(hasher.steps):
        v.mul_(_s32(pow(mult & _M32, -1, 1 << 32)))
        acc.copy_(v)
        for j in range(s, hasher.k, s):
            torch.bitwise_right_shift(v, j, out=tmp)
            acc.bitwise_xor_(tmp.bitwise_and_(_word_mask(hasher.k, j)))
        v.copy_(acc)
    v.sub_(_s32(b << shift)).mul_(_s32(pow(k_mul & _M32, -1, 1 << 32)))  # i << shift
    if shift:
        v.bitwise_right_shift_(shift).bitwise_and_((1 << hasher.k) - 1)
    return v.masked_fill_((v < 0) | (v >= hasher.n), -1)
