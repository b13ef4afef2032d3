from __future__ import annotations

import pytest
import torch

# two cores shared by the whole suite: one intra-op thread keeps tests from fighting
torch.set_num_threads(1)


@pytest.fixture
def blobs() -> tuple[torch.Tensor, torch.Tensor]:
    """A small separable 3-class problem: 96 points in 8-d."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(96) % 3
    x = centers[y] + torch.randn(96, 8, generator=g)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@pytest.fixture(scope="session")
def digits():
    from pat.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_parent(tmp_path_factory, digits) -> str:
    """A LeNet-S parent briefly trained on digits (one epoch: enough to test the flow)."""
    from pat.config import DataConfig, TrainConfig
    from pat.parent import train_parent

    out = tmp_path_factory.mktemp("parent") / "parent.pt"
    train_parent(TrainConfig(model="lenet-s", epochs=1, lr=0.05, data=DataConfig(batch_size=64)),
                 data=digits, out=out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_data():
    """64 synthetic 1-channel training images: enough for a producer's members to run."""
    from pat.data import load_dataset

    return load_dataset("synthetic", train_size=64, test_size=32, in_channels=1, seed=0)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> str:
    """A lenet-s 'pretrained' on 5 classes: a producer starting from it replaces the head for 10."""
    from pat.engine.checkpoint import save_model
    from pat.models import create_model

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("pre") / "pre.pt"
    save_model(path, create_model("lenet-s", num_classes=5, in_channels=1))
    return str(path)
