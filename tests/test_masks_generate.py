"""Mask generation: exact densities, anti-random structure, determinism, devices, errors."""

from __future__ import annotations

import builtins
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import pat.masks.hashing as hashing
import pat.masks.selection as selection
from pat.errors import PatError
from pat.masks import generate_masks
from pat.masks.hashing import hash_scores, stream_key
from pat.masks.selection import lowest, ranks_below

# Odd sizes, a size above the band-search threshold, and a 1-element tensor.
SHAPES = {
    "a.weight": (7, 5),
    "b.weight": (33,),
    "c.weight": (4, 3, 3, 3),
    "d.weight": (70001,),
    "e.weight": (1,),
}


def params(device: str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device=device) for k, s in SHAPES.items()}


def kept(sparsity: float, n: int) -> int:
    """round((1 - s) n), half up, with s read as the decimal the user wrote."""
    return math.floor((1 - Fraction(str(sparsity))) * n + Fraction(1, 2))


def coverage(masks: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    return torch.stack([m[name] for m in masks]).sum(0)


# --- the hash ---------------------------------------------------------------------------


def _mix_reference(x: int, k: int) -> int:
    """The k-bit hash in unsigned Python arithmetic (the module doc's formula)."""
    m = (1 << k) - 1
    s1, s2 = (k + 1) // 2, (13 * k + 16) // 32
    x &= m
    x ^= x >> s1
    x = (x * 0x85EBCA6B) & m
    x ^= x >> s2
    return (x * 0xC2B2AE35) & m


@pytest.mark.parametrize("n,extra,k", [(5000, 4, 17), (5000, 32, 32), (1, 4, 4), (4096, 0, 12)])
def test_hash_matches_unsigned_reference_and_is_a_bijection(monkeypatch, n, extra, k):
    monkeypatch.setattr(hashing, "_EXTRA_BITS", extra)
    key = stream_key(3, 1, "layer.weight")
    h = hash_scores(n, key)
    for i in sorted({0, 1 % n, 2 % n, 777 % n, n - 1}):
        word = _mix_reference(i * (key[0] & 0xFFFFFFFF) + (key[1] & 0xFFFFFFFF), k)
        assert int(h[i]) & 0xFFFFFFFF == word << (32 - k)  # left-aligned in the int32
    assert torch.unique(h).numel() == n


@pytest.mark.parametrize("n,extra", [(5000, 4), (5000, 32), (1, 4), (4096, 0), (70_001, 4)])
def test_unhash_inverts_the_hash_and_rejects_other_values(monkeypatch, n, extra):
    monkeypatch.setattr(hashing, "_EXTRA_BITS", extra)
    key = stream_key(8, 2, "w")
    h = hash_scores(n, key)
    assert torch.equal(hashing.unhash_(h.clone(), hashing.word_hash(n, key)), torch.arange(n, dtype=torch.int32))
    hasher = hashing.word_hash(n, key)
    values = torch.arange(-(2**31), 2**31, hasher.step * max(1, 2**30 // (hasher.step * 4096)),
                          dtype=torch.int64).to(torch.int32)  # fmt: skip
    idx = hashing.unhash_(values.clone(), hasher)
    hit = idx >= 0
    assert torch.isin(values[hit], h).all() and not torch.isin(values[~hit], h).any()
    assert torch.equal(h[idx[hit].long()], values[hit])


def test_hash_does_not_depend_on_chunking(monkeypatch):
    key = stream_key(0, 0, "x")
    whole = hash_scores(100_003, key)
    for chunk in (1000, 1 << 30):  # 1 << 30: one chunk, the path CUDA takes
        monkeypatch.setattr(hashing, "_CPU_CHUNK", chunk)
        assert torch.equal(hash_scores(100_003, key), whole)


def test_stream_key_does_not_use_pythons_salted_hash(monkeypatch):
    # hash() of a str changes from process to process; the key must not depend on it.
    before = stream_key(7, 2, "conv1.weight")
    monkeypatch.setattr(builtins, "hash", lambda _obj: 0)
    assert stream_key(7, 2, "conv1.weight") == before


def test_stream_key_separates_seed_draw_and_name():
    assert stream_key(0, 0, "conv1.weight") == stream_key(0, 0, "conv1.weight")
    assert stream_key(0, 0, "conv1.weight") != stream_key(0, 0, "conv2.weight")
    assert stream_key(0, 0, "w") != stream_key(1, 0, "w") != stream_key(0, 1, "w")
    assert stream_key(0, 0, "w")[0] % 2 == 1  # odd multiplier: a bijection of the index


def reference_below(parts: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    """The m smallest by a full stable sort (ties: earlier tensor, then lower index)."""
    order = torch.sort(torch.cat(parts), stable=True).indices[:m]
    keep = torch.zeros(sum(p.numel() for p in parts), dtype=torch.bool)
    keep[order] = True
    return list(keep.split([p.numel() for p in parts]))


def assert_lowest_is_exact(units, ms):
    scores = [hash_scores(*u) for u in units]
    got = lowest(units, ms)
    for m in ms:
        for g, r in zip(got[m], reference_below(scores, m), strict=True):
            assert torch.equal(g, r), m


@pytest.mark.parametrize("n", [1, 2, 10, 1000, 70_001, 230_400])
def test_lowest_equals_a_full_sort_for_one_tensor(n):
    assert_lowest_is_exact([(n, stream_key(5, 0, "t"), "cpu")],
                           sorted({0, 1, n // 3, n // 2, (n + 1) // 2, n - 1, n}))  # fmt: skip


@pytest.mark.parametrize("chunk", [1 << 15, 1000, 1 << 30])  # 1 << 30: one chunk, as on CUDA
def test_lowest_over_tensors_of_different_widths_equals_a_full_sort(monkeypatch, chunk):
    # Different sizes hash to different word widths; their scores collide (ties go to the
    # earlier tensor) and are compared on one scale (global scope).
    monkeypatch.setattr(hashing, "_CPU_CHUNK", chunk)
    units = [(50_000, stream_key(2, 0, "a"), "cpu"), (7, stream_key(2, 0, "b"), "cpu"),
             (30_001, stream_key(2, 0, "c"), "cpu"), (300, stream_key(2, 0, "d"), "cpu")]  # fmt: skip
    assert_lowest_is_exact(units, [0, 1, 3, 40_000, 80_307, 80_308, 80_309])


@pytest.mark.parametrize("extra,window", [(0, 4), (4, 4), (8, 1 << 12)])
def test_lowest_is_exact_for_dense_and_sparse_words_and_small_windows(monkeypatch, extra, window):
    # extra=0: the words are nearly full; 8: far sparser than the default.
    # Small windows make the correction walk through many of them.
    monkeypatch.setattr(hashing, "_EXTRA_BITS", extra)
    monkeypatch.setattr(selection, "_WINDOW", window)
    units = [(4097, stream_key(1, 3, "a"), "cpu"), (999, stream_key(1, 3, "b"), "cpu")]
    assert_lowest_is_exact(units, [1, 2000, 2548, 5095])


def test_ranks_below_breaks_ties_across_tensors_exactly():
    a = torch.tensor([5, 1, 5], dtype=torch.int32)
    b = torch.tensor([5, 0, 9], dtype=torch.int32)
    masks = ranks_below([a, b], 3)  # 0, 1 and the first 5 (a[0])
    assert masks[0].tolist() == [True, True, False]
    assert masks[1].tolist() == [False, True, False]


@pytest.mark.parametrize("n", [64, 1000, 230_400])
def test_masks_look_random(n):
    """Statistical sanity of the k-bit hash: a kept half is spread evenly over the tensor,
    neighbours are uncorrelated, and draws that differ in seed, draw or name are
    independent (each test at about 5 standard deviations)."""
    def half(seed, draw, name):
        (mask,) = lowest([(n, stream_key(seed, draw, name), "cpu")], [n // 2])[n // 2]
        return mask.float()

    a = half(0, 0, "w")
    sd = math.sqrt(n) / 2  # of a count over n fair coins
    # evenly spread: each eighth of the tensor keeps about an eighth of the half
    eighths = torch.stack([p.sum() for p in a.chunk(8)]) - n / 16
    assert eighths.abs().max() < 5 * sd / math.sqrt(8) + 1
    # neighbours: agreement of a[i] and a[i+1] near one half
    assert abs(float((a[1:] == a[:-1]).sum()) - (n - 1) / 2) < 5 * sd + 1
    for other in (half(1, 0, "w"), half(0, 1, "w"), half(0, 0, "v")):
        assert abs(float((a == other).sum()) - n / 2) < 5 * sd + 1


def test_one_thread_per_op_nests_and_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with hashing.one_thread_per_op() as outer:
            assert outer == 2 and torch.get_num_threads() == 1
            with hashing.one_thread_per_op() as inner:
                assert inner == 2 and torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1  # the outer one still runs
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), hashing.one_thread_per_op():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3])
def test_masks_do_not_depend_on_how_many_threads_make_them(threads):
    before = torch.get_num_threads()
    reference = generate_masks(params(), children=5, method="anti-random", seed=2)
    try:
        torch.set_num_threads(threads)  # 3: the jobs run on a pool of three threads
        again = generate_masks(params(), children=5, method="anti-random", seed=2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(reference, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in SHAPES)


# --- densities --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 0.99])
def test_random_layer_scope_keeps_exact_count_per_tensor(sparsity):
    masks = generate_masks(params(), children=3, method="random", sparsity=sparsity)
    for m in masks:
        for name, shape in SHAPES.items():
            n = math.prod(shape)
            assert m[name].shape == shape and m[name].dtype == torch.bool
            assert int(m[name].sum()) == kept(sparsity, n)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_random_global_scope_keeps_exact_total(sparsity):
    total = sum(math.prod(s) for s in SHAPES.values())
    for m in generate_masks(
        params(), children=2, method="random", sparsity=sparsity, scope="global"
    ):
        assert sum(int(v.sum()) for v in m.values()) == kept(sparsity, total)


def test_random_children_are_independent_draws():
    m0, m1 = generate_masks(params(), children=2, method="random", sparsity=0.5)
    agree = (m0["d.weight"] == m1["d.weight"]).float().mean().item()
    assert 0.45 < agree < 0.55  # independent halves agree on about half the units


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_anti_random_pairs_are_disjoint_and_cover(scope):
    masks = generate_masks(params(), children=6, method="anti-random", scope=scope)
    for p in range(3):
        for name in SHAPES:
            a, b = masks[2 * p][name], masks[2 * p + 1][name]
            assert not (a & b).any() and (a | b).all()
    assert not torch.equal(masks[0]["d.weight"], masks[2]["d.weight"])  # a fresh draw per pair


def test_anti_random_odd_children_last_is_random_half():
    masks = generate_masks(params(), children=3, method="anti-random")
    assert (masks[0]["d.weight"] ^ masks[1]["d.weight"]).all()
    assert int(masks[2]["d.weight"].sum()) == kept(0.5, 70001)
    random = generate_masks(params(), children=3, method="random", sparsity=0.5)
    assert torch.equal(masks[2]["d.weight"], random[2]["d.weight"])


@pytest.mark.parametrize("n_children", [2, 3, 5])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_partition_children_are_disjoint_and_cover_every_unit(n_children, scope):
    masks = generate_masks(params(), children=n_children, method="partition", scope=scope)
    for name, shape in SHAPES.items():
        assert (coverage(masks, name) == 1).all()
        if scope == "layer":
            n = math.prod(shape)
            for m in masks:
                assert int(m[name].sum()) in (n // n_children, -(-n // n_children))


@pytest.mark.parametrize("n_children,density", [(3, 0.5), (4, 0.3), (6, 0.7), (5, 0.4)])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_cyclic_coverage_is_balanced(n_children, density, scope):
    masks = generate_masks(
        params(), children=n_children, method="cyclic", density=density, scope=scope
    )
    d = Fraction(str(density))
    lo, hi = math.floor(d * n_children), math.ceil(d * n_children)
    for name, shape in SHAPES.items():
        cov = coverage(masks, name)
        assert ((cov == lo) | (cov == hi)).all()
        if scope == "layer":
            n = math.prod(shape)
            for m in masks:
                assert math.floor(d * n) <= int(m[name].sum()) <= math.ceil(d * n)


def test_cyclic_reduces_to_complement_and_partition():
    p = params()
    anti = generate_masks(p, children=2, method="anti-random", seed=4)
    cyc2 = generate_masks(p, children=2, method="cyclic", sparsity=0.5, seed=4)
    part2 = generate_masks(p, children=2, method="partition", seed=4)
    part5 = generate_masks(p, children=5, method="partition", seed=4)
    cyc5 = generate_masks(p, children=5, method="cyclic", density=0.2, seed=4)
    for name in SHAPES:
        for i in range(2):
            assert torch.equal(anti[i][name], cyc2[i][name])
            assert torch.equal(anti[i][name], part2[i][name])
        for i in range(5):
            assert torch.equal(part5[i][name], cyc5[i][name])


# --- determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["random", "anti-random", "cyclic"])
def test_same_seed_same_masks_different_seed_different_masks(method):
    a = generate_masks(params(), children=4, method=method, seed=11)
    b = generate_masks(params(), children=4, method=method, seed=11)
    c = generate_masks(params(), children=4, method=method, seed=12)
    for i in range(4):
        assert all(torch.equal(a[i][k], b[i][k]) for k in SHAPES)
    assert not torch.equal(a[0]["d.weight"], c[0]["d.weight"])


def test_masks_depend_on_the_name_not_on_the_other_tensors():
    full = generate_masks(params(), children=2, method="anti-random", seed=1)
    alone = generate_masks(
        {"d.weight": torch.empty(70001)}, children=2, method="anti-random", seed=1
    )
    assert torch.equal(full[0]["d.weight"], alone[0]["d.weight"])


def test_model_input_uses_prunable_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    masks = generate_masks(model, children=2, method="anti-random")
    assert set(masks[0]) == {"0.weight"}  # the classifier (last Linear) is left dense


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "method,scope", [("anti-random", "layer"), ("cyclic", "global"), ("random", "global")]
)
def test_cpu_and_cuda_masks_are_identical(method, scope):
    cpu = generate_masks(params("cpu"), children=3, method=method, scope=scope, seed=9)
    gpu = generate_masks(params("cuda"), children=3, method=method, scope=scope, seed=9)
    for c, g in zip(cpu, gpu, strict=True):
        for name in SHAPES:
            assert g[name].device.type == "cuda"
            assert torch.equal(c[name], g[name].cpu())


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"method": "random", "sparsity": 1.5}, "sparsity must be in [0, 1). Got 1.5."),
        ({"method": "random", "sparsity": -0.1}, "Got -0.1"),
        ({"method": "random", "sparsity": 1.0}, "Got 1.0"),
        ({"method": "random", "density": 0.0}, "density must be in (0, 1]. Got 0.0."),
        ({"method": "random", "sparsity": 0.5, "density": 0.5}, "not both"),
        ({"method": "random", "children": 0}, "children must be an integer >= 1. Got 0."),
        ({"method": "partition", "children": 1}, "needs children >= 2. Got 1."),
        ({"method": "partition", "children": 4, "sparsity": 0.5}, "Got sparsity=0.5"),
        ({"method": "anti-random", "sparsity": 0.3}, "method='cyclic'"),
        ({"method": "bogus"}, "Got 'bogus'"),
        ({"method": "random", "level": "row"}, "level must be one of"),
        ({"method": "random", "scope": "net"}, "scope must be one of"),
        ({"method": "random", "seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_input_raises_one_line_pat_error(kwargs, fragment):
    kwargs = {"children": 2, **kwargs}
    with pytest.raises(PatError) as e:
        generate_masks(params(), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_partition_accepts_its_own_sparsity():
    masks = generate_masks(params(), children=4, method="partition", sparsity=0.75)
    assert (coverage(masks, "d.weight") == 1).all()


@pytest.mark.parametrize("method", ["random", "anti-random", "cyclic", "partition"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_equal_the_ranks_of_a_full_sort(method, scope):
    """Every method's masks are windows of the exact ranks of the hashed scores."""
    p = params()
    masks = generate_masks(p, children=4, method=method, scope=scope, seed=3)
    names = list(p) if scope == "global" else [[n] for n in p]
    for group in names if scope == "layer" else [names]:
        n = sum(p[name].numel() for name in group)
        for c, child in enumerate(masks):
            draw = {"random": 2 * c + 1, "anti-random": 2 * (c // 2)}.get(method, 0)
            scores = [hash_scores(p[name].numel(), stream_key(3, draw, name)) for name in group]
            # rank of every unit within its draw, in (score, tensor, index) order
            order = torch.sort(torch.cat(scores), stable=True).indices
            rank = torch.empty(n, dtype=torch.long)
            rank[order] = torch.arange(n)
            keep = torch.cat([child[name].reshape(-1) for name in group])
            if method == "random":
                assert torch.equal(keep, rank < kept(0.5, n))
            else:
                big_n = 2 if method == "anti-random" else 4
                d = Fraction(1, 4) if method == "partition" else Fraction(1, 2)
                i = c % 2 if method == "anti-random" else c
                lo = -(-Fraction(i, big_n) * n // 1)
                hi = -(-(Fraction(i, big_n) + d) * n // 1)
                window = (rank >= lo) & (rank < hi) if hi <= n else (rank >= lo) | (rank < hi - n)
                assert torch.equal(keep, window), (method, c, group)
