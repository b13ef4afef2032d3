"""Data: registered datasets as resident uint8 splits, a device-resident loader, bagging.

>>> from pat.data import load_dataset
>>> ds = load_dataset("digits")                  # embedded, no download
>>> for x, y in ds.loader("train", device="cuda"):  # x: (128, 1, 32, 32) float32, normalised
...     ...
"""

from __future__ import annotations

from pat.data import sources as _sources  # noqa: F401  (registers the datasets)
from pat.data.batches import BatchData, as_data
from pat.data.core import (
    Dataset,
    Recipe,
    Split,
    bagging_indices,
    dataset_recipe,
    list_datasets,
    load_dataset,
    load_dataset_like,
    register_dataset,
)
from pat.data.loader import DeviceLoader, IndexedBatches

__all__ = [
    "BatchData",
    "as_data",
    "Dataset",
    "DeviceLoader",
    "IndexedBatches",
    "Recipe",
    "Split",
    "bagging_indices",
    "dataset_recipe",
    "list_datasets",
    "load_dataset",
    "load_dataset_like",
    "register_dataset",
]
