"""Options shared by several commands, so each is spelled and validated once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def data_options(func: F | None = None, *, from_manifest: bool = False) -> F:
    """--dataset, --data-dir, --batch-size, --val-fraction, --data-seed.

    With ``from_manifest`` (commands that work on an ensemble directory) ``--dataset``
    defaults to the dataset the directory records, never to another one.
    """
    if func is None:
        return lambda f: data_options(f, from_manifest=from_manifest)  # type: ignore[return-value]
    dataset = (click.option("--dataset", default=None, help="Dataset [default: the one recorded in the manifest].")
               if from_manifest else
               click.option("--dataset", default="digits", help="Dataset name (see docs/data.md); digits needs no download."))
    for deco in reversed([
        dataset,
        click.option("--data-dir", default="./data", type=click.Path(file_okay=False), help="Where downloadable datasets live."),
        click.option("--batch-size", default=128, type=int, help="Samples per optimizer step."),
        click.option("--val-fraction", default=0.1, type=float, help="Share of training data held out for validation."),
        click.option("--data-seed", default=0, type=int, help="Seed of the validation split and shuffling."),
    ]):
        func = deco(func)
    return func


def manifest_dataset(ensemble_dir: str, dataset: str | None, *, argument: str = "ENSEMBLE_DIR") -> str:
    """The dataset named on the command line, else the one the ensemble directory records."""
    from pat.ensemble.store import EnsembleDir
    from pat.errors import PatError

    name = dataset or EnsembleDir.load(ensemble_dir, argument=argument).manifest.get("dataset")
    if name is None:
        raise PatError(f"{argument} {ensemble_dir!r} records no dataset; pass --dataset.")
    return name


def device_options(func: F) -> F:
    """--device, --amp/--no-amp."""
    func = click.option("--amp/--no-amp", default=None, help="bf16 autocast (default: on for CUDA only).")(func)
    func = click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")(func)
    return func


def force_option(func: F) -> F:
    return click.option("--force", is_flag=True, help="Overwrite an existing output.")(func)


def lock_options(directory: str | None = None) -> Callable[[F], F]:
    """--wait; the command runs in a :func:`pat.ensemble.lock.lock_scope`.

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
            from pat.ensemble.lock import acquire, lock_scope

            with lock_scope(wait=wait):
                target = kwargs.get(directory) if directory else None
                if target is not None and Path(target).is_dir() and os.environ.get("RANK", "0") == "0":
                    acquire(target, argument=directory.upper())
                return func(*args, **kwargs)

        option = click.option("--wait", is_flag=True,
                              help="If another pat command is writing the directory, wait for it instead of refusing.")
        return option(wrapper)  # type: ignore[return-value]

    return decorate
