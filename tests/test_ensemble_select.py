from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pat.ensemble import (
    AllSelector,
    BruteForceSelector,
    FocalSelector,
    GreedySelector,
    RandomSelector,
    TopKSelector,
    accuracy,
    create_selector,
    list_selectors,
)
from pat.errors import PatError


def _noisy_pool(m: int = 6, n: int = 200, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(m, n, c, generator=g) * 2
    logits[:, torch.arange(n), labels] += 1.0
    return logits.softmax(-1), labels


def _member(labels: torch.Tensor, right: torch.Tensor, conf_right: float, conf_wrong: float) -> torch.Tensor:
    """Two-class member: prob ``conf_right`` on the true class where ``right``, else ``1 - conf_wrong``."""
    p_true = torch.where(right, torch.tensor(conf_right), torch.tensor(1 - conf_wrong))
    onehot = F.one_hot(labels, 2).float()
    return onehot * p_true[:, None] + (1 - onehot) * (1 - p_true[:, None])


FITTED = [
    AllSelector(),
    TopKSelector(3),
    TopKSelector(2, metric="nll"),
    RandomSelector(3, seed=1),
    BruteForceSelector(3),
    GreedySelector(5),
    GreedySelector(3, metric="accuracy", replacement=False),
    FocalSelector(3),
    FocalSelector(3, measure="kappa", max_teams=1),
]


@pytest.mark.parametrize("selector", FITTED, ids=repr)
def test_estimator_contract(selector) -> None:
    probs, labels = _noisy_pool()
    assert selector.fit(probs, labels) is selector
    sel, w = selector.selected_, selector.weights_
    assert sel == sorted(set(sel)) and all(0 <= i < 6 for i in sel)
    assert w.shape == (len(sel),) and (w > 0).all()
    assert float(w.sum()) == pytest.approx(1.0)
    combined = selector.predict_proba(probs)
    torch.testing.assert_close(combined, torch.einsum("m,mnc->nc", w, probs[sel]))


def test_sizes_of_simple_selectors() -> None:
    probs, labels = _noisy_pool()
    assert AllSelector().fit(probs, labels).selected_ == list(range(6))
    top = TopKSelector(2).fit(probs, labels)
    accs = [accuracy(p, labels) for p in probs]
    assert len(top.selected_) == 2
    assert min(accs[i] for i in top.selected_) >= max(accs[i] for i in range(6) if i not in top.selected_)


def test_random_selector_is_reproducible() -> None:
    probs, labels = _noisy_pool(m=10)
    a = RandomSelector(4, seed=3).fit(probs, labels).selected_
    assert RandomSelector(4, seed=3).fit(probs, labels).selected_ == a
    others = {tuple(RandomSelector(4, seed=s).fit(probs, labels).selected_) for s in range(6)}
    assert len(others) > 1


@pytest.mark.parametrize("metric", ["nll", "accuracy"])
@pytest.mark.parametrize("replacement", [True, False])
def test_greedy_picks_the_perfect_model(metric, replacement) -> None:
    probs, labels = _noisy_pool()
    probs[4] = F.one_hot(labels, 5).float() * 0.9 + 0.02  # right on every sample, confident
    sel = GreedySelector(4, metric=metric, replacement=replacement).fit(probs, labels)
    assert sel.selected_ == [4]
    assert sel.weights_.tolist() == [1.0]
    assert len(sel.history_) == 4 and sel.history_[0]["member"] == 4


def test_greedy_with_replacement_weights_are_pick_counts() -> None:
    probs, labels = _noisy_pool(m=8)
    sel = GreedySelector(7).fit(probs, labels)
    picks = [h["member"] for h in sel.history_]
    best = min(range(7), key=lambda k: (sel.history_[k]["nll"], k)) + 1
    counts = torch.bincount(torch.tensor(picks[:best]), minlength=8)
    assert sel.selected_ == counts.nonzero().flatten().tolist()
    torch.testing.assert_close(sel.weights_, counts[sel.selected_].float() / best)


def test_team_larger_than_pool_is_refused_with_or_without_replacement() -> None:
    probs, labels = _noisy_pool(m=5)
    for replacement in (True, False):
        with pytest.raises(PatError, match="size must be at most the pool size 5. Got 6."):
            GreedySelector(6, replacement=replacement).fit(probs, labels)


def _complementary_pool():
    """Members 1 and 3 are each right on one half; together they are right everywhere."""
    n = 40
    labels = torch.arange(n) % 2
    first = torch.arange(n) < n // 2
    g = torch.Generator().manual_seed(0)
    members = [_member(labels, torch.rand(n, generator=g) < 0.7, 0.7, 0.7) for _ in range(5)]
    members[1] = _member(labels, first, 0.95, 0.55)
    members[3] = _member(labels, ~first, 0.95, 0.55)
    return torch.stack(members), labels


@pytest.mark.parametrize("metric", ["accuracy", "nll"])
def test_brute_force_finds_the_complementary_pair(metric) -> None:
    probs, labels = _complementary_pool()
    sel = BruteForceSelector(2, metric=metric).fit(probs, labels)
    assert sel.selected_ == [1, 3]
    assert sel.accuracy_ == 1.0
    assert sel.n_teams_ == 10


def test_brute_force_refuses_too_many_teams_before_working() -> None:
    probs = torch.full((30, 2, 3), 1 / 3)
    with pytest.raises(PatError, match=r"174,406 teams .*sizes 2\.\.5 of 30 members.*max_teams=100,000"):
        BruteForceSelector(5).fit(probs, torch.zeros(2, dtype=torch.long))


def _focal_pool():
    """Members 0-2 are copies; 3 and 4 err on samples where the copies are right."""
    n = 60
    labels = torch.arange(n) % 2
    idx = torch.arange(n)
    copy = _member(labels, idx >= 15, 0.8, 0.7)
    probs = torch.stack([
        copy, copy, copy,
        _member(labels, (idx < 15) | (idx >= 30), 0.8, 0.7),
        _member(labels, (idx < 30) | (idx >= 45), 0.8, 0.7),
    ])
    return probs, labels


@pytest.mark.parametrize("measure", ["generalized", "kw", "disagreement", "kappa"])
@pytest.mark.parametrize("max_teams", [10_000, 1])
def test_focal_selector_avoids_copies(measure, max_teams) -> None:
    probs, labels = _focal_pool()
    sel = FocalSelector(3, measure=measure, max_teams=max_teams).fit(probs, labels)
    assert sel.exhaustive_ == (max_teams > 1)
    assert {3, 4} <= set(sel.selected_) and len(set(sel.selected_) & {0, 1, 2}) == 1
    assert sel.accuracy_ >= sel.floor_
    assert sel.score_ < 1.0


def test_focal_selector_falls_back_to_the_most_accurate_team() -> None:
    probs, labels = _noisy_pool(m=5)
    sel = FocalSelector(2, accuracy_floor=1.0).fit(probs, labels)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    best = max(accuracy(probs[list(p)].mean(0), labels) for p in pairs)
    assert sel.accuracy_ == pytest.approx(best)


def test_bad_input_is_refused() -> None:
    probs, labels = _noisy_pool(m=4)
    with pytest.raises(PatError, match="k must be at most the pool size 4. Got 5."):
        TopKSelector(5).fit(probs, labels)
    with pytest.raises(PatError, match="size must be an integer >= 1. Got 0."):
        GreedySelector(0)
    with pytest.raises(PatError, match="size must be an integer >= 2"):
        FocalSelector(1)
    with pytest.raises(PatError, match="size must be at most the pool size 4"):
        GreedySelector(6, replacement=False).fit(probs, labels)
    with pytest.raises(PatError, match="max_size must be at most the pool size"):
        BruteForceSelector(5).fit(probs, labels)
    with pytest.raises(PatError, match="different class counts"):
        AllSelector().fit([probs[0], probs[1][:, :3]], labels)
    with pytest.raises(PatError, match=r"val_probs must be \(M, N, C\)"):
        AllSelector().fit(probs[0], labels)
    with pytest.raises(PatError, match="labels must be"):
        AllSelector().fit(probs, labels[:-1])
    with pytest.raises(PatError, match="metric must be one of"):
        TopKSelector(2, metric="f1")
    with pytest.raises(PatError, match="measure must be one of"):
        FocalSelector(2, measure="entropy")
    with pytest.raises(PatError, match="is not fitted"):
        TopKSelector(2).predict_proba(probs)


def test_registry() -> None:
    assert list_selectors() == ["all", "top-k", "random", "brute-force", "greedy", "focal"]
    sel = create_selector("greedy", size=3, metric="accuracy")
    assert isinstance(sel, GreedySelector) and sel.size == 3 and sel.metric == "accuracy"
    with pytest.raises(PatError, match="unknown selector 'best'; choose one of: all, top-k"):
        create_selector("best")
    with pytest.raises(PatError, match="selector 'top-k' takes k, metric; got size"):
        create_selector("top-k", size=3)
    with pytest.raises(PatError, match="selector 'top-k' takes k, metric; k is required"):
        create_selector("top-k")


def test_greedy_and_brute_force_without_a_size_may_use_the_whole_pool() -> None:
    probs, labels = _noisy_pool(m=5)
    greedy = GreedySelector().fit(probs, labels)
    assert greedy.selected_ == GreedySelector(5).fit(probs, labels).selected_ and len(greedy.history_) == 5
    brute = BruteForceSelector().fit(probs, labels)
    assert brute.selected_ == BruteForceSelector(5).fit(probs, labels).selected_
    assert brute.n_teams_ == 10 + 10 + 5 + 1  # every team of 2..5 of the 5 members
    with pytest.raises(PatError, match="min_size must be at most the pool size 1. Got 2."):
        BruteForceSelector().fit(probs[:1], labels)
