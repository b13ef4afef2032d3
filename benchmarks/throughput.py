"""Training-step throughput of a ResNet-18 on CIFAR-shaped synthetic data, with achieved TFLOP/s.

One epoch (``--steps`` steps) of SGD on random 3x32x32 images, bf16 autocast and channels_last
on CUDA (full precision on CPU). FLOPs are counted by torch's FLOP counter on one step.

    python benchmarks/throughput.py [--device cuda] [--steps 390] [--batch 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pat.engine.loop import autocast_for
from pat.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=390)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    dev = torch.device(args.device)
    model = create_model(args.model, num_classes=10, in_channels=3).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    autocast = autocast_for(dev, None)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    print(f"{args.model} on {dev}: {args.steps} steps of batch {args.batch} in {seconds:.2f} s, "
          f"{args.steps * args.batch / seconds:,.0f} images/s, {flops * args.steps / seconds / 1e12:.2f} TFLOP/s "
          f"({flops / 1e9:.2f} GFLOP per step)")


if __name__ == "__main__":
    main()
