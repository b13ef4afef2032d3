"""Datasets as three resident uint8 splits, a registry of them by name, and bagging.

A :class:`Dataset` holds raw uint8 images (N, C, H, W) for train / val / test plus what a
loader needs to augment and normalise them. Every registered dataset is built by
:func:`load_dataset`; the CLI lists the choices with :func:`list_datasets`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from pat.data.loader import DeviceLoader, resolve_device, seeded_generator
from pat.errors import PatError, check
from pat.registry import Registry

__all__ = [
    "Split",
    "Dataset",
    "Recipe",
    "register_dataset",
    "dataset_recipe",
    "list_datasets",
    "load_dataset",
    "bagging_indices",
    "stratified_split",
    "make_dataset",
]

SplitName = Literal["train", "val", "test"]


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: compare by identity
class Split:
    """One split: ``x`` (N, C, H, W) uint8 raw images in [0, 255], ``y`` (N,) int64 labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: compare by identity
class Dataset:
    """Three splits and how to feed them to a model.

    ``val`` is carved from the training data (seeded), never from ``test``. ``mean`` and
    ``std`` are per channel on the [0, 1] scale, measured on ``train``. ``crop_padding``
    and ``flip`` set the training augmentation (no flip for digits: a flipped digit is
    another symbol).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True
    # (split, device) -> (x, y) already on that device, so M loaders share one copy.
    _resident: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample as the model takes it: ``(C, H, W)``."""
        return tuple(self.train.x.shape[1:])

    def split(self, name: SplitName) -> Split:
        """The split called ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        check(
            name in ("train", "val", "test"),
            f"split must be one of train, val, test. Got {name!r}.",
        )
        return getattr(self, name)

    def loader(
        self,
        split: SplitName = "train",
        *,
        batch_size: int = 128,
        shuffle: bool | None = None,
        augment: bool | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        indices: Tensor | None = None,
        drop_last: bool = False,
    ) -> DeviceLoader:
        """A :class:`DeviceLoader` over ``split``; shuffle and augment default to on for train only."""
        part = self.split(split)
        dev = resolve_device(device, part.x.device)
        key = (split, str(dev))
        if key not in self._resident:
            self._resident[key] = (part.x.to(dev), part.y.to(dev))
        x, y = self._resident[key]
        is_train = split == "train"
        return DeviceLoader(
            x, y, mean=self.mean, std=self.std, batch_size=batch_size,
            shuffle=is_train if shuffle is None else shuffle,
            augment=is_train if augment is None else augment,
            crop_padding=self.crop_padding, flip=self.flip, device=dev, seed=seed,
            indices=indices, drop_last=drop_last,
        )  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """Recommended settings for training a model from scratch on one dataset.

    What the CLI uses when the user gives none (``pat train``; ``batch_size`` also for
    ``pat tune``); a field left None falls back to pat's global default (the paper's CIFAR
    recipe: batch 128, SGD LR 0.1, 10 epochs).
    """

    batch_size: int | None = None  # samples per optimizer step
    lr: float | None = None  # SGD (Nesterov) base LR per batch of batch_size, parent schedule
    epochs: int | None = None
    note: str = ""  # where the numbers come from

    def as_dict(self) -> dict[str, int | float]:
        """The fields that are set, by name."""
        return {k: v for k, v in (("batch_size", self.batch_size), ("lr", self.lr), ("epochs", self.epochs))
                if v is not None}


# name -> builder(data_dir, val_fraction, seed, download, **options) -> Dataset
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
_RECIPES: dict[str, Recipe] = {}
_COMMON = {"data_dir", "val_fraction", "seed", "download"}


def register_dataset(
    name: str, *, recipe: Recipe | None = None
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: register a builder under ``name``, with its recommended training ``recipe``.

    A name ending in ``:PATH`` (``folder:PATH``) takes an argument after the colon; its
    builder receives it as ``path``.
    """

    def decorate(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        DATASETS.add(name, builder)
        _RECIPES[name] = recipe or Recipe()
        return builder

    return decorate


def dataset_recipe(name: str) -> Recipe:
    """The recommended training settings of dataset ``name`` (an empty :class:`Recipe` if none)."""
    key, _, arg = name.partition(":")
    key = key.strip().lower() + (":PATH" if arg else "")
    return _RECIPES.get(key, Recipe())


def list_datasets() -> list[str]:
    """Registered dataset names, in registration order (``folder:PATH`` as written)."""
    return DATASETS.names()


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    **kwargs: object,
) -> Dataset:
    """Build the dataset ``name`` (see :func:`list_datasets`).

    Args:
        name: a registered name, or ``folder:PATH`` for an ImageFolder tree.
        data_dir: where downloadable sets are stored and fetched to; default ``./data``.
        val_fraction: share of the training data held out as ``val``, in [0, 1).
        seed: seed of the validation carve (and of synthetic data).
        download: fetch a missing torchvision set.
        **kwargs: options of that dataset (e.g. ``train_size`` for ``synthetic``).
    """
    check(0.0 <= val_fraction < 1.0, f"val_fraction must be in [0, 1). Got {val_fraction}.")
    key, builder, options = _builder(name, kwargs)
    unknown = sorted(set(kwargs) - options)
    if unknown:
        takes = ", ".join(sorted(options - {"path"})) or "none"
        raise PatError(f"dataset {key!r} has no option {unknown[0]!r}; its options: {takes}.")
    data_dir = Path("./data") if data_dir is None else Path(data_dir)
    return builder(
        data_dir=data_dir, val_fraction=val_fraction, seed=seed, download=download, **kwargs
    )


def _builder(name: str, kwargs: dict[str, object]) -> tuple[str, Callable[..., Dataset], set[str]]:
    """Registry key, builder and option names of ``name`` (``folder:PATH`` puts PATH in kwargs)."""
    key, _, arg = name.partition(":")
    key = key.strip().lower()
    if arg:
        key += ":PATH"
        kwargs["path"] = arg
    if key not in DATASETS:
        raise DATASETS.unknown(name)
    builder = DATASETS.get(key)
    return key, builder, set(inspect.signature(builder).parameters) - _COMMON


def load_dataset_like(name: str, like: Dataset, **kwargs: object) -> Dataset:
    """:func:`load_dataset` ``name``, shaped like ``like`` where its builder can be.

    A dataset with ``in_channels`` / ``image_size`` / ``num_classes`` options (``synthetic``)
    takes ``like``'s values unless ``kwargs`` sets them. For out-of-distribution test images.
    """
    _, _, options = _builder(name, {})
    shape = {"in_channels": like.in_channels, "image_size": like.image_size, "num_classes": like.num_classes}
    return load_dataset(name, **{k: v for k, v in shape.items() if k in options}, **kwargs)


def bagging_indices(n: int, fraction: float, *, seed: int, member: int) -> Tensor:
    """Sorted indices of a random ``round(fraction * n)`` subset, drawn without replacement.

    Bagging for ensemble members (Breiman, 1996, "Bagging predictors"; here without
    replacement, as the PAT paper tunes each child on its own 90% of the data). A pure
    function of ``(seed, member)``: member ``m`` of a rerun gets the same subset.

    Returns:
        (round(fraction * n),) int64, ascending.
    """
    check(n >= 1, f"n must be >= 1. Got {n}.")
    check(0.0 < fraction <= 1.0, f"bagging fraction must be in (0, 1]. Got {fraction}.")
    size = max(1, round(fraction * n))
    perm = torch.randperm(n, generator=seeded_generator(seed, member, 0xBA6))
    return perm[:size].sort().values


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices of ``y`` into (kept, taken), taking ``round(fraction * n_c)`` of each class c.

    Stratified so that a small validation split still has every class in proportion.

    Returns:
        two sorted int64 index tensors, disjoint, together covering ``range(len(y))``.
    """
    gen = seeded_generator(seed, 0x5A1)
    taken = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        count = round(fraction * len(members))
        taken.append(members[torch.randperm(len(members), generator=gen)[:count]])
    take = torch.cat(taken).sort().values if taken else torch.empty(0, dtype=torch.int64)
    keep_mask = torch.ones(len(y), dtype=torch.bool)
    keep_mask[take] = False
    return torch.nonzero(keep_mask).flatten(), take


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale.

    Summed in float64 chunks: a float copy of a whole training set would need 8x its memory.
    """
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = total / count
    std = (
        (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    )  # a blank set must not divide by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def make_dataset(
    name: str,
    train: Split,
    test: Split,
    *,
    val_fraction: float,
    seed: int,
    num_classes: int,
    crop_padding: int = 4,
    flip: bool = True,
) -> Dataset:
    """Carve a stratified, seeded ``val`` from ``train`` and measure normalisation on the rest."""
    keep, take = stratified_split(train.y, val_fraction, seed)
    val = Split(train.x[take], train.y[take])
    train = Split(train.x[keep], train.y[keep])
    mean, std = channel_stats(train.x)
    return Dataset(
        name=name, train=train, val=val, test=test, num_classes=num_classes,
        in_channels=train.x.shape[1], image_size=train.x.shape[-1], mean=mean, std=std,
        crop_padding=crop_padding, flip=flip,
    )  # fmt: skip
