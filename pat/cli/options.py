"""Options shared by several commands, so each is spelled, defaulted and validated once.

Data options default to None so that "not given" can be told apart from a value: a
command that reads an ensemble directory then takes the data the directory records
(:func:`resolve_data`), and ``--batch-size`` falls back to the dataset's recipe
(:func:`pat.data.dataset_recipe`) before pat's global default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import click

F = Callable[..., Any]

# what "not given" means where nothing is recorded: today's defaults, so old manifests read as before
DATA_DEFAULTS: dict[str, Any] = {"dataset": "digits", "data_dir": "./data", "val_fraction": 0.1, "seed": 0}
DATA_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "val_fraction": "--val-fraction",
              "seed": "--data-seed"}
BATCH_SIZE = 128  # global default when neither the user nor the dataset's recipe sets one
OVERRIDE_FLAG = "--override-data"


def data_options(func: F | None = None, *, from_manifest: bool = False, resumes: bool = False,
                 batch_size: bool = True) -> F:
    """--dataset, --data-dir, [--batch-size,] --val-fraction, --data-seed (all default None).

    With ``from_manifest`` (commands that work on an ensemble directory) every one of them
    defaults to what the directory records, never to another value; with ``resumes`` (the
    producers) to what ``--out`` records when a rerun continues it.
    """
    if func is None:
        return lambda f: data_options(f, from_manifest=from_manifest, resumes=resumes,  # type: ignore[return-value]
                                      batch_size=batch_size)
    pre = ("the one recorded in the ensemble directory, else " if from_manifest else
           "the one --out records when this continues it, else " if resumes else "")
    batch = (f"the one --out records when this continues it, else {BATCH_SIZE}" if resumes else
             f"the dataset's recipe, else {BATCH_SIZE}")
    decos = [
        click.option("--dataset", default=None, show_default=False,
                     help="Dataset name (see docs/data.md) [default: "
                          + ("the one recorded in the ensemble directory]." if from_manifest else
                             f"{pre}digits, which needs no download].")),
        click.option("--data-dir", default=None, show_default=False, type=click.Path(file_okay=False),
                     help=f"Where downloadable datasets live [default: {pre}./data]."),
        click.option("--val-fraction", default=None, show_default=False, type=float,
                     help=f"Share of training data held out for validation [default: {pre}0.1]."),
        click.option("--data-seed", default=None, show_default=False, type=int,
                     help=f"Seed of the validation split and shuffling [default: {pre}0]."),
    ]
    if batch_size:
        decos.insert(2, click.option("--batch-size", default=None, show_default=False, type=int,
                                     help=f"Samples per optimizer step [default: {batch}]."))
    for deco in reversed(decos):
        func = deco(func)
    return func


def override_option(func: F) -> F:
    """--override-data: use the data options given over those the ensemble directory records."""
    return click.option(OVERRIDE_FLAG, "override_data", is_flag=True,
                        help="Use the data options given even where they differ from the ones the ensemble "
                             "directory records (the members were trained on those).")(func)


def recorded_data(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The data an ensemble manifest records: dataset, data_dir, val_fraction, seed (and batch_size).

    Manifests written before the ``data`` record fall back to the producer's saved data config,
    then to the top-level ``dataset``; a key recorded nowhere is None (and
    :func:`resolve_data` then uses :data:`DATA_DEFAULTS`, what such a directory was made with).
    """
    config = manifest.get("config") or {}
    producer = config.get(config.get("producer") or "", {})
    saved = (producer.get("data") if isinstance(producer, dict) else None) or {}
    record = {**saved, **(manifest.get("data") or {})}
    out = {k: record.get(k) for k in (*DATA_FLAGS, "batch_size")}
    if out["dataset"] is None:
        out["dataset"] = manifest.get("dataset")
    return out


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "val_fraction":
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-12)
    if key == "dataset":
        return str(a).strip().lower() == str(b).strip().lower()
    return a == b


def resolve_data(given: Mapping[str, Any], recorded: Mapping[str, Any] | None, *, where: str,
                 override: bool, remedy: str = f"pass {OVERRIDE_FLAG} to use it") -> dict[str, Any]:
    """Merge data options given on the command line (None = not given) with recorded ones.

    A value not given is the recorded one, else :data:`DATA_DEFAULTS`. A given value that
    differs from the recorded one is refused with one line naming the option, both values and
    the ``remedy`` — unless ``override``. ``data_dir`` is a location, not part of what the data is,
    so a given one is taken without comparison.

    Raises:
        PatError: a conflicting value, or no dataset given and none recorded.
    """
    from pat.errors import PatError

    recorded = recorded or {}
    out: dict[str, Any] = {}
    for key, option in DATA_FLAGS.items():
        value, old = given.get(key), recorded.get(key)
        if value is not None and old is not None and key != "data_dir" and not override \
                and not _same(key, value, old):
            raise PatError(f"{option} {value!r} conflicts with {old!r} recorded in {where}; leave it out to "
                           f"use the recorded one, or {remedy}.")
        # a directory that names no dataset gets none: guessing one is how children were ruined
        fallback = None if key == "dataset" else DATA_DEFAULTS[key]
        out[key] = value if value is not None else old if old is not None else fallback
    if out["dataset"] is None:
        raise PatError(f"{where} records no dataset; pass --dataset.")
    return out


def check_shape(data: Any, manifest: Mapping[str, Any], *, where: str) -> None:
    """Refuse a dataset whose classes, channels or image size differ from what the members take.

    Reads ``image_shape`` ([C, H, W]) and ``num_classes`` from the manifest (or a checkpoint,
    which records the same keys), the channel count of older files from the architecture spec.
    No flag overrides it: such members cannot run on such data.
    """
    from pat.errors import PatError

    arch = manifest.get("arch") or {}
    shape = manifest.get("image_shape") or []
    classes = manifest.get("num_classes") or (arch.get("kwargs") or {}).get("num_classes")
    channels = shape[0] if shape else (arch.get("kwargs") or {}).get("in_channels")
    size = list(shape[1:]) or None
    name = f"--dataset {data.name!r}"
    if classes is not None and classes != data.num_classes:
        raise PatError(f"{name} has {data.num_classes} classes but the members of {where} predict {classes}.")
    if channels is not None and channels != data.in_channels:
        raise PatError(f"{name} has {data.in_channels}-channel images but the members of {where} take "
                       f"{channels}-channel ones.")
    if size is not None and size != [data.image_size, data.image_size]:
        raise PatError(f"{name} has {data.image_size}x{data.image_size} images but the members of {where} take "
                       f"{'x'.join(map(str, size))}.")


def ensemble_data(ensemble_dir: str, *, dataset: str | None, data_dir: str | None, val_fraction: float | None,
                  data_seed: int | None, override: bool = False,
                  argument: str = "ENSEMBLE_DIR") -> tuple[dict[str, Any], Any]:
    """The data options and dataset of a command that reads ``ensemble_dir``.

    Options not given are the ones the manifest records (:func:`resolve_data`); the loaded
    dataset is checked against the members' recorded classes and input shape
    (:func:`check_shape`). Returns ``(values, dataset)``: values holds dataset, data_dir,
    val_fraction and seed.
    """
    from pat.data import load_dataset
    from pat.store import MANIFEST, EnsembleDir

    ens = EnsembleDir.load(ensemble_dir, argument=argument)
    where = f"{argument} {str(ens.path / MANIFEST)!r}"
    given = {"dataset": dataset, "data_dir": data_dir, "val_fraction": val_fraction, "seed": data_seed}
    values = resolve_data(given, recorded_data(ens.manifest), where=where, override=override)
    data = load_dataset(values["dataset"], data_dir=values["data_dir"], val_fraction=values["val_fraction"],
                        seed=values["seed"])
    check_shape(data, ens.manifest, where=f"{argument} {ensemble_dir!r}")
    return values, data


def producer_data(out: str, producer: str, *, dataset: str | None, data_dir: str | None,
                  batch_size: int | None, val_fraction: float | None, data_seed: int | None,
                  force: bool) -> dict[str, Any]:
    """Data options of a producer writing ``out``: a rerun that continues it takes the recorded ones.

    When ``out`` holds an ensemble of the same ``producer`` (and no ``force``), options not
    given are the recorded ones (batch size included) and a conflicting one is refused by
    name; otherwise the given ones, else the defaults (batch size :data:`BATCH_SIZE`: a
    producer keeps its method's own recipe). Returns DataConfig fields (``seed`` is the data seed).
    """
    import json
    from pathlib import Path

    from pat.store import MANIFEST

    given = {"dataset": dataset, "data_dir": data_dir, "val_fraction": val_fraction, "seed": data_seed}
    file = Path(out) / MANIFEST
    recorded = None
    if file.is_file() and not force:
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None  # the producer refuses it with its own message
        if isinstance(manifest, dict) and (manifest.get("config") or {}).get("producer") == producer:
            recorded = recorded_data(manifest)
    if recorded is None:
        values = plain_data(dataset, data_dir, val_fraction, data_seed)
        return {**values, "batch_size": batch_size if batch_size is not None else BATCH_SIZE}
    values = resolve_data(given, recorded, where=f"--out {str(file)!r}", override=False,
                          remedy="pass --force to replace the ensemble with members trained on it")
    batch = batch_size if batch_size is not None else recorded.get("batch_size") or BATCH_SIZE
    return {**values, "batch_size": batch}


def plain_data(dataset: str | None, data_dir: str | None, val_fraction: float | None,
               data_seed: int | None) -> dict[str, Any]:
    """Data options of a command that starts from nothing recorded: the given ones, else the defaults."""
    given = {"dataset": dataset, "data_dir": data_dir, "val_fraction": val_fraction, "seed": data_seed}
    return {k: v if v is not None else DATA_DEFAULTS[k] for k, v in given.items()}


def recipe_settings(dataset: str, given: Mapping[str, Any], defaults: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """Training settings: each one given, else the dataset's recipe, else pat's global default.

    Args:
        dataset: whose :func:`pat.data.dataset_recipe` applies.
        given: option values from the command line by recipe field (None = not given); only
            the fields listed here are resolved (a command that has no LR passes none).
        defaults: pat's global default of each field.

    Returns:
        ``(values, sources)``: sources says, per field, ``"given"``, ``"<dataset> recipe"`` or
        ``"default"`` (for the run's header).
    """
    from pat.data import dataset_recipe

    recipe = dataset_recipe(dataset).as_dict()
    values, sources = {}, {}
    for key, value in given.items():
        if value is not None:
            values[key], sources[key] = value, "given"
        elif key in recipe:
            values[key], sources[key] = recipe[key], f"{dataset} recipe"
        else:
            values[key], sources[key] = defaults[key], "default"
    return values, sources


def describe_settings(values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """``batch 32 (digits recipe), lr 0.03 (digits recipe), epochs 10 (given)``."""
    label = {"batch_size": "batch {}", "lr": "lr {:g}", "epochs": "epochs {}"}
    return ", ".join(f"{label[k].format(values[k])} ({sources[k]})" for k in values)


def device_options(func: F) -> F:
    """--device, --amp/--no-amp."""
    func = click.option("--amp/--no-amp", default=None, help="bf16 autocast (default: on for CUDA only).")(func)
    func = click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")(func)
    return func


def recompute_bn_option(func: F) -> F:
    """--recompute-bn/--keep-bn: a model's BatchNorm statistics once its training ends."""
    return click.option("--recompute-bn/--keep-bn", default=True,
                        help="Recompute BatchNorm statistics on the unaugmented training split when training "
                             "ends.")(func)


def force_option(func: F) -> F:
    """--force: overwrite an existing output."""
    return click.option("--force", is_flag=True, help="Overwrite an existing output.")(func)


def lock_options(directory: str | None = None) -> Callable[[F], F]:
    """--wait; the command runs in a :func:`pat.lock.lock_scope`.

    A command that writes an ensemble directory holds its lock (``ensemble.lock``): a second
    writer is refused naming the holder, or with ``--wait`` queues behind it. ``directory``
    names the command's parameter holding an existing directory to lock before any work (tune,
    select, calibrate); commands that create their directory (split, the producers) are locked
    by the library once their input is validated. Every lock is given back when the command
    ends, however it ends.
    """
    import functools
    import os
    from pathlib import Path

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, wait: bool, **kwargs: Any) -> Any:
            from pat.lock import acquire, lock_scope

            with lock_scope(wait=wait):
                target = kwargs.get(directory) if directory else None
                if target is not None and Path(target).is_dir() and os.environ.get("RANK", "0") == "0":
                    acquire(target, argument=directory.upper())
                return func(*args, **kwargs)

        option = click.option("--wait", is_flag=True,
                              help="If another pat command is writing the directory, wait for it instead of refusing.")
        return option(wrapper)  # type: ignore[return-value]

    return decorate
