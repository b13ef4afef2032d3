"""Common corruptions, made on the fly on batches of images, and the CIFAR-10/100-C files.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019. The severity tables are those of their CIFAR (32x32) code; the
operations are re-done with batched tensor ops on the images' own device (JPEG goes through
Pillow on the CPU, image by image), so they are not bit-identical to the published
CIFAR-10-C files (use :func:`load_cifar_c` for those).

- ``gaussian_noise``: ``x + N(0, s^2)``, s = 0.04, 0.06, 0.08, 0.09, 0.10.
- ``shot_noise``: ``Poisson(x * r) / r``, r = 500, 250, 100, 75, 50.
- ``impulse_noise``: salt and pepper on a fraction a of the values, a = .01 .02 .03 .05 .07.
- ``gaussian_blur``: Gaussian kernel of sigma .4 .6 .7 .8 1 (radius ceil(4 sigma), reflect).
- ``contrast``: ``(x - m) * c + m``, m the per-image channel mean, c = .75 .5 .4 .3 .15.
- ``brightness``: HSV value + b, b = .05 .1 .15 .2 .3 (hue and saturation kept).
- ``pixelate``: box-downsample to ``f`` of the size and back, f = .95 .9 .85 .75 .65.
- ``jpeg_compression`` (alias ``jpeg``): JPEG at quality 80, 65, 58, 50, 40.

Every function maps float images ``(N, C, H, W)`` in [0, 1] to the same shape and range;
random ones draw from a generator seeded with ``seed`` on the images' device.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from pat.errors import PatError, check
from pat.registry import Registry

__all__ = ["list_corruptions", "corrupt", "corrupt_split", "load_cifar_c"]

_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}
_ALIASES = {"jpeg": "jpeg_compression"}


def _gaussian_noise(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    return x + c * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _shot_noise(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    u = torch.rand((2, *x.shape), generator=g, device=x.device, dtype=x.dtype)
    # each value is hit with probability c; a hit becomes salt (1) or pepper (0) evenly
    return torch.where(u[0] < c, (u[1] < 0.5).to(x.dtype), x)


def _gaussian_blur(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    from torchvision.transforms.v2 import functional as TF  # torchvision is slow to import

    radius = math.ceil(4 * c)  # scikit-image's default truncate=4
    return TF.gaussian_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[c, c])


def _contrast(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def _brightness(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    # RGB is linear in the HSV value V for fixed hue and saturation, so raising V to
    # V' = min(V + c, 1) scales the pixel by V'/V; a black pixel (V = 0) becomes grey V'.
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new)


def _pixelate(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    # area resampling both ways is PIL's BOX filter, which the reference code uses
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="area")


def _jpeg(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    # Pillow (a torchvision dependency) as in the reference code; torchvision's own JPEG
    # codec is deprecated in favour of torchcodec.
    import numpy as np
    from PIL import Image

    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(u8)
    for i, image in enumerate(u8):
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, format="JPEG", quality=int(c))
        out[i] = np.asarray(Image.open(buffer)).reshape(image.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


_OPS: Registry[Callable[[Tensor, float, torch.Generator], Tensor]] = Registry("corruption")
for _name, _op in (("gaussian_noise", _gaussian_noise), ("shot_noise", _shot_noise),
                   ("impulse_noise", _impulse_noise), ("gaussian_blur", _gaussian_blur),
                   ("contrast", _contrast), ("brightness", _brightness), ("pixelate", _pixelate),
                   ("jpeg_compression", _jpeg)):
    _OPS.add(_name, _op)


def list_corruptions() -> list[str]:
    """Corruption names accepted by :func:`corrupt` (the CIFAR-10-C file names)."""
    return _OPS.names()


def _resolve(name: str, severity: int) -> tuple[str, float]:
    name = _ALIASES.get(name, name)
    _OPS.get(name)
    ok = isinstance(severity, int) and not isinstance(severity, bool) and 1 <= severity <= 5
    check(ok, f"severity must be an integer in [1, 5]. Got {severity!r}.")
    return name, _PARAMS[name][severity - 1]


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Corrupt a batch of float images.

    Args:
        x: ``(N, C, H, W)`` float images in [0, 1], on any device.
        name: one of :func:`list_corruptions` (or ``"jpeg"``).
        severity: 1 (mild) to 5 (strong).
        seed: seeds the generator of the random corruptions (same seed, same device, same
            output).

    Returns:
        ``(N, C, H, W)`` tensor of ``x``'s dtype, in [0, 1].
    """
    name, c = _resolve(name, severity)
    if x.dim() != 4 or not x.is_floating_point():
        raise PatError(f"x must be float images (N, C, H, W). Got {x.dtype} {tuple(x.shape)}.")
    g = torch.Generator(device=x.device).manual_seed(int(seed))
    with torch.no_grad():
        return _OPS.get(name)(x, c, g).clamp_(0.0, 1.0)


def corrupt_split(
    x: Tensor, name: str, severity: int, seed: int = 0, *, batch_size: int = 1000
) -> Tensor:
    """Corrupt uint8 images ``(N, C, H, W)`` (a dataset split); returns uint8 of the same shape.

    Works in batches of ``batch_size`` so a whole split never exists in float at once;
    batch b uses seed ``seed + b``, so the result depends on ``batch_size``.
    """
    _resolve(name, severity)
    check(x.dtype == torch.uint8 and x.dim() == 4,
          f"x must be uint8 images (N, C, H, W). Got {x.dtype} {tuple(x.shape)}.")
    out = torch.empty_like(x)
    for b, start in enumerate(range(0, x.shape[0], batch_size)):
        chunk = x[start:start + batch_size].float() / 255
        out[start:start + batch_size] = (corrupt(chunk, name, severity, seed + b) * 255).round().to(torch.uint8)
    return out


def load_cifar_c(
    data_dir: str | os.PathLike, name: str, severity: int, dataset: str = "cifar10"
) -> tuple[Tensor, Tensor]:
    """Read one corruption at one severity from the published CIFAR-10-C / CIFAR-100-C files.

    Looks for ``<data_dir>/CIFAR-10-C/<name>.npy`` (or ``CIFAR-100-C``) and ``labels.npy``:
    50,000 images, 10,000 per severity stacked in order.

    Returns:
        images ``(10000, 3, 32, 32)`` uint8 and labels ``(10000,)`` int64.
    """
    import numpy as np

    name, _ = _resolve(name, severity)
    folders = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
    check(dataset in folders, f"dataset must be one of {list(folders)}. Got {dataset!r}.")
    folder = Path(data_dir) / folders[dataset]
    images, labels = folder / f"{name}.npy", folder / "labels.npy"
    for file in (images, labels):
        if not file.is_file():
            raise PatError(
                f"{folders[dataset]} file {str(file)!r} not found; download {folders[dataset]} "
                f"(Hendrycks & Dietterich 2019) and pass the folder that holds it with --data-dir."
            )
    x = np.load(images, mmap_mode="r")
    y = np.load(labels, mmap_mode="r")
    per = x.shape[0] // 5
    rows = slice((severity - 1) * per, severity * per)
    return (torch.from_numpy(np.array(x[rows])).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(np.array(y[rows], dtype=np.int64)))
