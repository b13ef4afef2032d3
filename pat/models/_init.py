"""Weight initialisation shared by the CIFAR zoo, as in the reference implementations."""

from __future__ import annotations

from torch import nn

__all__ = ["init_weights"]


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, BatchNorm weight 1 and bias 0, Linear bias 0.

    Convolutions use ``mode="fan_out"`` for ReLU as torchvision's ResNet and the wide
    ResNet reference code do (He et al., "Delving Deep into Rectifiers", ICCV 2015);
    Linear weights keep PyTorch's default uniform init.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
