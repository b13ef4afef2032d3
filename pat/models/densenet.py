"""DenseNet-121 for 32x32 inputs, built on torchvision's DenseNet-BC.

torchvision's DenseNet is the ImageNet network (7x7 stride-2 stem, max-pool). The CIFAR
variant keeps its dense blocks and transitions but starts with a single 3x3 stride-1
convolution of 2k channels and no pooling, so a 32x32 image still has a 4x4 map in the
last block.

References:
    Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional Networks",
    CVPR 2017 (section 3, implementation details for CIFAR).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import DenseNet

from pat.models._registry import register_model

__all__ = ["CifarDenseNet", "densenet121"]


class CifarDenseNet(DenseNet):
    """torchvision's DenseNet-BC with a 3x3 stride-1 stem and no stem BN/ReLU/max-pool.

    Args:
        growth_rate: channels each dense layer adds (k).
        block_config: dense layers per block, e.g. (6, 12, 24, 16) for DenseNet-121.
        num_classes: output logits C.
        in_channels: input channels.

    Shape:
        ``(B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, int, int, int] = (6, 12, 24, 16),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        stem = 2 * growth_rate
        super().__init__(growth_rate, block_config, stem, num_classes=num_classes)
        self.features.conv0 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        # Dense layers pre-activate their input, so the CIFAR stem has no BN-ReLU of its own.
        for name in ("norm0", "relu0", "pool0"):
            delattr(self.features, name)
        # The new stem gets torchvision's DenseNet init (kaiming-normal, fan-in) like the rest.
        nn.init.kaiming_normal_(self.features.conv0.weight)

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer, by identity (:func:`pat.models.get_classifier`)."""
        return self.classifier


@register_model("densenet121")
def densenet121(*, num_classes: int = 10, in_channels: int = 3) -> CifarDenseNet:
    """CIFAR DenseNet-121: growth 32, blocks 6/12/24/16; ~6.96M parameters."""
    return CifarDenseNet(32, (6, 12, 24, 16), num_classes, in_channels)
