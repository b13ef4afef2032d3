"""Training-step and inference cost of children against their dense parent (resnet20, CPU).

Claims (docs/masks.md):
* a masked child trains at the parent's speed: enforcing the masks after each optimizer
  step (one foreach multiply over weights and momentum) costs <= 5%;
* a physical child at 50% neuron sparsity is really cheaper: training step <= 0.6x and
  inference <= 0.5x of the parent's (half the channels: about a quarter of the MACs).

The arms run interleaved, round after round, in one process; the median per arm is
reported, since this machine is shared and single timings are noisy.

Run: python benchmarks/masked_step.py [--rounds 15] [--batch 128] [--threads N]
"""
# measured 2026-11-22 on 2 CPU cores shared with other jobs (load ~4.5; noisy), 11 rounds:
#   --threads 1: masked/parent train 0.985, physical/parent train 0.487, infer 0.459
#                (parent 1431 ms / 411 ms per step / forward; physical 68.8k params, 10.6M MACs)
#   default (2 threads): masked 1.030, physical train 0.771, infer 0.781 -- on this busy
#                machine 2 threads ran slower than 1 (parent 2649 ms), and the thin layers of
#                the physical child suffer most from the thread hand-offs.

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from pat.children import split
from pat.engine.masking import MaskEnforcer
from pat.masks import count_params_macs
from pat.models import create_model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, masked: bool):
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    enforcer = MaskEnforcer() if masked else None

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if enforcer is not None:
            enforcer.enforce(model, opt)  # what fit() calls in on_step_end

    return step


def make_infer(model: nn.Module, x: torch.Tensor):
    @torch.no_grad()
    def infer() -> None:
        model.eval()
        model(x)

    return infer


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    parent = create_model("resnet20")
    masked = split(parent, 2, method="anti-random")[0]
    physical = split(parent, 2, method="anti-random", level="neuron", physical=True)[0]
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    arms = {
        "train parent": make_step(parent, x, y, masked=False),
        "train masked": make_step(masked, x, y, masked=True),
        "train physical": make_step(physical, x, y, masked=False),
        "infer parent": make_infer(parent, x),
        "infer physical": make_infer(physical, x),
    }
    for fn in arms.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    probe = torch.zeros(1, 3, 32, 32)
    for name, model in (("parent", parent), ("masked", masked), ("physical", physical)):
        params, macs = count_params_macs(model, probe)
        print(f"{name:9s} params {params / 1e3:7.1f}k  MACs {macs / 1e6:6.1f}M")
    print(
        f"device: cpu, {torch.get_num_threads()} threads; resnet20, batch {args.batch}, "
        f"{args.rounds} interleaved rounds, medians"
    )
    for name, t in med.items():
        print(f"{name:15s} {t * 1e3:8.1f} ms")
    print(
        f"masked / parent training step:   {med['train masked'] / med['train parent']:.3f}  (target <= 1.05)"
    )
    print(
        f"physical / parent training step: {med['train physical'] / med['train parent']:.3f}  (target <= 0.6)"
    )
    print(
        f"physical / parent inference:     {med['infer physical'] / med['infer parent']:.3f}  (target <= 0.5)"
    )


if __name__ == "__main__":
    main()
