"""Mask generation speed: six anti-random children of WRN-28-10 against torch.rand.

Claim (docs/masks.md): the counter-based hash that makes masks identical on CPU and CUDA
costs little. Targets: M = 6 anti-random (complement-pair) mask sets for WRN-28-10's
~36.5M prunable weights in <= 1.5 s on 2 CPU cores, and <= 2 ms on a GPU. The reference
arms, measured in the same process on the same device: torch.rand once per pair (what a
torch.Generator-based mask would need at least), and torch.rand + a per-tensor kthvalue
median (the obvious exact implementation).

Run: python benchmarks/masks.py [--device cuda] [--repeats 5] [--children 6] [--threads N]
"""
# measured 2026-11-22, 2 CPU cores shared with other jobs (load ~1; noisy), best of 3,
# default threads (2), after the k-bit hash (one pass for every tensor size):
#   pat.masks 0.55 s; torch.rand + kthvalue 3.35 s (ratio 0.16); torch.rand alone 0.86 s
#   (ratio 0.64). Before it, same machine, same day: 2.39 s / 3.55 s / 1.04 s (2.29x rand).
#   Later runs the same day (--repeats 5): 0.40 s vs rand 0.57 s (0.69) with 2 threads,
#   0.62 s vs 0.61 s (1.01) with --threads 1; over all runs of the day 0.40-1.00 s.
#   These cores deliver about one core of throughput at times (two processes that each
#   spin a core ran 1.08x faster than one after the other), so figures move by up to 2x
#   between runs; compare the ratios.

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from pat.masks import generate_masks, prunable_parameters
from pat.models import create_model


def best_of(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up (allocator, CUDA kernels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--children", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = create_model("wrn-28-10").to(device)
    params = {k: p.detach() for k, p in prunable_parameters(model).items()}
    n = sum(p.numel() for p in params.values())
    pairs = (args.children + 1) // 2

    def hashed() -> None:
        generate_masks(params, children=args.children, method="anti-random")

    def reference() -> None:
        # torch.rand scores + a per-tensor median threshold, one draw per pair.
        for _ in range(pairs):
            for p in params.values():
                u = torch.rand(p.shape, device=device)
                keep = u <= u.view(-1).kthvalue((p.numel() + 1) // 2).values
                _ = ~keep

    def rand_only() -> None:
        # The floor: just drawing one float per weight per pair.
        for _ in range(pairs):
            for p in params.values():
                torch.rand(p.shape, device=device)

    target, unit, scale = (1.5, "s", 1.0) if device.type == "cpu" else (2.0, "ms", 1e3)
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(
        f"device: {device.type}, {threads}; WRN-28-10: {len(params)} tensors, "
        f"{n / 1e6:.1f}M prunable weights; {args.children} anti-random children ({pairs} draws)"
    )
    t_hash = best_of(hashed, args.repeats, device)
    t_ref = best_of(reference, args.repeats, device)
    t_rand = best_of(rand_only, args.repeats, device)
    print(f"pat.masks (hash, exact counts): {t_hash * scale:.2f} {unit}   (target <= {target} {unit})")
    print(f"torch.rand + kthvalue:          {t_ref * scale:.2f} {unit}")
    print(f"torch.rand alone (the floor):   {t_rand * scale:.2f} {unit}")
    print(f"ratio hash / (rand + kthvalue): {t_hash / t_ref:.2f}")
    print(f"ratio hash / rand alone:        {t_hash / t_rand:.2f}")


if __name__ == "__main__":
    main()
