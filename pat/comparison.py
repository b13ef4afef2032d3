"""How a run is judged: its children, their ensemble, its parent and one model of the same budget.

:class:`Comparison` loads the models once (a parent or a baseline with BatchNorm has its
statistics recomputed, :func:`load_compared`) and predicts each split once, so the test rows
(:meth:`Comparison.rows`) and the check against the parent on validation
(:meth:`Comparison.parent_check`) share one validation pass. :func:`evaluate_run` and
:func:`parent_check` are the one-call forms; :func:`across_seeds` summarizes runs of one
config over seeds; :func:`baseline_trend` says whether the one model was still improving.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pat.data import Dataset
from pat.engine.batchnorm import statistics_loader, with_fresh_statistics
from pat.engine.checkpoint import load_model
from pat.engine.loop import resolve_device
from pat.ensemble.calibration import calibrated_nll
from pat.ensemble.ensemble import Ensemble
from pat.ensemble.metrics import accuracy_vs_size, classification_metrics, evaluate, sample_nll
from pat.ensemble.predict import collect_probs
from pat.errors import check
from pat.store import EnsembleDir

if TYPE_CHECKING:
    from pat.pipeline import RunResult

__all__ = ["Comparison", "load_compared", "recorded_parent", "evaluate_run", "parent_check", "baseline_trend",
           "across_seeds"]


def recorded_parent(children_dir: str | Path) -> Path | None:
    """The parent file an ensemble's manifest names, or None when it names none or the file is gone."""
    recorded = (EnsembleDir.load(children_dir).manifest.get("parent") or {}).get("file")
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def load_compared(path: str | Path, data: Dataset, device: torch.device, *,
                  argument: str = "parent") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model an ensemble is compared with (its parent, or one model of the same budget), and its checkpoint.

    A model with BatchNorm is compared with its statistics recomputed on the unaugmented
    training split, as every child's are after tuning (``tune.recompute_bn``). A trunk trained
    at a constant LR keeps running averages that lag its weights (ResNet-8 on digits after 6
    epochs: 11 % validation accuracy as saved, 77 % recomputed, decision 66), and even an
    annealed model's averages come from augmented batches (ResNet-8 after 48 epochs: TS-NLL
    0.033 as saved, 0.023 recomputed, decision 72); an ensemble measured against either would
    clear a bar that model's weights do not set. The file is untouched; the pass is an
    evaluation, not training, so no budget is charged for it.
    """
    model, saved = load_model(path, device=device, argument=argument)
    return with_fresh_statistics(model, statistics_loader(data, device)), saved


class Comparison:
    """An ensemble directory's children beside its parent and a baseline, each loaded once.

    ``parent_path`` and ``baseline`` (name, checkpoint) are optional; either is loaded with
    :func:`load_compared`. Probabilities are collected once per split and kept, in the order
    parent, children, baseline.
    """

    def __init__(self, children_dir: str | Path, data: Dataset, *, parent_path: str | Path | None = None,
                 baseline: tuple[str, Path] | None = None, device: str = "auto") -> None:
        self.children_dir, self.data, self.device = Path(children_dir), data, resolve_device(device)
        self.ensemble = Ensemble.load(children_dir, device=self.device, calibrated=False)
        self.parent, self.parent_saved = (load_compared(parent_path, data, self.device) if parent_path is not None
                                          else (None, {}))
        self.baseline_name = baseline[0] if baseline is not None else None
        extra = load_compared(baseline[1], data, self.device, argument="baseline")[0] if baseline is not None else None
        self.models = [m for m in (self.parent, *self.ensemble.members, extra) if m is not None]
        self.children = slice(int(self.parent is not None), len(self.models) - int(extra is not None))
        self._probs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def probs(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs (models, N, C), labels)`` on ``split``, collected the first time it is asked for."""
        if split not in self._probs:
            self._probs[split] = collect_probs(self.models, self.data.loader(split, batch_size=512, device=self.device))
        return self._probs[split]

    def rows(self, split: str = "test") -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The rows and diversity of :func:`evaluate_run`."""
        probs, labels = self.probs(split)
        kids = self.children
        children = probs[kids]
        # each row's NLL after a temperature fitted on validation (the ensemble's on its average)
        calibrated: list[float | None] = [None] * (len(self.models) + 1)
        if split != "val" and len(self.data.val.y):
            val, val_y = self.probs("val")
            pairs = [*zip(val, probs, strict=True), (val[kids].mean(0), children.mean(0))]
            calibrated = [calibrated_nll(v, val_y, t, labels) for v, t in pairs]
        first = kids.start
        rows = [{"name": "parent", **classification_metrics(probs[0], labels), "nll_ts": calibrated[0]}] if first else []
        report = evaluate(children, labels)
        running = accuracy_vs_size(children, labels).tolist()
        for i, (name, m, acc) in enumerate(zip(self.ensemble.names, report["members"], running, strict=True)):
            rows.append({"name": name, **{k: v for k, v in m.items() if k != "index"},
                         "nll_ts": calibrated[first + i], "ensemble_acc": acc})
        rows.append({"name": f"ensemble ({len(children)})", **report["ensemble"], "nll_ts": calibrated[-1]})
        if self.baseline_name is not None:
            rows.append({"name": self.baseline_name, **classification_metrics(probs[-1], labels),
                         "nll_ts": calibrated[-2]})
        return rows, report["diversity"]

    def parent_check(self) -> dict[str, Any]:
        """:func:`parent_check` for the parent this comparison holds; ``{}`` without one or without validation."""
        if self.parent is None or not len(self.data.val.y):
            return {}
        probs, labels = self.probs("val")
        pair = torch.stack([probs[0], probs[self.children].mean(0)])  # parent, ensemble: (2, N, C)
        p, e = (classification_metrics(q, labels) for q in pair)
        parent_hit, ensemble_hit = pair.argmax(-1) == labels
        lost, won = int((parent_hit & ~ensemble_hit).sum()), int((ensemble_hit & ~parent_hit).sum())
        diff = sample_nll(pair[1], labels) - sample_nll(pair[0], labels)
        nll_diff = {"mean": float(diff.mean()), "se": float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0}
        keys = ("accuracy", "nll", "ece")
        members = EnsembleDir.load(self.children_dir).members
        return {"parent": {k: p[k] for k in keys}, "ensemble": {k: e[k] for k in keys},
                "members": len(self.ensemble.members), "flips": {"lost": lost, "won": won}, "nll_diff": nll_diff,
                "worse": lost - won > 1.96 * math.sqrt(lost + won) or nll_diff["mean"] > 1.96 * nll_diff["se"],
                # a parent that learnt nothing (a trunk diverged at its constant LR, say)
                "parent_at_chance": p["accuracy"] <= 1.5 / self.data.num_classes,
                # a parent whose last epoch collapsed, handed over at its best epoch instead
                "parent_restored": self.parent_saved.get("restored"),
                "children_restored": {m["name"]: m["metrics"]["restored"] for m in members
                                      if (m.get("metrics") or {}).get("restored")}}


def evaluate_run(children_dir: Path, data: Dataset, *, parent_path: Path | None = None,
                 device: str = "auto", split: str = "test",
                 baseline: tuple[str, Path] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Metrics of the parent (if given; :func:`load_compared`), every child and the children's softmax average.

    Each child row also has ``ensemble_acc``: the accuracy of the average of children 1..i,
    i.e. what the ensemble reached as children were added. Every row has ``nll_ts``: its NLL
    after a temperature fitted on the validation split (the ensemble's on the children's
    averaged softmax; None when ``split`` is ``"val"`` or there is no validation split). ``baseline`` (name, checkpoint)
    adds a last row for a model to compare the ensemble with, loaded as the parent is.
    """
    return Comparison(children_dir, data, parent_path=parent_path, baseline=baseline, device=device).rows(split)


def parent_check(children_dir: str | Path, data: Dataset, *, parent_path: str | Path | None = None,
                 device: str = "auto") -> dict[str, Any]:
    """The ensemble against its parent on the validation split: accuracy and NLL of each.

    A parent with BatchNorm is evaluated with its statistics recomputed (:func:`load_compared`).

    ``parent_path`` defaults to the parent recorded in the ensemble's manifest. Returns
    ``{}`` when there is no validation split or no parent file to compare with; otherwise
    ``{"parent": {...}, "ensemble": {...}, "flips": {...}, "worse": bool, "parent_at_chance": bool,
    "parent_restored": dict | None, "children_restored": {name: dict}}``.
    ``worse`` means a lower accuracy or a higher NLL than the parent's by more than chance
    explains, each judged image by image (on digits' 143 validation images one image is 0.7 %,
    which no one should read as a verdict). ``flips`` counts the images only the parent gets
    right (``lost``) and only the ensemble gets right (``won``), and the accuracy is lower
    when ``lost - won`` exceeds 1.96 sqrt(lost + won), the paired sign test at 5 %.
    ``nll_diff`` holds the mean and standard error of the ensemble's NLL minus the parent's
    over the images, and the NLL is higher when the mean exceeds 1.96 standard errors, the
    paired t-test at 5 % (decision 69). ``parent_at_chance`` is a parent
    within 1.5x of chance accuracy; ``parent_restored`` is the parent checkpoint's ``restored`` record
    (its training collapsed and an earlier epoch was handed over; :mod:`pat.engine.guard`);
    ``children_restored`` holds the same record for each child whose tuning collapsed.
    """
    if not len(data.val.y):
        return {}
    parent_path = parent_path or recorded_parent(children_dir)
    if not parent_path or not Path(parent_path).is_file():
        return {}
    return Comparison(children_dir, data, parent_path=parent_path, device=device).parent_check()


def baseline_trend(history: list[dict[str, float]]) -> dict[str, Any] | None:
    """Whether the independent model of a run was still improving when its budget ran out.

    ``{"best_epoch", "epochs", "still_improving"}``: the epoch of its lowest validation loss,
    its last epoch, and whether the first lies in the last tenth of the run (the last epoch
    for runs under 15 epochs). That is the regime in which one model beat pat's ensemble of
    the same budget in every measurement in docs/benchmarks.md (Fashion-MNIST at 12–96 epochs:
    best epochs 23–24 of 24, 45–48 of 48, 91–96 of 96); where pat's ensemble won (digits at 144
    epochs) the best epochs were 38–104. None without validation metrics.
    """
    losses = [(h["val_loss"], int(h["epoch"])) for h in history
              if "val_loss" in h and math.isfinite(h["val_loss"])]
    if not losses:
        return None
    best, epochs = min(losses)[1], int(history[-1]["epoch"])
    return {"best_epoch": best, "epochs": epochs, "still_improving": best > epochs - max(1, round(0.1 * epochs))}


def across_seeds(results: list[RunResult], keys: tuple[str, ...] = ("accuracy", "nll_ts", "ece")) -> dict[str, Any]:
    """Runs of one config over several seeds, scored on the same test images: mean and standard error.

    ``rows``: the parent, the ensemble and (with ``baseline``) the independent model, each key a
    ``(mean, standard error)`` over the runs. ``versus``: the ensemble minus each of the others,
    paired run by run, each key ``(mean, standard error, runs where the ensemble is better)``:
    higher accuracy, lower NLL or ECE. A key a run lacks (``nll_ts`` without a validation split)
    is left out.
    """
    def pick(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if r["name"] == "parent" or r["name"].startswith(("ensemble", "independent"))]

    runs = [pick(r.rows) for r in results]
    check(len(runs) >= 2 and all([r["name"] for r in rows] == [r["name"] for r in runs[0]] for rows in runs),
          f"across_seeds needs at least two runs of one config. Got {len(runs)}.")

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))

    present = [k for k in keys if all(row.get(k) is not None for rows in runs for row in rows)]
    summary: dict[str, Any] = {"seeds": len(runs), "rows": [], "versus": {}}
    for i, name in enumerate(r["name"] for r in runs[0]):
        summary["rows"].append({"name": name, **{k: stats([rows[i][k] for rows in runs]) for k in present}})
    e = next(i for i, r in enumerate(runs[0]) if r["name"].startswith("ensemble"))
    for i, name in enumerate(r["name"] for r in runs[0]):
        if i != e:
            versus = summary["versus"][name] = {}
            for k in present:
                d = [rows[e][k] - rows[i][k] for rows in runs]
                versus[k] = (*stats(d), sum(v > 0 if k == "accuracy" else v < 0 for v in d))
    return summary
