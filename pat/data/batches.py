"""Data given as batches: any ``torch.utils.data.DataLoader`` (or re-iterable of ``(x, y)``).

:func:`pat.tune` and the producers' in-memory API read their data through the few methods a
:class:`pat.data.Dataset` has (``loader``, ``split``, ``sample_shape``, ``num_classes``).
:class:`BatchData` gives them the same over batches that someone else makes, already
transformed: pat moves each batch to the device and feeds it as it comes. So a child or
member sees the loader's own batch size, order and augmentation; what pat cannot do to
batches it did not make is refused in one line rather than done differently (a bagged subset
per child, SharpBalance's per-sample scores).

Each member still reads its own order: a loader that shuffles with torch's global generator
(a ``DataLoader`` with ``shuffle=True`` and no ``generator``) is started, for every member
and epoch, under a seed derived from both (the global stream outside is left as it was).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from pat.data.loader import resolve_device
from pat.errors import PatError, check

__all__ = ["BatchData", "BatchSplit", "as_data"]

Batches = Iterable[tuple[Tensor, Tensor]]


class BatchSplit:
    """One split as batches; ``len()`` is its number of samples (counted once if need be)."""

    def __init__(self, batches: Batches | None) -> None:
        self.batches = batches
        self._size: int | None = 0 if batches is None else None

    def __len__(self) -> int:
        if self._size is None:
            dataset = getattr(self.batches, "dataset", None)
            sampler = getattr(self.batches, "sampler", None)
            if dataset is not None and hasattr(dataset, "__len__") and not getattr(self.batches, "drop_last", False) \
                    and hasattr(sampler, "__len__"):
                self._size = len(sampler)  # a DataLoader knows it without loading anything
            else:
                self._size = sum(len(y) for _, y in self.batches)  # type: ignore[union-attr]
        return self._size


class _OnDevice:
    """``batches`` moved to ``device``, started under a seed of (member, epoch)."""

    def __init__(self, batches: Batches, device: torch.device, seed: int) -> None:
        self.batches, self.device, self.seed, self.epoch = batches, device, seed, 0

    def __len__(self) -> int:
        try:
            return len(self.batches)  # type: ignore[arg-type]
        except TypeError:
            raise PatError(f"batches of type {type(self.batches).__name__} have no length; pat needs the "
                           "number of batches per epoch for its schedules (a DataLoader has one).") from None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # a DataLoader draws its shuffle (and its workers' base seed) from torch's global
        # generator when it starts: seed that per member and epoch, and leave the stream as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.epoch)
            batches = iter(self.batches)
            first = next(batches, None)
        if first is None:
            return
        for x, y in _chain(first, batches):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True).long()


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


class BatchData:
    """Training (and optional validation and test) batches, read as pat reads a Dataset.

    Args:
        train: the training batches ``(x (B, ...), y (B,))``, re-iterable, with a length
            (a ``DataLoader``).
        val: batches to report on after every epoch and to compare members on, if any.
        test: batches for the final test metrics, if any.
        num_classes: the number of classes; default the largest training label + 1 (one
            pass over the training batches).
        name: how messages name this data.
    """

    def __init__(self, train: Batches, val: Batches | None = None, test: Batches | None = None, *,
                 num_classes: int | None = None, name: str = "batches") -> None:
        check(train is not None, "train batches must be given. Got None.")
        self.name = name
        self.train, self.val, self.test = BatchSplit(train), BatchSplit(val), BatchSplit(test)
        x, _ = next(iter(train), (None, None))
        check(isinstance(x, Tensor), f"train batches must yield (x, y) tensor pairs. Got {type(x).__name__}.")
        self.sample_shape = tuple(x.shape[1:])
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        """The number of classes (given, or the largest training label + 1)."""
        if self._num_classes is None:
            self._num_classes = 1 + max(int(y.max()) for _, y in self.train.batches)  # type: ignore[union-attr]
        return self._num_classes

    @property
    def in_channels(self) -> int:
        """The channels of one sample: its first dimension."""
        return self.sample_shape[0]

    @property
    def image_size(self) -> int:
        """The last dimension of one sample."""
        return self.sample_shape[-1]

    def split(self, name: str) -> BatchSplit:
        """The split called ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        check(name in ("train", "val", "test"), f"split must be one of train, val, test. Got {name!r}.")
        return getattr(self, name)

    def loader(self, split: str = "train", *, batch_size: int = 128, shuffle: bool | None = None,
               augment: bool | None = None, device: torch.device | str | None = None, seed: int = 0,
               indices: Tensor | None = None, drop_last: bool = False) -> _OnDevice:
        """``split``'s batches on ``device``, in the order its loader gives them under ``seed``.

        ``batch_size``, ``shuffle``, ``augment`` and ``drop_last`` are the loader's own business
        and are not changed; ``indices`` (a subset) cannot be taken from batches.

        Raises:
            PatError: ``indices`` given (bagging), or a split that was not given.
        """
        if indices is not None:
            raise PatError("bagging draws a subset of samples per child, which pat cannot take from batches "
                           "it did not make; tune with bagging=None, or load the data as a pat Dataset.")
        part = self.split(split)
        check(part.batches is not None, f"{self.name!r} has no {split} batches.")
        return _OnDevice(part.batches, resolve_device(device, torch.device("cpu")), seed)


def as_data(data: Any, *, val: Batches | None = None, test: Batches | None = None) -> Any:
    """``data`` as pat reads it: a ``Dataset`` or ``BatchData`` as it is, training batches wrapped.

    Raises:
        PatError: ``val`` or ``test`` given with a ``Dataset`` or ``BatchData``, which have their own;
            ``data`` that is none of these (a dataset's name, say).
    """
    from pat.data.core import Dataset

    if isinstance(data, (Dataset, BatchData)):
        check(val is None and test is None, f"val and test batches go with training batches, not with {data.name!r}, "
              "which has its own splits.")
        return data
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        hint = f"; pat.load_dataset({data!r}) loads one by name" if isinstance(data, str) else ""
        raise PatError(f"data must be a pat Dataset or training batches of (x, y). Got {type(data).__name__}{hint}.")
    return BatchData(data, val, test)
