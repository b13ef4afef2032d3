"""Mask generation: exact densities, anti-random structure, determinism, devices, errors."""

from __future__ import annotations

import builtins
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import pat.masks.hashing as hashing
from pat.errors import PatError
from pat.masks import generate_masks
from pat.masks.hashing import hash_scores, lowest, ranks_below, stream_key

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


def _mix32_reference(x: int) -> int:
    """MurmurHash3 fmix32 without its last xor-shift, in unsigned Python arithmetic."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    return (x * 0xC2B2AE35) & 0xFFFFFFFF


def test_hash_matches_unsigned_reference_and_is_a_bijection():
    k, b = stream_key(3, 1, "layer.weight")
    h = hash_scores(5000, (k, b))
    for i in (0, 1, 2, 777, 4999):
        expected = _mix32_reference(i * (k & 0xFFFFFFFF) + (b & 0xFFFFFFFF))
        assert int(h[i]) & 0xFFFFFFFF == expected
    assert torch.unique(h).numel() == h.numel()


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


@pytest.mark.parametrize(
    "n,m", [(10, 1), (10, 9), (70_000, 1), (70_000, 35_000), (200_000, 199_999)]
)
def test_ranks_below_is_exact(n, m):
    s = hash_scores(n, stream_key(5, 0, "t"))
    (mask,) = ranks_below([s], m)
    assert int(mask.sum()) == m
    assert torch.equal(mask, reference_below([s], m)[0])


def test_ranks_below_over_several_tensors_with_colliding_scores():
    # Large enough for the band search; the shared values collide across tensors.
    a = hash_scores(50_000, stream_key(1, 0, "a"))
    b = torch.cat([a[:20_000], hash_scores(40_000, stream_key(1, 0, "b"))])
    for m in (1, 45_000, 89_999):
        got = ranks_below([a, b], m)
        for g, r in zip(got, reference_below([a, b], m), strict=True):
            assert torch.equal(g, r)


@pytest.mark.parametrize("chunk", [1 << 15, 1000, 1 << 30])  # 1 << 30: one chunk, as on CUDA
def test_lowest_without_stored_scores_equals_ranks_below(monkeypatch, chunk):
    monkeypatch.setattr(hashing, "_CPU_CHUNK", chunk)
    units = [(50_000, stream_key(2, 0, "a"), "cpu"), (30_001, stream_key(2, 0, "b"), "cpu")]
    scores = [hash_scores(*u) for u in units]
    got = lowest(units, [0, 1, 40_000, 80_000, 80_001])
    for m in (0, 1, 40_000, 80_000, 80_001):
        for g, r in zip(got[m], ranks_below(scores, m), strict=True):
            assert torch.equal(g, r)


def test_lowest_stays_exact_when_the_band_misses(monkeypatch):
    monkeypatch.setattr(hashing, "_band", lambda n, m: (0, 0))  # a band that holds nothing
    unit = (70_000, stream_key(0, 0, "x"), "cpu")
    (got,) = lowest([unit], [12_345])[12_345]
    assert torch.equal(got, reference_below([hash_scores(*unit)], 12_345)[0])


def test_ranks_below_falls_back_for_non_uniform_scores():
    s = torch.arange(100_000, dtype=torch.int32)  # all in a tiny value range: the band misses
    (mask,) = ranks_below([s], 54_321)
    assert mask[:54_321].all() and not mask[54_321:].any()


def test_ranks_below_breaks_ties_across_tensors_exactly():
    a = torch.tensor([5, 1, 5], dtype=torch.int32)
    b = torch.tensor([5, 0, 9], dtype=torch.int32)
    masks = ranks_below([a, b], 3)  # 0, 1 and the first 5 (a[0])
    assert masks[0].tolist() == [True, True, False]
    assert masks[1].tolist() == [False, True, False]


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


@pytest.mark.parametrize("method", ["random", "anti-random", "cyclic"])
def test_one_pass_large_tensor_path_gives_the_same_masks(monkeypatch, method):
    """The one-pass path for large tensors gives the masks of an exact full sort."""
    import pat.masks.hashing as hashing

    torch.manual_seed(0)
    params = {"a.weight": torch.randn(64, 48, 3, 3), "b.weight": torch.randn(300, 7)}
    kwargs = {"children": 4, "method": method, "sparsity": 0.5, "seed": 3}
    exact = generate_masks(params, **kwargs)  # small tensors: full sort
    calls = []
    real = hashing._direct
    monkeypatch.setattr(hashing, "_SMALL", 100)
    monkeypatch.setattr(hashing, "_DIRECT", 1000)
    monkeypatch.setattr(hashing, "_direct", lambda *a, **k: calls.append(1) or real(*a, **k))
    direct = generate_masks(params, **kwargs)
    assert calls  # the one-pass path really ran
    for a, b in zip(exact, direct, strict=True):
        for name in params:
            assert torch.equal(a[name], b[name]), name
            assert int(b[name].sum()) in (params[name].numel() // 2, (params[name].numel() + 1) // 2)
