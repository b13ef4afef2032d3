"""The model registry: a name maps to a factory ``fn(*, num_classes, in_channels, **kw)``.

Kept apart from ``pat/models/__init__.py`` so that the model files can register
themselves on import without a circular import.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pat.errors import PatError
from pat.registry import Registry

__all__ = ["MODELS", "register_model"]

ModelFactory = Callable[..., nn.Module]

# name -> factory; filled by the @register_model decorators as the model files import.
MODELS: Registry[ModelFactory] = Registry("model", sort=True, also="tv:<torchvision name>")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name`` (timm-style decorator).

    The factory is called as ``fn(num_classes=..., in_channels=..., **kwargs)`` by
    :func:`pat.models.create_model` and must return an ``nn.Module`` mapping
    ``(B, in_channels, H, W)`` to ``(B, num_classes)`` logits. Its keyword arguments
    must be plain JSON values, because they are stored in checkpoints.

    Example:
        >>> @register_model("my-mlp")
        ... def my_mlp(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, num_classes))
    """
    if not isinstance(name, str) or not name or name.startswith("tv:"):
        raise PatError(
            f"model name must be a non-empty string not starting with 'tv:'. Got {name!r}."
        )

    def decorator(fn: ModelFactory) -> ModelFactory:
        if name in MODELS and MODELS.get(name) is not fn:
            raise PatError(f"model name {name!r} is already registered; choose another name.")
        return MODELS.add(name, fn)

    return decorator
