"""A device-resident loader: the whole split sits on the device, batches are made there.

Small image datasets (CIFAR, SVHN, digits) fit in accelerator memory many times over, so
the per-sample Python pipeline of ``torch.utils.data.DataLoader`` (decode, crop, flip,
collate, copy to device, one sample at a time) is the bottleneck, not the model. Here the
raw uint8 images are moved to the device once; each batch is padded once and one gather
does the random crop and the horizontal flip of every sample, then one normalisation.
The idea follows airbench (Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU").

Randomness: the shuffle order and every crop offset / flip bit of an epoch are drawn from a
CPU ``torch.Generator`` seeded by ``(seed, epoch)`` and then moved to the device, so the
batches are a pure function of ``(seed, epoch)`` and identical on CPU and on CUDA. A
resumed run that calls ``set_epoch(e)`` sees exactly the batches the first run saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pat.errors import PatError, check

__all__ = ["DeviceLoader", "IndexedBatches", "seeded_generator"]


def seeded_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``words`` (e.g. ``(seed, epoch)``).

    ``SeedSequence`` mixes the words, so nearby tuples such as (0, 1) and (1, 0) give
    unrelated streams, which ``seed + epoch`` would not.
    """
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def resolve_device(device: torch.device | str | None, default: torch.device) -> torch.device:
    """``device`` in canonical form (``"cuda"`` becomes ``cuda:0``); ``default`` when None."""
    if device is None:
        return default
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, AssertionError) as err:  # no such device / no CUDA build
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise PatError(f"device {str(device)!r} is not available here ({reason}).") from err


class DeviceLoader:
    """Iterable of ``(x, y)`` batches made on ``device`` from one resident uint8 tensor.

    Args:
        x: (N, C, H, W) uint8 images in [0, 255].
        y: (N,) integer labels.
        mean, std: per channel, on the [0, 1] scale; batches are ``(x / 255 - mean) / std``.
        batch_size: samples per batch.
        shuffle: draw a fresh order each epoch.
        augment: random crop with zero padding ``crop_padding`` and, if ``flip``, a random
            horizontal flip with probability 1/2 (the standard CIFAR recipe, He et al. 2016).
        device: where the data lives and batches are made; default: where ``x`` is.
        seed: seed of the shuffling and augmentation streams.
        indices: (K,) restrict the loader to these samples (bagging); default all N.
        drop_last: drop the final batch if it is smaller than ``batch_size``.

    Each pass (``iter``) uses the current epoch and then advances it by one, so a loop
    that never calls :meth:`set_epoch` still sees a new order each epoch; ``set_epoch(e)``
    pins the next pass to epoch ``e``.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        indices: Tensor | Sequence[int] | None = None,
        drop_last: bool = False,
    ) -> None:
        check(
            x.dtype == torch.uint8 and x.dim() == 4,
            f"x must be a (N, C, H, W) uint8 tensor. Got {tuple(x.shape)} {x.dtype}.",
        )
        check(
            y.dim() == 1 and len(y) == len(x),
            f"y must be a (N,) tensor with N = {len(x)}. Got {tuple(y.shape)}.",
        )
        check(batch_size >= 1, f"batch_size must be >= 1. Got {batch_size}.")
        check(crop_padding >= 0, f"crop_padding must be >= 0. Got {crop_padding}.")
        channels = x.shape[1]
        check(
            len(mean) == channels and len(std) == channels,
            f"mean and std need {channels} values (one per channel). Got {len(mean)} and {len(std)}.",
        )
        check(all(s > 0 for s in std), f"std must be positive. Got {tuple(std)}.")
        self.device = resolve_device(device, x.device)
        # .to() is free when the tensor is already there (Dataset.loader caches per device).
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.int64).flatten().cpu()
            if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < len(x)):
                lo, hi = int(indices.min()), int(indices.max())
                raise PatError(f"indices must lie in [0, {len(x)}). Got range [{lo}, {hi}].")
        self.indices = indices
        self.num_samples = len(x) if indices is None else len(indices)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.shuffle, self.seed = shuffle, seed
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        # (x / 255 - mean) / std as one multiply-add: x * scale - shift.
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (mean_t / std_t).to(self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s order and augmentation."""
        check(epoch >= 0, f"epoch must be >= 0. Got {epoch}.")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, offsets, flips = self._draw(self.epoch)
        self.epoch += 1
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)
            if order is None:  # in order, no gather: plain views of the resident tensors
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                yb = self.y.index_select(0, idx)  # much faster than y[idx] on CPU
                if offsets is None:
                    xb = self.x.index_select(0, idx)
                else:
                    xb = self._crop_flip(idx, offsets[lo:hi], flips[lo:hi])
            yield self._normalise(xb), yb

    def _draw(self, epoch: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Epoch order (K,), crop offsets (K, 2) and flip bits (K,), drawn on CPU, moved once."""
        gen = seeded_generator(self.seed, epoch)
        order = self.indices
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=gen)
            order = perm if order is None else order[perm]
        if not self.augment:
            return (None if order is None else order.to(self.device)), None, None
        if order is None:
            order = torch.arange(self.num_samples)
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (self.num_samples, 2), generator=gen)
        flips = torch.rand(self.num_samples, generator=gen) < 0.5
        if not self.flip:
            flips.zero_()
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def _crop_flip(self, idx: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        """Random crop (zero padding ``p``) then horizontal flip of samples ``idx``.

        The batch is padded once; output pixel (i, j) of a sample with offsets (dy, dx) is
        padded pixel (dy + i, dx + j), or (dy + i, dx + W - 1 - j) when flipped, so crop
        and flip together are one ``gather`` over the flattened padded image.
        """
        _, channels, height, width = self.x.shape
        p = self.crop_padding
        batch = len(idx)
        padded = F.pad(self.x.index_select(0, idx), (p, p, p, p))  # (B, C, H + 2p, W + 2p)
        cols = torch.arange(width, device=self.device)
        cols = offsets[:, 1:] + torch.where(flips[:, None], width - 1 - cols, cols)  # (B, W)
        rows = offsets[:, :1] + torch.arange(height, device=self.device)  # (B, H)
        flat = (rows[:, :, None] * (width + 2 * p) + cols[:, None, :]).view(
            batch, 1, height * width
        )
        out = padded.view(batch, channels, -1).gather(
            2, flat.expand(batch, channels, height * width)
        )
        return out.view(batch, channels, height, width)

    def _normalise(self, xb: Tensor) -> Tensor:
        """(B, C, H, W) uint8 -> float32 ``(x / 255 - mean) / std``."""
        return xb.float().mul_(self._scale).sub_(self._shift)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, augment={self.augment}, crop_padding={self.crop_padding}, "
            f"flip={self.flip}, device={self.device}, seed={self.seed})"
        )


class IndexedBatches:
    """Wrap a loader whose labels encode the sample index; yield plain ``(x, y)``.

    The wrapped loader yields ``(x, code)`` with ``code = y + num_classes · index`` (see
    :func:`pat.producers.common.indexed_loader`): the loader's gather moves the index with
    its sample through shuffling and bagging at no extra cost. This wrapper decodes it, yields
    ``(x (B, ...), y (B,))`` to the loop and keeps the batch's sample indices in
    :attr:`indices` (B,) for a step rule that needs them.
    """

    def __init__(self, loader: Iterable[tuple[Tensor, Tensor]], num_classes: int) -> None:
        self.loader, self.num_classes = loader, num_classes
        self.indices: Tensor | None = None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to the wrapped loader, which seeds its shuffle with it."""
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, code in self.loader:
            self.indices = torch.div(code, self.num_classes, rounding_mode="floor")
            yield x, code - self.indices * self.num_classes
