"""LeNet-style networks of the Prune and Tune paper, in three widths.

References:
    Whitaker & Whitley, "Prune and Tune Ensembles: Low-Cost Ensemble Learning with
    Sparse Independent Subnetworks", AAAI 2022.
"""

from __future__ import annotations

import torch
from torch import nn

from pat.models._init import init_weights
from pat.models._registry import register_model

__all__ = ["LeNet", "lenet_s", "lenet_m", "lenet_l"]


class LeNet(nn.Module):
    """Two 5x5 conv + max-pool stages, then three Linear layers.

    Widths scale with ``width``: (16, 32) channels and (256, 128) hidden units at 1.
    Valid (unpadded) convolutions take a 32x32 input to a 5x5 map, so the first
    Linear sees ``32 * width * 5 * 5`` features.

    Args:
        num_classes: output logits C.
        in_channels: input channels (1 for grey images, 3 for colour).
        width: multiplier of every layer width (1, 2, 4 for S, M, L).

    Shape:
        ``(B, in_channels, 32, 32) -> (B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 1) -> None:
        super().__init__()
        c1, c2, h1, h2 = 16 * width, 32 * width, 256 * width, 128 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )  # fmt: skip
        self.hidden = nn.Sequential(
            nn.Linear(c2 * 5 * 5, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU()
        )
        self.fc = nn.Linear(h2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, 32, 32)`` images → ``(B, num_classes)`` logits."""
        return self.fc(self.hidden(self.features(x)))

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer, by identity (:func:`pat.models.get_classifier`)."""
        return self.fc


@register_model("lenet-s")
def lenet_s(*, num_classes: int = 10, in_channels: int = 3) -> LeNet:
    """LeNet-S: 253,290 parameters at 10 classes, 3 channels."""
    return LeNet(num_classes, in_channels, width=1)


@register_model("lenet-m")
def lenet_m(*, num_classes: int = 10, in_channels: int = 3) -> LeNet:
    """LeNet-M: every width doubled; 1,007,306 parameters at 10 classes, 3 channels."""
    return LeNet(num_classes, in_channels, width=2)


@register_model("lenet-l")
def lenet_l(*, num_classes: int = 10, in_channels: int = 3) -> LeNet:
    """LeNet-L: every width quadrupled; 4,017,546 parameters at 10 classes, 3 channels."""
    return LeNet(num_classes, in_channels, width=4)
