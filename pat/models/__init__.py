"""The model zoo: CIFAR-style networks by name, and torchvision's through ``tv:<name>``.

>>> model = create_model("resnet20", num_classes=100)
>>> spec_of(model)
{'name': 'resnet20', 'kwargs': {'num_classes': 100, 'in_channels': 3}}

Every model built here carries its architecture spec in ``model.pat_spec``; checkpoints
store it so that ``create_model(spec["name"], **spec["kwargs"])`` rebuilds the same
architecture before the saved weights are loaded into it.
"""

from __future__ import annotations

import copy
import inspect
import json
from typing import Any

import torch
from torch import nn

from pat.errors import PatError, first_line
from pat.models import densenet, lenet, resnet, wide_resnet  # noqa: F401  (they register)
from pat.models._classifier import get_classifier, unwrap
from pat.models._registry import MODELS, register_model
from pat.models.torchvision_models import create_torchvision_model, torchvision_names
from pat.modes import eval_mode

__all__ = ["create_model", "spec_of", "list_models", "register_model", "get_classifier", "check_takes"]


def list_models() -> list[str]:
    """The names of pat's own models, sorted. Any ``tv:<torchvision name>`` is accepted as well."""
    return MODELS.names()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_kwargs(name: str, factory: Any, kwargs: dict[str, Any]) -> None:
    """Refuse arguments the factory does not take, before building anything."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise PatError(
            f"model {name!r} does not take argument(s) {', '.join(unknown)}; "
            f"it takes {', '.join(params)}."
        )


def _check_plain(kwargs: dict[str, Any]) -> None:
    # The spec goes into checkpoints, which hold plain values only.
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise PatError(
                f"model argument {key} must be a plain value (number, string, bool, None, "
                f"list or dict) so that checkpoints can store it. Got {value!r}."
            ) from None


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name and attach its spec as ``model.pat_spec``.

    Args:
        name: one of :func:`list_models`, or ``"tv:<name>"`` for any torchvision
            classification model (see :mod:`pat.models.torchvision_models`).
        num_classes: number of output logits C.
        in_channels: channels of the input images.
        pretrained: load torchvision's DEFAULT weights (``tv:`` models only); the head is
            replaced when ``num_classes`` differs from the weights' class count.
        **kwargs: model-specific arguments (e.g. ``depth``, ``widen_factor``, ``dropout``
            for ``wrn``); plain JSON values only.

    Returns:
        The model in train mode, mapping ``(B, in_channels, H, W)`` to ``(B, C)``. Its
        ``pat_spec`` is ``{"name": name, "kwargs": {"num_classes", "in_channels", **kwargs}}``
        without ``pretrained``: the spec rebuilds the architecture, a checkpoint supplies
        the weights.

    Raises:
        PatError: unknown name, bad argument, or pretrained weights that cannot be fetched.
    """
    if not isinstance(name, str):
        raise PatError(f"model name must be a string. Got {name!r}.")
    if not _is_count(num_classes):
        raise PatError(f"num_classes must be a positive integer. Got {num_classes!r}.")
    if not _is_count(in_channels):
        raise PatError(f"in_channels must be a positive integer. Got {in_channels!r}.")
    _check_plain(kwargs)
    if name.startswith("tv:"):
        if name[3:] not in torchvision_names():
            raise MODELS.unknown(name)
        model = create_torchvision_model(
            name[3:], num_classes=num_classes, in_channels=in_channels,
            pretrained=bool(pretrained), **kwargs,
        )  # fmt: skip
    else:
        factory = MODELS.get(name)
        if pretrained:
            raise PatError(
                f"model {name!r} has no pretrained weights; load a pat checkpoint "
                "(pat.engine.checkpoint.load_model) or use a tv:<torchvision name> model."
            )
        _check_kwargs(name, factory, kwargs)
        model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.pat_spec = {
        "name": name,
        "kwargs": {"num_classes": num_classes, "in_channels": in_channels, **copy.deepcopy(kwargs)},
    }
    return model


def spec_of(model: nn.Module) -> dict[str, Any] | None:
    """A copy of the spec :func:`create_model` attached to ``model``; None for other models.

    Looks through DDP / DataParallel / ``torch.compile`` wrappers.
    """
    spec = getattr(unwrap(model), "pat_spec", None)
    return copy.deepcopy(spec) if isinstance(spec, dict) else None


def check_takes(model: nn.Module, data: Any, *, argument: str = "model") -> None:
    """Refuse ``model`` unless it takes ``data``'s images and predicts its classes.

    One eval-mode forward of two training images (the model's train/eval flags are restored), so
    a 3-channel or 100-class model given 1-channel, 10-class data fails here in one line that
    names both, instead of deep inside training.

    Raises:
        PatError: the forward fails, or its output is not ``(2, data.num_classes)``.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    x, _ = next(iter(data.loader("train", batch_size=2, shuffle=False, augment=False, device=device)))
    x = x[:2]  # batches someone else makes come at their own size
    shape = tuple(x.shape[1:])
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any layer's shape error
        raise PatError(f"{argument} {type(model).__name__} does not take {data.name!r} images of shape "
                       f"{shape} ({first_line(e)}).") from None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (len(x), data.num_classes):
        raise PatError(f"{argument} {type(model).__name__} returns {got} for {len(x)} {data.name!r} images; "
                       f"{data.name!r} has {data.num_classes} classes.")
