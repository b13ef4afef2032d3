"""Checkpoints: tensors and plain containers only, written atomically, loaded safely.

A checkpoint is a ``.pt`` file holding one dict (see ``docs/checkpoint-format.md``)::

    {"format_version": 1, "pat_version": "...", "kind": "model",
     "arch": {"name": "lenet-s", "kwargs": {...}} | None,
     "state_dict": {...}, "config": {...}, "metrics": {...}, ...}

It is always read with ``torch.load(..., weights_only=True)``: a file that holds a
pickled object (a module, a function) is refused rather than executed.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pat.errors import PatError
from pat.io import REBUILDERS, atomic_write

__all__ = [
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "save_model",
    "load_model",
    "model_from_checkpoint",
]

FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything that ``weights_only`` loading could not read back."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint key {key!r} at {where} is not a str or int")
            _check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value at {where} is a {type(obj).__name__}; only tensors and plain "
        "containers may be saved"
    )


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Validate ``payload`` (tensors and plain containers only) and write it atomically."""
    from pat import __version__

    data = {"format_version": FORMAT_VERSION, "pat_version": __version__, **payload}
    _check_plain(data, "checkpoint")
    atomic_write(path, lambda f: torch.save(data, f))


def load_checkpoint(
    path: str | os.PathLike, *, argument: str = "checkpoint", mmap: bool = False
) -> dict[str, Any]:
    """Load a pat checkpoint with ``weights_only=True``; one-line :class:`PatError` if unusable.

    ``mmap=True`` maps tensors from the file instead of reading them: cheap when only the
    plain entries (kind, status, metrics) are needed.
    """
    path = Path(path)
    if path.is_dir():
        raise PatError(f"{argument} {str(path)!r} is a directory, not a checkpoint file.")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise PatError(f"{argument} {str(path)!r} {what}.")
    if not zipfile.is_zipfile(path):
        raise PatError(f"{argument} {str(path)!r} is not a readable checkpoint (not a torch.save archive).")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            # weights_only refuses globals it does not know: a pickled class or function
            raise PatError(
                f"{argument} {str(path)!r} cannot be loaded safely: it holds pickled Python "
                "objects, which pat refuses to load."
            ) from None
        raise PatError(f"{argument} {str(path)!r} is not a readable checkpoint (corrupt pickle data).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PatError(f"{argument} {str(path)!r} is not a readable checkpoint ({first}).") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise PatError(f"{argument} {str(path)!r} is not a pat checkpoint (no format_version).")
    if data["format_version"] > FORMAT_VERSION:
        raise PatError(
            f"{argument} {str(path)!r} has format_version {data['format_version']}; this pat "
            f"reads up to {FORMAT_VERSION}. Upgrade pat."
        )
    return data


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    kind: str = "model",
    arch: Mapping[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Save ``model``'s state with its architecture spec so :func:`load_model` can rebuild it.

    ``arch`` defaults to the spec that :func:`pat.models.create_model` attached to the model;
    ``extra`` (config, metrics, masks, kept indices, ...) is stored alongside.
    """
    from pat.models import spec_of

    arch = dict(arch) if arch is not None else spec_of(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"kind": kind, "arch": arch, "state_dict": state, **extra})


def model_from_checkpoint(ckpt: Mapping[str, Any], *, argument: str = "checkpoint") -> nn.Module:
    """Rebuild the architecture named in ``ckpt['arch']`` and load its state dict."""
    from pat.models import create_model

    if ckpt.get("kind") == "packed":
        raise PatError(f"{argument} holds {ckpt.get('members')} packed children, not one model; "
                       "load it with pat.pack.load_packed (or its directory with pat.Ensemble.load).")
    arch = ckpt.get("arch")
    if not arch:
        raise PatError(
            f"{argument} has no architecture spec; build the model yourself and call "
            "load_state_dict(ckpt['state_dict'])."
        )
    import pat.masks  # noqa: F401  (registers the rebuilders of the children it makes)

    model = create_model(arch["name"], **arch.get("kwargs", {}))
    for field in REBUILDERS.names():
        if ckpt.get(field):
            model = REBUILDERS.get(field)(model, ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise PatError(
            f"{argument}: weights do not fit architecture {arch['name']!r} "
            f"({str(e).splitlines()[0]})."
        ) from None
    return model


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", argument: str = "checkpoint"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model checkpoint; returns ``(model, checkpoint_dict)`` with the model on ``device``."""
    ckpt = load_checkpoint(path, argument=argument)
    if "state_dict" not in ckpt:
        raise PatError(f"{argument} {str(path)!r} holds no model weights (kind={ckpt.get('kind')!r}).")
    model = model_from_checkpoint(ckpt, argument=f"{argument} {str(path)!r}")
    return model.to(device), ckpt
