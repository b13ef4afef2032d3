from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pat.config import SplitConfig
from pat.data import load_dataset
from pat.engine.checkpoint import save_model
from pat.ensemble.corruptions import list_corruptions
from pat.ensemble.report import evaluate_directory
from pat.models import create_model
from pat.pipeline import split_to_directory

FILES = {"jpeg": "jpeg_compression"}  # the published file names


@pytest.fixture
def cifar_like(tmp_path):
    """Two children of an RGB parent and a 'cifar10' stand-in built from synthetic data."""
    torch.manual_seed(0)
    save_model(tmp_path / "parent.pt", create_model("lenet-s"), dataset="cifar10", num_classes=10)
    children = split_to_directory(tmp_path / "parent.pt", tmp_path / "kids", SplitConfig(children=2)).path
    data = dataclasses.replace(load_dataset("synthetic", train_size=64, test_size=40), name="cifar10")
    return children, data


def test_published_cifar_c_files_are_used_when_present(tmp_path, cifar_like):
    children, data = cifar_like
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    per_severity = 12
    rng = np.random.default_rng(0)
    for name in list_corruptions():
        images = rng.integers(0, 256, size=(5 * per_severity, 32, 32, 3), dtype=np.uint8)
        np.save(folder / f"{FILES.get(name, name)}.npy", images)
    np.save(folder / "labels.npy", rng.integers(0, 10, size=5 * per_severity))
    report = evaluate_directory(children, data, corruptions=True, data_dir=tmp_path)
    assert report["corruption_source"] == "published"
    assert len(report["corruptions"]) == 5 * len(list_corruptions())
    probs = torch.load(children / "logits-test-contrast-3.pt", weights_only=True)["logits"]
    assert probs.shape == (2, per_severity, 10)  # the file's images, not the synthetic test split


def test_on_the_fly_corruptions_without_files(tmp_path, cifar_like):
    children, data = cifar_like
    report = evaluate_directory(children, data, corruptions=True, data_dir=tmp_path)
    assert report["corruption_source"] == "on-the-fly"
    rows = {(r["corruption"], r["severity"]): r for r in report["corruptions"]}
    assert set(rows) == {(c, s) for c in list_corruptions() for s in range(1, 6)}
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 for r in rows.values())
