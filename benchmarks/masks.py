"""Mask generation speed: six anti-random children of WRN-28-10 against torch.rand.

Claim (docs/masks.md): the counter-based hash that makes masks identical on CPU and CUDA
costs little. Target: M = 6 anti-random (complement-pair) mask sets for WRN-28-10's
~36.5M prunable weights in <= 1.5 s on 2 CPU cores. The reference arm draws the same
number of floats with torch.rand once per pair (what a torch.Generator-based mask
would need at least), measured in the same process.

Run: python benchmarks/masks.py [--repeats 3] [--children 6] [--threads N]
"""
# re-measured 2026-11-22 after the change, machine otherwise idle (load ~1.3), best of 3:
#   default (2 threads): 2.14 s and 2.11 s (torch.rand alone 0.95 / 0.65 s; rand+kthvalue 3.15 / 2.89 s)
#   --threads 1:         1.86 s (torch.rand alone 0.94 s)
#   so the <= 1.5 s target is met in some runs (1.38 s below) but not reliably on these cores.
# measured 2026-11-22 on 2 CPU cores shared with other jobs (load ~1; noisy), best of 3,
# before/after the one-pass selection of large tensors, same conditions, back to back:
#   default (2 threads): 1.38 s (before: 1.45 s); torch.rand + kthvalue 2.59 s (0.53);
#                        torch.rand alone 0.62 s (ratio 2.2)
#   --threads 1:         1.49 s (before: 1.73 s); rand + kthvalue 3.16 s (0.47);
#                        torch.rand alone 0.91 s (ratio 1.6)
#   Repeated runs of generate_masks alone: 1.24 s (before 1.40 s) with 2 threads, 1.14 s
#   (before 1.33 s) with 1. Under heavier load (~4) both ran 2.1-2.6 s. The hash alone is
#   ~0.14 s per 36.5M weights; the selection of the mid-sized (0.2-1.8M) tensors is most
#   of the rest.

from __future__ import annotations

import argparse
import time

import torch

from pat.masks import generate_masks, prunable_parameters
from pat.models import create_model


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--children", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = {k: p.detach() for k, p in prunable_parameters(create_model("wrn-28-10")).items()}
    n = sum(p.numel() for p in params.values())
    pairs = (args.children + 1) // 2

    def hashed() -> None:
        generate_masks(params, children=args.children, method="anti-random")

    def reference() -> None:
        # torch.rand scores + a per-tensor median threshold, one draw per pair.
        for _ in range(pairs):
            for p in params.values():
                u = torch.rand(p.shape)
                keep = u <= u.view(-1).kthvalue((p.numel() + 1) // 2).values
                _ = ~keep

    def rand_only() -> None:
        # The floor: just drawing one float per weight per pair.
        for _ in range(pairs):
            for p in params.values():
                torch.rand(p.shape)

    print(
        f"device: cpu, {torch.get_num_threads()} threads; WRN-28-10: {len(params)} tensors, "
        f"{n / 1e6:.1f}M prunable weights; {args.children} anti-random children ({pairs} draws)"
    )
    t_hash = best_of(hashed, args.repeats)
    t_ref = best_of(reference, args.repeats)
    t_rand = best_of(rand_only, args.repeats)
    print(f"pat.masks (hash, exact counts): {t_hash:.2f} s   (target <= 1.5 s)")
    print(f"torch.rand + kthvalue:          {t_ref:.2f} s")
    print(f"torch.rand alone (the floor):   {t_rand:.2f} s")
    print(f"ratio hash / (rand + kthvalue): {t_hash / t_ref:.2f}")
    print(f"ratio hash / rand alone:        {t_hash / t_rand:.2f}")


if __name__ == "__main__":
    main()
