"""``tv:<name>``: any torchvision classification model, optionally with pretrained weights.

``create_model("tv:resnet18", num_classes=10)`` is
``torchvision.models.get_model("resnet18", weights=None, num_classes=10)``. Two changes
make such a model fit pat's contract (any class count, any channel count):

* ``pretrained=True`` loads the DEFAULT weights (ImageNet, 1000 classes); when
  ``num_classes`` differs, the head found by :func:`get_classifier` is replaced by a fresh
  ``nn.Linear`` of the right size at the same module path, so a model rebuilt later with
  ``weights=None, num_classes=...`` has the same state-dict keys and shapes.
* ``in_channels != 3`` replaces the first ``Conv2d`` by one with ``in_channels`` inputs and
  the same other arguments. Its kernel is derived from the RGB kernel as timm's
  ``adapt_input_conv`` does: summed over RGB for one channel, otherwise RGB tiled and
  scaled by 3 / in_channels. That keeps pretrained features, and for a fresh model it
  keeps the scale of torchvision's own initialisation.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from pat.errors import PatError, first_line
from pat.models._classifier import get_classifier, module_path, replace_module

__all__ = ["torchvision_names", "create_torchvision_model", "adapt_first_conv"]


def torchvision_names() -> list[str]:
    """Names of torchvision's image classification models (``tv:`` accepts these)."""
    return torchvision.models.list_models(module=torchvision.models)


def create_torchvision_model(
    name: str, *, num_classes: int, in_channels: int, pretrained: bool, **kwargs: Any
) -> nn.Module:
    """Build torchvision model ``name`` (without the ``tv:`` prefix); see the module doc.

    Raises:
        PatError: the weights cannot be downloaded, or the builder rejects ``kwargs``.
    """
    if "weights" in kwargs:
        raise PatError(
            f"model 'tv:{name}' takes pretrained=True, not weights=. Got weights={kwargs['weights']!r}."
        )
    try:
        if pretrained:
            # The weights fix the class count; the head is swapped below when it differs.
            model = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        else:
            model = torchvision.models.get_model(
                name, weights=None, num_classes=num_classes, **kwargs
            )
    except (URLError, OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise PatError(
            f"pretrained weights of model 'tv:{name}' could not be downloaded ({first_line(e)}); "
            f"connect to the network or put the file in {torch.hub.get_dir()}/checkpoints."
        ) from None
    except (TypeError, ValueError) as e:
        raise PatError(
            f"model 'tv:{name}' rejected its arguments {kwargs!r}: {first_line(e)}."
        ) from None
    if pretrained:
        head = get_classifier(model)
        if head.out_features != num_classes:
            new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
            replace_module(model, module_path(model, head), new.to(head.weight))
    if in_channels != 3:
        adapt_first_conv(model, in_channels, name=f"tv:{name}")
    return model


def adapt_first_conv(model: nn.Module, in_channels: int, *, name: str = "model") -> nn.Conv2d:
    """Replace the first registered ``Conv2d`` (3 inputs) by one with ``in_channels`` inputs.

    Args:
        model: modified in place.
        in_channels: new number of input channels.
        name: the model's name, for error messages.

    Returns:
        The new convolution, registered at the old one's module path.
    """
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise PatError(
            f"in_channels={in_channels} is not supported for {name}: its first layer is not "
            "a 3-channel Conv2d that could be adapted."
        )
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
        padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        rgb = conv.weight  # (out, 3, kh, kw)
        if in_channels == 1:
            new.weight.copy_(rgb.sum(dim=1, keepdim=True))
        else:
            tiled = rgb.repeat(1, math.ceil(in_channels / 3), 1, 1)[:, :in_channels]
            new.weight.copy_(tiled * (3 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    replace_module(model, module_path(model, conv), new)
    return new
