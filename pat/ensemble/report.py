"""Evaluate, select and soup the members of an ensemble directory.

This is the API behind ``pat eval``, ``pat select`` and ``pat soup``.

Member probabilities on each split are collected once and cached in the directory
(:func:`pat.ensemble.predict.cached_probs`); everything else works on those tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pat.data import Dataset, DeviceLoader
from pat.engine.checkpoint import save_model
from pat.engine.loop import resolve_device
from pat.ensemble.calibration import (
    apply_temperature,
    deep_ensemble_equivalent,
    fit_temperature,
    size_curve,
)
from pat.ensemble.corruptions import corrupt_split, list_corruptions, load_cifar_c
from pat.ensemble.ensemble import Ensemble
from pat.ensemble.metrics import accuracy, classification_metrics, evaluate
from pat.ensemble.predict import cached_logits, collect_logits, collect_probs, combine
from pat.ensemble.select import create_selector
from pat.errors import PatError, check
from pat.io import atomic_write, ensure_writable
from pat.lock import writes_directory
from pat.store import EnsembleDir

__all__ = ["directory_logits", "directory_probs", "evaluate_directory", "select_directory", "soup_directory"]

SIZE_ARGUMENT = {"top-k": "k", "random": "k", "brute-force": "max_size", "greedy": "size", "focal": "size"}
# greedy and brute-force take the team size as an upper bound, the whole pool by default
SIZE_REQUIRED = ("top-k", "random", "focal")


def _check_classes(ens: EnsembleDir, data: Dataset) -> None:
    classes = ens.manifest.get("num_classes")
    if classes is not None and classes != data.num_classes:
        raise PatError(f"--dataset {data.name!r} has {data.num_classes} classes but the members of "
                       f"{str(ens.path)!r} predict {classes}.")


def published_corruptions(data: Dataset, data_dir: str | os.PathLike | None) -> bool:
    """Whether the CIFAR-10-C / CIFAR-100-C files for ``data`` are in ``data_dir``."""
    folder = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}.get(data.name)
    return bool(folder and data_dir and (Path(data_dir) / folder / "labels.npy").is_file())


def directory_logits(ens: EnsembleDir, data: Dataset, split: str = "test", *, device: str = "auto",
                     corruption: tuple[str, int] | None = None, seed: int = 0,
                     data_dir: str | os.PathLike | None = None, images: Dataset | None = None,
                     ) -> tuple[Tensor, Tensor]:
    """``(M, N, C)`` logits of every member on ``split`` (optionally corrupted), cached.

    A corrupted test split comes from the published CIFAR-10-C / CIFAR-100-C files when
    ``data_dir`` holds them, else it is generated on the fly with ``seed``. With ``images``
    (another dataset, for out-of-distribution scores) its test images are run through the
    members with ``data``'s normalisation, as the members were trained.
    """
    if images is None:
        _check_classes(ens, data)
    dev = resolve_device(device)
    source = images or data
    part = source.split(split)
    check(len(part.y) > 0, f"split {split!r} of {source.name!r} is empty.")
    name = split if corruption is None else f"{split}-{corruption[0]}-{corruption[1]}"
    if images is not None:
        name = "ood-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in images.name) + f"-{split}"
    published = corruption is not None and split == "test" and published_corruptions(data, data_dir)

    def compute() -> tuple[Tensor, Tensor]:
        x, y = part.x, part.y
        if published:
            x, y = load_cifar_c(data_dir, corruption[0], corruption[1], dataset=data.name)
        elif corruption is not None:
            x = corrupt_split(part.x, corruption[0], corruption[1], seed)
        loader = DeviceLoader(x, y, mean=data.mean, std=data.std, batch_size=512, device=dev)
        members = Ensemble.load(ens.path, device=dev, calibrated=False)
        logits, labels = collect_logits(list(members.members), loader)
        if logits.shape[-1] != data.num_classes:
            raise PatError(f"--dataset {data.name!r} has {data.num_classes} classes but the members "
                           f"predict {logits.shape[-1]}.")
        return logits, labels

    key = {"dataset": source.name, "split": split, "size": len(part.y), "corruption": list(corruption or []),
           "seed": seed, "published": published, "normalised_as": data.name}
    return cached_logits(ens, name, compute, key=key)


def directory_probs(ens: EnsembleDir, data: Dataset, split: str = "test", **options: Any) -> tuple[Tensor, Tensor]:
    """``(M, N, C)`` raw member probabilities on ``split``: softmax of :func:`directory_logits`."""
    logits, labels = directory_logits(ens, data, split, **options)
    return logits.softmax(dim=-1), labels


def member_temperatures(ens: EnsembleDir) -> Tensor:
    """``(M,)`` member temperatures from the manifest, in member order (refused if absent)."""
    record = ens.calibration()
    if record is None:
        raise PatError(f"ENSEMBLE_DIR {str(ens.path)!r} has no temperatures; run pat calibrate first.")
    return torch.tensor([record["members"][m["name"]] for m in ens.members])


def _combined_logits(logits: Tensor, team: list[int] | None, weights: list[float] | None) -> Tensor:
    """Log of the combined member softmax ``(N, C)``: what an ensemble temperature divides."""
    probs = logits.softmax(-1)
    if team is None:
        return combine(probs).clamp_min(1e-12).log()
    return combine(probs[team], "weighted", weights).clamp_min(1e-12).log()


def _team_temperature(val_logits: Tensor, val_labels: Tensor, team: list[int], weights: list[float] | None,
                      ens: EnsembleDir) -> dict[str, Any]:
    names = [ens.members[i]["name"] for i in team]
    t = fit_temperature(_combined_logits(val_logits, team, weights), val_labels, kind="logits")
    return {"selected": names, "weights": weights, "temperature": t}


@writes_directory
def calibrate_directory(path: str | os.PathLike, data: Dataset, *, device: str = "auto") -> dict[str, Any]:
    """Fit temperatures on the validation split and store them in the manifest.

    One temperature per member, one for the whole ensemble and one for the recorded team,
    stored under ``"calibration"``.
    """
    ens = EnsembleDir.load(path)
    check(len(ens) > 0, f"ENSEMBLE_DIR {str(ens.path)!r} holds no members.")
    check(len(data.val.y) > 0, f"--dataset {data.name!r} has no validation split (--val-fraction 0); "
                               "temperatures are fitted on validation data, never on test.")
    logits, labels = directory_logits(ens, data, "val", device=device)
    members = {m["name"]: fit_temperature(z, labels, kind="logits") for m, z in zip(ens.members, logits, strict=True)}
    combined = _combined_logits(logits, None, None)
    t_all = fit_temperature(combined, labels, kind="logits")
    team, weights = _team(ens)
    record = {"split": "val", "dataset": data.name, "val_size": len(labels), "members": members,
              "ensemble": t_all, "selection": None if team is None else _team_temperature(logits, labels, team, weights, ens),
              "stamp": ens.calibration_stamp()}
    raw = classification_metrics(combined.softmax(-1), labels)
    scaled = classification_metrics(apply_temperature(combined, t_all, kind="logits"), labels)
    record["val_nll"] = {"raw": raw["nll"], "calibrated": scaled["nll"]}
    ens.manifest["calibration"] = record
    ens.save()
    return record


def _calibrated(ens: EnsembleDir, record: dict[str, Any], logits: Tensor, labels: Tensor,
                team: list[int] | None, weights: list[float] | None) -> dict[str, Any]:
    """Member and ensemble metrics after temperature scaling with the recorded temperatures."""
    temps = member_temperatures(ens)
    members = [classification_metrics((z / t).softmax(-1), labels) for z, t in zip(logits, temps, strict=True)]
    out = {"temperatures": {"members": temps.tolist(), "ensemble": record["ensemble"]}, "members": members,
           "ensemble": classification_metrics(apply_temperature(_combined_logits(logits, None, None),
                                                                record["ensemble"], kind="logits"), labels)}
    sel = record.get("selection")
    if team is not None and sel and sel["selected"] == [ens.members[i]["name"] for i in team] \
            and sel.get("weights") == weights:
        out["selection"] = classification_metrics(apply_temperature(_combined_logits(logits, team, weights),
                                                                    sel["temperature"], kind="logits"), labels)
        out["temperatures"]["selection"] = sel["temperature"]
    return out


def _team(ens: EnsembleDir) -> tuple[list[int] | None, list[float] | None]:
    selection = ens.selection_indices()
    return selection if selection is not None else (None, None)


def evaluate_directory(path: str | os.PathLike, data: Dataset, *, split: str = "test",
                       corruptions: bool = False, plot_dir: str | os.PathLike | None = None,
                       device: str = "auto", data_dir: str | os.PathLike | None = None,
                       calibration: bool = True, dee: str | os.PathLike | None = None,
                       ood: Dataset | None = None) -> dict[str, Any]:
    """Metrics of every member, the whole ensemble and the recorded selection (if any).

    Writes ``metrics.json`` beside the manifest. ``"all"`` holds the raw metrics; with
    ``calibration`` and temperatures in the manifest, ``"calibrated"`` holds them after
    temperature scaling. Also: ``"selective"`` (AURC), ``"cost"``; with ``dee`` (a directory of
    independently trained models on the same data) the Deep Ensemble Equivalent; with ``ood``
    (another dataset of the same image shape) out-of-distribution detection scores; with
    ``corruptions`` every on-the-fly corruption at severities 1-5 (ensemble and mean-member
    accuracy, NLL, ECE).
    """
    from pat.ensemble.cost import directory_cost
    from pat.ensemble.selective import selective_report

    ens = EnsembleDir.load(path)
    check(len(ens) > 0, f"ENSEMBLE_DIR {str(ens.path)!r} holds no members.")
    record = ens.calibration() if calibration else None
    logits, labels = directory_logits(ens, data, split, device=device)
    probs = logits.softmax(-1)
    report: dict[str, Any] = {"dataset": data.name, "split": split,
                              "names": [m["name"] for m in ens.members], "all": evaluate(probs, labels)}
    team, weights = _team(ens)
    if team is not None:
        report["selection"] = {"method": ens.manifest["selection"]["method"],
                               **evaluate(probs, labels, selected=team, weights=weights, combiner="weighted")}
    if record is not None:
        report["calibrated"] = _calibrated(ens, record, logits, labels, team, weights)
    temps = member_temperatures(ens) if record is not None else torch.ones(len(ens))
    scaled = logits / temps[:, None, None]
    report["selective"] = selective_report(scaled.softmax(-1), labels)
    report["cost"] = directory_cost(ens)
    if dee is not None:
        report["dee"] = _dee(ens, data, Path(dee), device, team, weights)
    if ood is not None:
        report["ood"] = _ood(ens, data, ood, scaled, temps, device)
    if corruptions:
        report["corruption_source"] = "published" if published_corruptions(data, data_dir) else "on-the-fly"
        report["corruptions"] = _corruption_table(ens, data, split, device, team, weights, data_dir)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(ens.path / "metrics.json", lambda f: f.write(text.encode()))
    if plot_dir is not None:
        _plots(scaled.softmax(-1), labels, Path(plot_dir))
    return report


def _dee(ens: EnsembleDir, data: Dataset, ref_path: Path, device: str,
         team: list[int] | None, weights: list[float] | None) -> dict[str, Any]:
    """DEE of the whole ensemble (and the team) against a reference pool of independent models.

    Every calibrated NLL here is on test with a temperature fitted on validation, for the
    reference ensembles and for this one alike, so the comparison is like for like.
    """
    from pat.ensemble.calibration import calibrated_nll

    check(len(data.val.y) > 0, f"--dataset {data.name!r} has no validation split to calibrate on for --dee.")
    ref = EnsembleDir.load(ref_path, argument="--dee")
    check(len(ref) > 0, f"--dee {str(ref_path)!r} holds no members.")
    check(ref.path.resolve() != ens.path.resolve(), f"--dee {str(ref_path)!r} is the ensemble itself; "
                                                    "give a directory of independently trained models.")
    recorded = (ref.manifest.get("data") or {}).get("dataset") or ref.manifest.get("dataset")
    check(recorded in (None, data.name), f"--dee {str(ref_path)!r} holds models of {recorded!r}, "
                                         f"not of the ensemble's dataset {data.name!r}.")
    _check_classes(ref, data)
    ref_val, ref_val_y = directory_probs(ref, data, "val", device=device)
    ref_test, ref_test_y = directory_probs(ref, data, "test", device=device)
    curve = size_curve(ref_val, ref_val_y, ref_test, ref_test_y)
    val, val_y = directory_logits(ens, data, "val", device=device)
    test, test_y = directory_logits(ens, data, "test", device=device)
    out: dict[str, Any] = {"reference": str(ref_path), "reference_curve": curve.tolist()}
    for key, t, w in [("all", None, None)] + ([("selection", team, weights)] if team is not None else []):
        nll = calibrated_nll(_combined_logits(val, t, w).softmax(-1), val_y,
                             _combined_logits(test, t, w).softmax(-1), test_y)
        value, bound = deep_ensemble_equivalent(nll, curve)
        out[key] = {"calibrated_nll": nll, "dee": value, "bound": bound}
    return out


def _ood(ens: EnsembleDir, data: Dataset, ood: Dataset, scaled_in: Tensor, temps: Tensor, device: str) -> dict[str, Any]:
    """OOD detection of ``ood``'s test images against ``data``'s test split.

    Scores are given per member and for the ensemble, with temperatures applied where the
    manifest has them.
    """
    from pat.ensemble.ood import ood_report

    shape_in, shape_out = (data.in_channels, data.image_size), (ood.in_channels, ood.image_size)
    if shape_in != shape_out:
        raise PatError(f"--ood {ood.name!r} has {shape_out[0]}-channel {shape_out[1]}x{shape_out[1]} images but "
                       f"{data.name!r} has {shape_in[0]}-channel {shape_in[1]}x{shape_in[1]}; the members cannot "
                       "read them.")
    check(ood.name != data.name, f"--ood {ood.name!r} is the in-distribution dataset itself.")
    logits_out, _ = directory_logits(ens, data, "test", device=device, images=ood)
    return {"dataset": ood.name, "size": logits_out.shape[1],
            **ood_report(scaled_in, logits_out / temps[:, None, None])}


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
    from pat.ensemble.selective import risk_coverage

    plots.reliability_diagram(combine(probs), labels, out / "reliability.png")
    curves = {f"member {i}": risk_coverage(p, labels) for i, p in enumerate(probs)}
    plots.risk_coverage_plot({**curves, "ensemble": risk_coverage(combine(probs), labels)},
                             out / "risk_coverage.png")
    plots.accuracy_vs_size_plot(accuracy_vs_size(probs, labels), out / "accuracy_vs_size.png")
    plots.disagreement_heatmap(pairwise_disagreement(probs), out / "disagreement.png")


@writes_directory
def select_directory(path: str | os.PathLike, data: Dataset, method: str, *, size: int | None = None,
                     device: str = "auto", **options: Any) -> dict[str, Any]:
    """Fit a selector on the validation split and record the team and weights in the manifest."""
    ens = EnsembleDir.load(path)
    check(len(data.val.y) > 0, f"--dataset {data.name!r} has no validation split; selection never uses test.")
    check(size is not None or method not in SIZE_REQUIRED,
          f"selection method {method!r} needs a team size (size; --size on the command line). Got none.")
    check(size is None or 1 <= size <= len(ens),
          f"size (--size on the command line) must be between 1 and the pool size {len(ens)}. Got {size}.")
    if size is not None and method in SIZE_ARGUMENT:
        options[SIZE_ARGUMENT[method]] = size
    selector = create_selector(method, **options)
    record = ens.calibration()
    raw, labels = directory_logits(ens, data, "val", device=device)
    # members are chosen as they would be used alone: each at its own temperature
    probs = (raw / member_temperatures(ens)[:, None, None] if record is not None else raw).softmax(-1)
    selector.fit(probs, labels)
    weights = selector.weights_.tolist()
    ens.record_selection(method, selector.selected_, weights, options=dict(options))
    if record is not None:
        record["selection"] = _team_temperature(raw, labels, selector.selected_, weights, ens)
    ens.save()
    val = evaluate(probs, labels, selected=selector.selected_, weights=weights, combiner="weighted")
    return {"selected": [ens.members[i]["name"] for i in selector.selected_], "weights": weights,
            "val": val["ensemble"], "val_all": evaluate(probs, labels)["ensemble"]}


def _check_same_channels(ens: EnsembleDir) -> None:
    """Refuse members physically slimmed to different channels.

    Position i of one such member's weight is not position i of another's, so averaging them
    is meaningless even when shapes agree.
    """
    from pat.ensemble.members import member_kept

    kept = {m["name"]: member_kept(ens, m) for m in ens.members}
    if len({json.dumps(k, sort_keys=True) for k in kept.values()}) > 1:
        slim = [n for n, k in kept.items() if k]
        raise PatError(f"members {slim} are physically pruned with different channels kept; their "
                       "weights cannot be averaged into a soup (use masked children).")


def soup_directory(path: str | os.PathLike, data: Dataset, out: str | os.PathLike, *, greedy: bool = False,
                   force: bool = False, device: str = "auto") -> dict[str, Any]:
    """Average the members' weights into a soup and save it as an ordinary checkpoint.

    The average is uniform, or greedy on validation accuracy; the soup's BatchNorm
    statistics are recomputed on training data.
    """
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
               image_shape=ens.manifest.get("image_shape") or [int(v) for v in data.train.x.shape[1:]],
               soup={"greedy": greedy, "ingredients": ingredients, "source": str(Path(path).resolve())})
    return {"ingredients": ingredients, "metrics": metrics, "accuracy": accuracy(probs[0], labels)}
