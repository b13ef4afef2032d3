"""Helpers shared by the tests of physical children."""

from __future__ import annotations

import torch
from torch import nn


def randomized(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so eval mode really exercises them."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model
