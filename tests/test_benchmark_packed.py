"""benchmarks/packed.py's --conv-share: the share of a step that packing can divide by M."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import packed  # noqa: E402


def test_matmul_share_counts_convolutions_and_linear_layers_only():
    x = torch.randn(8, 3, 16, 16)
    convs = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(64 * 144, 10))
    elementwise = lambda: torch.relu(x).mul(2).add(1).sigmoid()  # noqa: E731
    with torch.no_grad():
        share = packed._matmul_share(lambda: convs(x), 2, "cpu")
        assert 0.5 < share <= 1.0  # two convolutions and a linear layer, nothing else worth timing
        assert packed._matmul_share(elementwise, 2, "cpu") == 0.0
        half = packed._matmul_share(lambda: (convs(x), [elementwise() for _ in range(200)]), 2, "cpu")
    assert 0.0 < half < share  # the element-wise work dilutes it
