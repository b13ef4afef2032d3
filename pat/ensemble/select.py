"""Selectors: choose a team (and its weights) from a pool of members on a validation split.

Every selector follows the scikit-learn estimator contract::

    sel = GreedySelector(size=8).fit(val_probs, val_labels)   # returns self
    sel.selected_    # list[int], member indices, ascending
    sel.weights_     # (len(selected_),) float32, sums to 1
    sel.predict_proba(test_probs)                              # (N, C)

Selection always uses a validation split, never the test split. Scores compare as tuples:
``metric="accuracy"`` ranks by accuracy and breaks ties by NLL, ``metric="nll"`` the
reverse; remaining ties go to the lower member index.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from pat.ensemble.diversity import MEASURES, focal_scores
from pat.ensemble.metrics import batch_metrics, team_metrics
from pat.ensemble.predict import check_probs, combine
from pat.errors import PatError, check
from pat.registry import Registry

__all__ = [
    "Selector",
    "AllSelector",
    "TopKSelector",
    "RandomSelector",
    "BruteForceSelector",
    "GreedySelector",
    "FocalSelector",
    "all_teams",
    "list_selectors",
    "create_selector",
]

_METRICS = ("accuracy", "nll")


def _count(value: Any, argument: str, minimum: int = 1) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    check(ok, f"{argument} must be an integer >= {minimum}. Got {value!r}.")
    return value


def _metric(value: str) -> str:
    check(value in _METRICS, f"metric must be one of {list(_METRICS)}. Got {value!r}.")
    return value


def _best(acc: Tensor, nll: Tensor, metric: str) -> int:
    """Index of the best entry: primary metric first, then the other, then the lower index."""
    primary, secondary = (-acc, nll) if metric == "accuracy" else (nll, -acc)
    tied = primary <= primary.min()
    return int(torch.where(tied, secondary, torch.inf).argmin())


def all_teams(m: int, size: int) -> Tensor:
    """Every team of ``size`` out of ``m`` members, ``(C(m, size), size)`` int64."""
    combos = list(itertools.combinations(range(m), size))
    return torch.tensor(combos, dtype=torch.long).reshape(len(combos), size)


class Selector:
    """Base class: subclasses implement :meth:`_select`."""

    name: ClassVar[str] = ""
    selected_: list[int]
    weights_: Tensor

    def fit(self, val_probs: Tensor, val_labels: Tensor) -> Selector:
        """Choose a team from ``val_probs`` ``(M, N, C)`` and ``val_labels`` ``(N,)``."""
        labels = torch.as_tensor(val_labels)
        probs = check_probs(val_probs, labels, argument="val_probs").float()
        labels = labels.long()
        self.n_members_ = probs.shape[0]
        selected, weights = self._select(probs, labels)
        check(selected, f"selector {self.name!r} chose an empty team.")
        order = sorted(range(len(selected)), key=lambda i: selected[i])
        self.selected_ = [int(selected[i]) for i in order]
        w = torch.as_tensor(weights, dtype=torch.float32)[order]
        self.weights_ = w / w.sum()
        return self

    def _select(self, probs: Tensor, labels: Tensor) -> tuple[list[int], Tensor]:
        raise NotImplementedError

    def _size(self, size: int, m: int, argument: str = "size") -> None:
        check(size <= m, f"{argument} must be at most the pool size {m}. Got {size}.")

    def predict_proba(self, probs: Tensor) -> Tensor:
        """Combine the selected members of ``probs`` ``(M, N, C)`` with ``weights_`` → ``(N, C)``."""
        check(hasattr(self, "selected_"), f"selector {self.name!r} is not fitted; call fit() first.")
        probs = check_probs(probs)
        check(probs.shape[0] == self.n_members_,
              f"probs has {probs.shape[0]} members; the selector was fitted on {self.n_members_}.")
        return combine(probs[self.selected_], "weighted", self.weights_)

    def get_params(self) -> dict[str, Any]:
        """The constructor's settings (attributes not ending in ``_``), as scikit-learn has it."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class AllSelector(Selector):
    """Every member, equal weights."""

    name = "all"

    def _select(self, probs: Tensor, labels: Tensor) -> tuple[list[int], Tensor]:
        return list(range(probs.shape[0])), torch.ones(probs.shape[0])


class TopKSelector(Selector):
    """The k best members by validation accuracy (or NLL), equal weights.

    Learned ``ranking_``: every member index, best first.
    """

    name = "top-k"

    def __init__(self, k: int, metric: str = "accuracy") -> None:
        self.k = _count(k, "k")
        self.metric = _metric(metric)

    def _select(self, probs: Tensor, labels: Tensor) -> tuple[list[int], Tensor]:
        self._size(self.k, probs.shape[0], "k")
        acc, nll = batch_metrics(probs, labels)
        primary, secondary = (-acc, nll) if self.metric == "accuracy" else (nll, -acc)
        self.ranking_ = sorted(range(len(acc)), key=lambda i: (float(primary[i]), float(secondary[i]), i))
        return self.ranking_[: self.k], torch.ones(self.k)


class RandomSelector(Selector):
    """k members drawn without replacement by a seeded generator, equal weights."""

    name = "random"

    def __init__(self, k: int, seed: int = 0) -> None:
        self.k = _count(k, "k")
        self.seed = _count(seed, "seed", minimum=0)

    def _select(self, probs: Tensor, labels: Tensor) -> tuple[list[int], Tensor]:
        self._size(self.k, probs.shape[0], "k")
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(probs.shape[0], generator=g)[: self.k].tolist(), torch.ones(self.k)


class BruteForceSelector(Selector):
    """The best mean-combined team over every team of ``min_size``..``max_size`` members.

    ``max_size=None`` allows teams of every size up to the pool's. Refuses (PatError) before
    any work when that is more than ``max_teams`` teams.
    Learned ``accuracy_``, ``nll_`` (of the chosen team) and ``n_teams_``.
    """

    name = "brute-force"

    def __init__(
        self, max_size: int | None = None, metric: str = "nll", max_teams: int = 100_000, min_size: int = 2
    ) -> None:
        self.max_size = None if max_size is None else _count(max_size, "max_size")
        self.metric = _metric(metric)
        self.max_teams = _count(max_teams, "max_teams")
        self.min_size = _count(min_size, "min_size")
        check(max_size is None or min_size <= max_size,
              f"min_size must be at most max_size ({max_size}). Got {min_size}.")

    def _select(self, probs: Tensor, labels: Tensor) -> tuple[list[int], Tensor]:
        m = probs.shape[0]
        max_size = m if self.max_size is None else self.max_size
        self._size(max_size, m, "max_size")
        check(self.min_size <= m, f"min_size must be at most the pool size {m}. Got {self.min_size}.")
        sizes = range(self.min_size, max_size + 1)
        self.n_teams_ = sum(math.comb(m, k) for k in sizes)
        if self.n_teams_ > self.max_teams:
            raise PatError(
                f"brute-force selection would score {self.n_teams_:,} teams (sizes "
                f"{self.min_size}..{max_size} of {m} members); the limit is "
                f"max_teams={self.max_teams:,}. Lower max_size or raise max_teams."
            )
        teams = [all_teams(m, k) for k in sizes]
        scored = [team_metrics(probs, labels, t) for t in teams]
        acc = torch.cat([a for a, _ in scored])
        nll = torch.cat([n for _, n in scored])
        best = _best(acc, nll, self.metric)
        self.accuracy_, self.nll_ = float(acc[best]), float(nll[best])
        # rows of every size, padded with -1 to max_size, in the order they were scored
        padded = torch.cat([F.pad(t, (0, max_size - t.shape[1]), value=-1) for t in teams])
        team = [i for i in padded[best].tolist() if i >= 0]
        return team, torch.ones(len(team))


class GreedySelector(Selector):
    """Forward selection (Caruana et al., "Ensemble Selection from Libraries of Models", ICML 2004).

    Starting from an empty bag, ``size`` times add the member whose addition gives the best
    mean-combined validation score; with ``replacement`` a member can be added again, which
    raises its weight. The bag kept is the best prefix seen (the earliest one among equals),
    so ``size`` is an upper bound (``None``: the pool's size). Weights are pick counts / bag length.

    Learned ``history_``: ``[{"member", "accuracy", "nll"}, ...]`` after each pick.
    """

    name = "greedy"

    def __init__(self, size: int | None = None, metric: str = "nll", replacement: bool = True) -> None:
        self.size = None if size is None else _count(size, "size")
        self.metric = _metric(metric)
        self.replacement = bool(replacement)

    def _select(self, probs: Tensor, labels: Tensor) -> tuple[list[int], Tensor]:
        m = probs.shape[0]
        size = m if self.size is None else self.size
        # also with replacement: a bag of more picks than members is not what --size asks for
        self._size(size, m)
        total = torch.zeros_like(probs[0])
        picks: list[int] = []
        self.history_: list[dict[str, float]] = []
        best_len, best_key = 0, (math.inf, math.inf)
        for step in range(size):
            cands = [i for i in range(m) if self.replacement or i not in picks]
            acc, nll = batch_metrics((total + probs[cands]) / (step + 1), labels)
            k = _best(acc, nll, self.metric)
            picks.append(cands[k])
            total += probs[cands[k]]
            self.history_.append({"member": cands[k], "accuracy": float(acc[k]), "nll": float(nll[k])})
            key = (-float(acc[k]), float(nll[k])) if self.metric == "accuracy" else (float(nll[k]), -float(acc[k]))
            if key < best_key:
                best_len, best_key = step + 1, key
        counts = torch.bincount(torch.tensor(picks[:best_len]), minlength=m).float()
        chosen = counts.nonzero().flatten()
        return chosen.tolist(), counts[chosen]


class FocalSelector(Selector):
    """The most focal-diverse team of ``size`` whose ensemble accuracy clears a floor.

    Among teams whose mean-combined validation accuracy is at least ``accuracy_floor``
    (default: the mean member accuracy), pick the one with the lowest focal diversity score
    (:mod:`pat.ensemble.diversity`; ties → higher accuracy). If no team clears the floor,
    the most accurate team is taken. When ``C(M, size)`` exceeds ``max_teams`` the team is
    built greedily instead: start from the most accurate member and add, one at a time, the
    member that the same rule prefers. Wu, Liu et al., CVPR 2021 (EnsembleBench).

    Learned ``score_``, ``accuracy_`` (of the chosen team), ``floor_``, ``exhaustive_``.
    """

    name = "focal"

    def __init__(
        self,
        size: int,
        measure: str = "generalized",
        accuracy_floor: float | None = None,
        max_teams: int = 10_000,
    ) -> None:
        self.size = _count(size, "size", minimum=2)
        check(measure in MEASURES, f"measure must be one of {list(MEASURES)}. Got {measure!r}.")
        self.measure = measure
        check(accuracy_floor is None or 0.0 <= accuracy_floor <= 1.0,
              f"accuracy_floor must be in [0, 1] or None. Got {accuracy_floor!r}.")
        self.accuracy_floor = accuracy_floor
        self.max_teams = _count(max_teams, "max_teams")

    def _pick(self, probs: Tensor, labels: Tensor, teams: Tensor) -> int:
        acc, _ = team_metrics(probs, labels, teams)
        preds = probs.argmax(-1)
        score = focal_scores(preds, preds == labels, teams, measure=self.measure,
                             num_classes=probs.shape[2])
        ok = acc >= self.floor_ - 1e-9
        if not ok.any():
            return int(acc.argmax())
        # lowest score among teams that clear the floor; ties to the higher accuracy
        masked = torch.where(ok, score, torch.inf)
        tied = masked <= masked.min()
        return int(torch.where(tied, -acc, torch.inf).argmin())

    def _select(self, probs: Tensor, labels: Tensor) -> tuple[list[int], Tensor]:
        m = probs.shape[0]
        self._size(self.size, m)
        member_acc, member_nll = batch_metrics(probs, labels)
        self.floor_ = float(member_acc.mean()) if self.accuracy_floor is None else self.accuracy_floor
        self.exhaustive_ = math.comb(m, self.size) <= self.max_teams
        if self.exhaustive_:
            teams = all_teams(m, self.size)
            team = teams[self._pick(probs, labels, teams)].tolist()
        else:
            team = [_best(member_acc, member_nll, "accuracy")]
            while len(team) < self.size:
                rest = [c for c in range(m) if c not in team]
                teams = torch.tensor([team + [c] for c in rest])
                team = teams[self._pick(probs, labels, teams)].tolist()
        preds = probs.argmax(-1)
        t = torch.tensor([team])
        self.accuracy_ = float(team_metrics(probs, labels, t)[0][0])
        self.score_ = float(focal_scores(preds, preds == labels, t, measure=self.measure,
                                         num_classes=probs.shape[2])[0])
        return team, torch.ones(len(team))


SELECTORS: Registry[type[Selector]] = Registry("selector")
for _cls in (AllSelector, TopKSelector, RandomSelector, BruteForceSelector, GreedySelector, FocalSelector):
    SELECTORS.add(_cls.name, _cls)


def list_selectors() -> list[str]:
    """Selector names accepted by :func:`create_selector`."""
    return SELECTORS.names()


def create_selector(name: str, **kwargs: Any) -> Selector:
    """Build a selector by name, e.g. ``create_selector("greedy", size=8, metric="nll")``."""
    cls = SELECTORS.get(name)
    try:
        return cls(**kwargs)
    except TypeError:
        import inspect

        params = inspect.signature(cls).parameters
        unknown = sorted(set(kwargs) - set(params))
        missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
        why = f"got {', '.join(unknown)}" if unknown else f"{', '.join(missing)} is required"
        raise PatError(f"selector {name!r} takes {', '.join(params) or 'no arguments'}; {why}.") from None
