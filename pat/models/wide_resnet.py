"""Wide residual networks (WRN-d-k) with pre-activation basic blocks.

References:
    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
"""

from __future__ import annotations

import torch
from torch import nn

from pat.errors import check
from pat.models._init import init_weights
from pat.models._registry import register_model

__all__ = ["WideBasicBlock", "WideResNet", "wide_resnet", "wrn_28_10", "wrn_16_4"]


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

    When the shape changes, the shortcut is a 1x1 conv applied to the pre-activated
    input, as in the authors' code; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W)`` → ``(B, planes, H / stride, W / stride)``."""
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs.

    A 3x3 stem with 16 channels, three groups of n = (depth - 4) / 6 blocks with
    16k / 32k / 64k channels (strides 1, 2, 2), then BN-ReLU, global average pooling
    and a Linear classifier. WRN-28-10 has ~36.5M parameters.

    Args:
        depth: total depth, 6n + 4 (16, 22, 28, 40, ...).
        widen_factor: width multiplier k.
        dropout: dropout probability between the two convs of a block (0 disables).
        num_classes: output logits C.
        in_channels: input channels.

    Shape:
        ``(B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check(
            isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0,
            f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...). Got {depth!r}.",
        )
        check(
            isinstance(widen_factor, int) and widen_factor >= 1,
            f"widen_factor must be a positive integer. Got {widen_factor!r}.",
        )
        check(
            isinstance(dropout, (int, float)) and 0 <= dropout < 1,
            f"dropout must be in [0, 1). Got {dropout!r}.",
        )
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, in_planes = [], 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(WideBasicBlock(in_planes, planes, stride, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` images → ``(B, num_classes)`` logits."""
        x = self.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer, by identity (:func:`pat.models.get_classifier`)."""
        return self.fc


@register_model("wrn")
def wide_resnet(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN of any depth and width: ``create_model("wrn", depth=40, widen_factor=2)``."""
    return WideResNet(depth, widen_factor, dropout, num_classes, in_channels)


@register_model("wrn-28-10")
def wrn_28_10(*, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10: ~36.5M parameters."""
    return WideResNet(28, 10, dropout, num_classes, in_channels)


@register_model("wrn-16-4")
def wrn_16_4(*, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-16-4: ~2.7M parameters; a small wide ResNet for quick runs."""
    return WideResNet(16, 4, dropout, num_classes, in_channels)
