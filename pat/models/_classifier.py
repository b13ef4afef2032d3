"""Finding and replacing layers by identity: the classifier head and the first conv."""

from __future__ import annotations

from torch import nn

from pat.errors import PatError

__all__ = ["unwrap", "get_classifier", "module_path", "replace_module"]

# Where torchvision, timm and pretrainedmodels keep the final Linear, in order of trust.
_HEAD_NAMES = ("fc", "classifier", "head", "heads.head", "last_linear")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # an OptimizedModule from torch.compile
        else:
            return model


def _output_width(model: nn.Module) -> int | None:
    """The number of logits, when the model says so without a forward pass."""
    spec = getattr(model, "pat_spec", None)
    if isinstance(spec, dict) and isinstance(spec.get("kwargs", {}).get("num_classes"), int):
        return spec["kwargs"]["num_classes"]
    width = getattr(model, "num_classes", None)
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def get_classifier(model: nn.Module) -> nn.Module:
    """The final classifier layer of ``model``, returned by identity (not a copy).

    Looked up in this order:

    1. ``model.get_classifier()`` when the model has it (every pat zoo model and timm);
    2. the usual attribute names ``fc``, ``classifier``, ``head``, ``heads.head``,
       ``last_linear``: the module itself if it is an ``nn.Linear``, else the last
       ``nn.Linear`` inside it (torchvision's ``classifier`` Sequentials);
    3. the last ``nn.Linear`` registered whose ``out_features`` is the model's number of
       classes (from its pat spec or a ``num_classes`` attribute; any width when unknown).

    Raises:
        PatError: no classifier layer can be found; the message names the model class.
    """
    model = unwrap(model)
    if callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        if isinstance(head, nn.Module):
            return head
    for name in _HEAD_NAMES:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1]
    width = _output_width(model)
    linears = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and (width is None or m.out_features == width)
    ]
    if linears:
        return linears[-1]
    outputs = "" if width is None else f" with {width} outputs"
    raise PatError(
        f"cannot find the classifier layer of {type(model).__name__}: it has no "
        f"get_classifier() method and no nn.Linear{outputs}; add a get_classifier() method "
        "that returns the final layer."
    )


def module_path(model: nn.Module, target: nn.Module) -> str:
    """The dotted name under which ``target`` is registered in ``model``."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` so that state-dict keys stay the same."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)
