"""End to end: parent → split → tune → evaluate. The function behind ``pat run`` and ``pat demo``.

An output directory holds ``config.yaml`` (the resolved config), ``parent.pt``, ``children/``
(an ensemble directory) and ``metrics.json``. Every stage is skipped when its output is already
there, so an interrupted run continues where it stopped when started again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pat.config import (
    DataConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
    TuneConfig,
    load_yaml,
    save_yaml,
    to_dict,
)
from pat.data import Dataset, load_dataset
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import atomic_write, load_model
from pat.engine.loop import resolve_device
from pat.ensemble.ensemble import Ensemble
from pat.ensemble.metrics import accuracy_vs_size, classification_metrics, evaluate
from pat.ensemble.predict import collect_probs
from pat.ensemble.store import EnsembleDir
from pat.errors import PatError
from pat.parent import train_parent
from pat.tuner import tune_directory

__all__ = ["RunResult", "run", "demo_config", "evaluate_run", "split_to_directory"]

Progress = Callable[[str], Iterable[Callback]]


@dataclass
class RunResult:
    out: Path
    rows: list[dict[str, Any]]  # one per parent, child and the ensemble: name, accuracy, nll, ece, brier
    diversity: dict[str, Any]
    seconds: float


def demo_config(out: str = "runs/demo") -> RunConfig:
    """The ``pat demo`` run: digits, a LeNet-S parent, 6 anti-random children, one-cycle tuning.

    Digits has ~1.3k training images: at the paper's batch of 128 an epoch is 10 steps, too
    few for a half-pruned child to recover, so the demo uses batch 32 (41 steps an epoch):
    a 5-epoch parent, then 4 epochs per child (see docs/decisions.md).
    """
    data = DataConfig(dataset="digits", batch_size=32)
    return RunConfig(
        parent=TrainConfig(model="lenet-s", epochs=5, lr=0.05, data=data),
        split=SplitConfig(children=6, method="anti-random", sparsity=0.5),
        tune=TuneConfig(epochs=4, schedule="one-cycle", max_lr=0.05, data=data),
        out=out,
    )


def split_to_directory(parent_path: str | Path, out: str | Path, config: SplitConfig, *,
                       force: bool = False) -> EnsembleDir:
    """Split the parent checkpoint into children and write them as an ensemble directory.

    Everything is validated before anything is written: an output directory that already
    holds an ensemble is refused unless ``force``; each member's manifest record holds its
    mask recipe and seed plus ``stats`` (kept parameters, sparsity, MACs).
    """
    from pat.children import save_child, split
    from pat.masks.apply import count_params_macs, default_example_inputs

    parent, ckpt = load_model(parent_path, argument="--parent")
    ens = EnsembleDir.create(out, arch=ckpt.get("arch"), num_classes=ckpt.get("num_classes"),
                             parent={"file": str(Path(parent_path).resolve()), "metrics": ckpt.get("metrics", {})},
                             config={"split": to_dict(config)}, dataset=ckpt.get("dataset"), force=force)
    example = default_example_inputs(parent)
    total_params = sum(p.numel() for p in parent.parameters())
    children = split(parent, config.children, method=config.method, sparsity=config.sparsity,
                     level=config.level, scope=config.scope, physical=config.physical, seed=config.seed,
                     example_inputs=example, include_first=config.include_first,
                     include_classifier=config.include_classifier, rescale=config.rescale)
    for child in children:
        index = child.pat_recipe["index"]
        name, file = f"child-{index}", f"child-{index}.pt"
        save_child(ens.path / file, child, arch=ckpt.get("arch"), status="split",
                   dataset=ckpt.get("dataset"), num_classes=ckpt.get("num_classes"))
        params, macs = count_params_macs(child, example) if example is not None else (None, None)
        ens.upsert_member({
            "name": name, "file": file, "producer": "split", "status": "split",
            "parent": str(Path(parent_path).resolve()), "recipe": dict(child.pat_recipe),
            "stats": {"kept_params": params, "total_params": total_params,
                      "sparsity": None if params is None else 1 - params / total_params, "macs": macs},
        })  # fmt: skip
    ens.save()
    return ens


def _claim_output(config: RunConfig, force: bool) -> Path:
    """Refuse an output directory that holds a different run; remember this run's config."""
    out = Path(config.out)
    saved = out / "config.yaml"
    if saved.exists() and not force and load_yaml(saved) != to_dict(config):
        raise PatError(f"out {str(out)!r} holds a run with a different config; pass --force to "
                       "replace it or choose another directory.")
    if force and out.exists():
        for name in ("parent.pt", "parent.pt.partial", "children", "metrics.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, saved)
    return out


def evaluate_run(children_dir: Path, data: Dataset, *, parent_path: Path | None = None,
                 device: str = "auto", split: str = "test") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Metrics of the parent (if given), every child and the children's softmax average.

    Each child row also has ``ensemble_acc``: the accuracy of the average of children 1..i,
    i.e. what the ensemble reached as children were added.
    """
    dev = resolve_device(device)
    ensemble = Ensemble.load(children_dir, device=dev)
    models = list(ensemble.members)
    if parent_path is not None:
        models.insert(0, load_model(parent_path, device=dev, argument="parent")[0])
    probs, labels = collect_probs(models, data.loader(split, batch_size=512, device=dev))
    rows = [{"name": "parent", **classification_metrics(probs[0], labels)}] if parent_path else []
    children = probs[1:] if parent_path is not None else probs
    report = evaluate(children, labels)
    running = accuracy_vs_size(children, labels).tolist()
    for name, m, acc in zip(ensemble.names, report["members"], running, strict=True):
        rows.append({"name": name, **{k: v for k, v in m.items() if k != "index"}, "ensemble_acc": acc})
    rows.append({"name": f"ensemble ({len(children)})", **report["ensemble"]})
    return rows, report["diversity"]


def run(config: RunConfig, *, force: bool = False, progress: Progress = lambda stage: ()) -> RunResult:
    """Run (or continue) the whole Prune-and-Tune pipeline described by ``config``.

    One process: to spread children over GPUs, run the stages separately and tune with
    ``torchrun ... -m pat tune``.
    """
    start = time.perf_counter()
    out = _claim_output(config, force)
    pdata = config.parent.data
    data = load_dataset(pdata.dataset, data_dir=pdata.data_dir, val_fraction=pdata.val_fraction, seed=pdata.seed)
    parent_path, children_dir = out / "parent.pt", out / "children"
    if not parent_path.exists():
        train_parent(config.parent, data=data, callbacks=progress("parent"), out=parent_path)
    if not (children_dir / "ensemble.json").exists():
        split_to_directory(parent_path, children_dir, config.split)
    tune_directory(children_dir, data, config.tune, callbacks=progress)
    rows, diversity = evaluate_run(children_dir, data, parent_path=parent_path, device=config.tune.device)
    seconds = time.perf_counter() - start
    text = json.dumps({"test": rows, "diversity": diversity, "seconds": seconds}, indent=2)
    atomic_write(out / "metrics.json", lambda f: f.write(text.encode()))
    return RunResult(out=out, rows=rows, diversity=diversity, seconds=seconds)
