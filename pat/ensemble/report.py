"""Evaluate, select and soup the members of an ensemble directory: the API behind
``pat eval``, ``pat select`` and ``pat soup``.

Member probabilities on each split are collected once and cached in the directory
(:func:`pat.ensemble.predict.cached_probs`); everything else works on those tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from pat.data import Dataset, DeviceLoader
from pat.engine.checkpoint import atomic_write, ensure_writable, save_model
from pat.engine.loop import resolve_device
from pat.ensemble.corruptions import corrupt_split, list_corruptions, load_cifar_c
from pat.ensemble.ensemble import Ensemble
from pat.ensemble.metrics import accuracy, classification_metrics, evaluate
from pat.ensemble.predict import cached_probs, collect_probs
from pat.ensemble.select import create_selector
from pat.ensemble.store import EnsembleDir
from pat.errors import PatError, check

__all__ = ["directory_probs", "evaluate_directory", "select_directory", "soup_directory"]

SIZE_ARGUMENT = {"top-k": "k", "random": "k", "brute-force": "max_size", "greedy": "size", "focal": "size"}


def _check_classes(ens: EnsembleDir, data: Dataset) -> None:
    classes = ens.manifest.get("num_classes")
    if classes is not None and classes != data.num_classes:
        raise PatError(f"--dataset {data.name!r} has {data.num_classes} classes but the members of "
                       f"{str(ens.path)!r} predict {classes}.")


def published_corruptions(data: Dataset, data_dir: str | os.PathLike | None) -> bool:
    """Whether the CIFAR-10-C / CIFAR-100-C files for ``data`` are in ``data_dir``."""
    folder = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}.get(data.name)
    return bool(folder and data_dir and (Path(data_dir) / folder / "labels.npy").is_file())


def directory_probs(ens: EnsembleDir, data: Dataset, split: str = "test", *, device: str = "auto",
                    corruption: tuple[str, int] | None = None, seed: int = 0,
                    data_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """``(M, N, C)`` probabilities of every member on ``split`` (optionally corrupted), cached.

    A corrupted test split comes from the published CIFAR-10-C / CIFAR-100-C files when
    ``data_dir`` holds them, else it is generated on the fly with ``seed``.
    """
    _check_classes(ens, data)
    dev = resolve_device(device)
    part = data.split(split)
    check(len(part.y) > 0, f"split {split!r} of {data.name!r} is empty.")
    name = split if corruption is None else f"{split}-{corruption[0]}-{corruption[1]}"
    published = corruption is not None and split == "test" and published_corruptions(data, data_dir)

    def compute() -> tuple[Tensor, Tensor]:
        x, y = part.x, part.y
        if published:
            x, y = load_cifar_c(data_dir, corruption[0], corruption[1], dataset=data.name)
        elif corruption is not None:
            x = corrupt_split(part.x, corruption[0], corruption[1], seed)
        loader = DeviceLoader(x, y, mean=data.mean, std=data.std, batch_size=512, device=dev)
        members = Ensemble.load(ens.path, device=dev)
        probs, labels = collect_probs(list(members.members), loader)
        if probs.shape[-1] != data.num_classes:
            raise PatError(f"--dataset {data.name!r} has {data.num_classes} classes but the members "
                           f"predict {probs.shape[-1]}.")
        return probs, labels

    key = {"dataset": data.name, "split": split, "size": len(part.y), "corruption": list(corruption or []),
           "seed": seed, "published": published}
    return cached_probs(ens, name, compute, key=key)


def _team(ens: EnsembleDir) -> tuple[list[int] | None, list[float] | None]:
    selection = ens.selection_indices()
    return selection if selection is not None else (None, None)


def evaluate_directory(path: str | os.PathLike, data: Dataset, *, split: str = "test",
                       corruptions: bool = False, plot_dir: str | os.PathLike | None = None,
                       device: str = "auto", data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Metrics of every member, the whole ensemble and the recorded selection (if any).

    Writes ``metrics.json`` beside the manifest. With ``corruptions``, every on-the-fly
    corruption at severities 1-5 is evaluated too (ensemble and mean-member accuracy, NLL, ECE).
    """
    ens = EnsembleDir.load(path)
    check(len(ens) > 0, f"ENSEMBLE_DIR {str(ens.path)!r} holds no members.")
    probs, labels = directory_probs(ens, data, split, device=device)
    report: dict[str, Any] = {"dataset": data.name, "split": split,
                              "names": [m["name"] for m in ens.members], "all": evaluate(probs, labels)}
    team, weights = _team(ens)
    if team is not None:
        report["selection"] = {"method": ens.manifest["selection"]["method"],
                               **evaluate(probs, labels, selected=team, weights=weights, combiner="weighted")}
    if corruptions:
        report["corruption_source"] = "published" if published_corruptions(data, data_dir) else "on-the-fly"
        report["corruptions"] = _corruption_table(ens, data, split, device, team, weights, data_dir)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(ens.path / "metrics.json", lambda f: f.write(text.encode()))
    if plot_dir is not None:
        _plots(probs, labels, Path(plot_dir))
    return report


def _corruption_table(ens: EnsembleDir, data: Dataset, split: str, device: str,
                      team: list[int] | None, weights: list[float] | None,
                      data_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    rows = []
    for name in list_corruptions():
        for severity in range(1, 6):
            probs, labels = directory_probs(ens, data, split, device=device, corruption=(name, severity),
                                            data_dir=data_dir)
            result = evaluate(probs, labels, selected=team, weights=weights,
                              combiner="weighted" if weights else "mean")
            member_acc = sum(m["accuracy"] for m in result["members"]) / len(result["members"])
            rows.append({"corruption": name, "severity": severity, **result["ensemble"],
                         "member_accuracy": member_acc})
    return rows


def _plots(probs: Tensor, labels: Tensor, out: Path) -> None:
    from pat.ensemble import plots
    from pat.ensemble.metrics import accuracy_vs_size, pairwise_disagreement
    from pat.ensemble.predict import combine

    out.mkdir(parents=True, exist_ok=True)
    plots.reliability_diagram(combine(probs), labels, out / "reliability.png")
    plots.accuracy_vs_size_plot(accuracy_vs_size(probs, labels), out / "accuracy_vs_size.png")
    plots.disagreement_heatmap(pairwise_disagreement(probs), out / "disagreement.png")


def select_directory(path: str | os.PathLike, data: Dataset, method: str, *, size: int | None = None,
                     device: str = "auto", **options: Any) -> dict[str, Any]:
    """Fit a selector on the validation split and record the team and weights in the manifest."""
    ens = EnsembleDir.load(path)
    check(len(data.val.y) > 0, f"--dataset {data.name!r} has no validation split; selection never uses test.")
    if size is not None and method in SIZE_ARGUMENT:
        options[SIZE_ARGUMENT[method]] = size
    selector = create_selector(method, **options)
    probs, labels = directory_probs(ens, data, "val", device=device)
    selector.fit(probs, labels)
    weights = selector.weights_.tolist()
    ens.record_selection(method, selector.selected_, weights, options=dict(options))
    ens.save()
    val = evaluate(probs, labels, selected=selector.selected_, weights=weights, combiner="weighted")
    return {"selected": [ens.members[i]["name"] for i in selector.selected_], "weights": weights,
            "val": val["ensemble"], "val_all": evaluate(probs, labels)["ensemble"]}


def _check_same_channels(ens: EnsembleDir) -> None:
    """Physically slimmed members keep different channels: position i of one member's weight
    is not position i of another's, so averaging them is meaningless even when shapes agree."""
    from pat.engine.checkpoint import load_checkpoint

    kept = {m["name"]: load_checkpoint(ens.member_path(m), mmap=True).get("kept") for m in ens.members}
    if len({json.dumps(k, sort_keys=True) for k in kept.values()}) > 1:
        slim = [n for n, k in kept.items() if k]
        raise PatError(f"members {slim} are physically pruned with different channels kept; their "
                       "weights cannot be averaged into a soup (use masked children).")


def soup_directory(path: str | os.PathLike, data: Dataset, out: str | os.PathLike, *, greedy: bool = False,
                   force: bool = False, device: str = "auto") -> dict[str, Any]:
    """Average the members' weights (uniform, or greedy on validation accuracy), recompute
    BatchNorm statistics on training data, and save the soup as an ordinary checkpoint."""
    from pat.ensemble.soups import greedy_soup, uniform_soup

    out = ensure_writable(out, force=force)
    ens = EnsembleDir.load(path)
    _check_classes(ens, data)
    _check_same_channels(ens)
    dev = resolve_device(device)
    models = list(Ensemble.load(path, device=dev).members)
    bn = data.loader("train", batch_size=256, shuffle=False, augment=False, device=dev)
    if greedy:
        check(len(data.val.y) > 0, f"--dataset {data.name!r} has no validation split for a greedy soup.")
        soup, used = greedy_soup(models, data.loader("val", batch_size=512, device=dev), bn)
    else:
        soup, used = uniform_soup(models, bn_loader=bn), list(range(len(models)))
    probs, labels = collect_probs([soup], data.loader("test", batch_size=512, device=dev))
    metrics = {f"test_{k}": v for k, v in classification_metrics(probs[0], labels).items()}
    ingredients = [ens.members[i]["name"] for i in used]
    save_model(out, soup, kind="model", arch=ens.manifest.get("arch"), metrics=metrics,
               dataset=data.name, num_classes=data.num_classes,
               soup={"greedy": greedy, "ingredients": ingredients, "source": str(Path(path).resolve())})
    return {"ingredients": ingredients, "metrics": metrics, "accuracy": accuracy(probs[0], labels)}
