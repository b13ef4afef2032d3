"""CIFAR ResNets: resnet8 and resnet20 (16/32/64 widths) and the CIFAR resnet18.

Shortcuts that change shape are 1x1 conv + BatchNorm projections ("option B" of He et
al.), not the zero-padding "option A": a projection is a layer that torch-pruning can
trace, so the channels of a residual add stay coupled and prunable together.

References:
    He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
    (section 4.2 for the 6n+2-layer CIFAR networks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pat.models._init import init_weights
from pat.models._registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet8", "resnet20", "resnet18"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (post-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W)`` → ``(B, planes, H / stride, W / stride)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, one stage per width.

    The first stage keeps the resolution, every later stage halves it with a stride-2
    first block. Global average pooling makes any input size >= 8 work.

    Args:
        blocks: basic blocks per stage, e.g. (3, 3, 3) for resnet20.
        widths: channels per stage; the stem has ``widths[0]`` channels.
        num_classes: output logits C.
        in_channels: input channels.

    Shape:
        ``(B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` images → ``(B, num_classes)`` logits."""
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer, by identity (:func:`pat.models.get_classifier`)."""
        return self.fc


@register_model("resnet8")
def resnet8(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (n=1): one basic block per stage, widths 16/32/64; ~78k parameters."""
    return CifarResNet((1, 1, 1), (16, 32, 64), num_classes, in_channels)


@register_model("resnet20")
def resnet20(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3): three basic blocks per stage, widths 16/32/64; ~0.27M parameters."""
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels)


@register_model("resnet18")
def resnet18(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-18: 2 blocks per stage, widths 64/128/256/512; ~11.2M parameters."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)
