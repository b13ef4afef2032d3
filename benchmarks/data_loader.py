# measured: DeviceLoader 83k-144k images/s vs DataLoader+v2 (workers=2) 1.8k-5.5k images/s,
# ratio 24x-55x (workers=0: 42x-47x); CPU, 2 cores shared with other jobs (load 2-6, so noisy),
# 10k synthetic 3x32x32 images, batch 128, 2 epochs, 2026-11-22. Not yet measured on CUDA.
"""Images/s of pat's DeviceLoader against torchvision's DataLoader, same augmentation.

Both arms feed the standard CIFAR recipe (random crop 32 with zero padding 4, random
horizontal flip, normalise) from the same synthetic uint8 3x32x32 images and deliver
float32 batches on the same device. The DataLoader arm applies ``torchvision.transforms.v2``
per sample in worker processes, collates and copies each batch to the device; the
DeviceLoader holds the set on the device and makes each batch with one gather.

    python benchmarks/data_loader.py [--device cuda] [--images 10000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from pat.data import DeviceLoader

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class TransformedTensors(torch.utils.data.Dataset):
    """uint8 (N, 3, 32, 32) images with a per-sample transform, as a torchvision pipeline has."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: v2.Transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.x[i]), self.y[i]


def images_per_second(
    batches, device: torch.device, epochs: int, warmup: int = 3
) -> tuple[float, int]:
    """Iterate ``epochs`` full epochs (after ``warmup`` untimed batches); return (images/s, images)."""
    for i, (xb, _) in enumerate(batches):
        xb.to(device, non_blocking=True)
        if i + 1 == warmup:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        for xb, yb in batches:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            seen += len(xb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    print(
        f"device {device}, {args.images} images 3x32x32 uint8, batch {args.batch_size}, {args.epochs} epochs, torch threads {torch.get_num_threads()}"
    )

    ours = DeviceLoader(
        x,
        y,
        mean=MEAN,
        std=STD,
        batch_size=args.batch_size,
        shuffle=True,
        augment=True,
        device=device,
    )
    ours_rate, _ = images_per_second(ours, device, args.epochs)
    print(f"  DeviceLoader (augment on)             {ours_rate:>10,.0f} images/s")

    transform = v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    data = TransformedTensors(x, y, transform)
    for workers in (2, 0):
        loader = DataLoader(
            data,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        rate, _ = images_per_second(loader, device, args.epochs)
        print(
            f"  DataLoader + v2 transforms, workers={workers} {rate:>10,.0f} images/s   ratio DeviceLoader/DataLoader = {ours_rate / rate:.1f}x"
        )


if __name__ == "__main__":
    main()
