# measured: vmap ran at 0.83x / 0.87x the speed of the Python loop for LeNet-L (loop 11.1 s,
# 16.6 s per batch) and 0.74x / 0.56x for ResNet-8 (loop 13.3 s, 15.1 s), two runs, M=8,
# batch 512x3x32x32, CPU, 2 cores shared with other jobs (load 4-7, so noisy), 2026-11-22;
# outputs equal to 5e-8. Hence auto = loop on CPU (1.00x the faster path in both runs).
# Not yet measured on CUDA, where auto picks vmap: run with --device cuda to check.
"""Time to run M ensemble members on one batch: Python loop against torch.func vmap.

Both arms compute the same ``(M, B, C)`` softmax with :class:`pat.ensemble.predict.MemberRunner`
(eval mode, ``torch.inference_mode``) on M members of one architecture (masked children
have the parent's shapes, so they qualify for vmap). The weights are stacked once per
runner, as ``collect_probs`` does once per split, so stacking is timed apart. Arms run
alternately, several rounds, and the median is kept: the machines here are shared.

    python benchmarks/ensemble_inference.py [--device cuda] [--members 8] [--batch 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pat.ensemble.predict import MemberRunner, choose_path
from pat.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(runner: MemberRunner, x: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        runner(x)
    _sync(device)
    return time.perf_counter() - start


def bench(arch: str, members: int, batch: int, rounds: int, device: torch.device) -> None:
    torch.manual_seed(0)
    models = [create_model(arch).to(device).eval() for _ in range(members)]
    x = torch.rand(batch, 3, 32, 32, device=device)
    start = time.perf_counter()
    runners = {"loop": MemberRunner(models, device=device, path="loop"),
               "vmap": MemberRunner(models, device=device, path="vmap")}
    stack_s = time.perf_counter() - start
    with torch.inference_mode():
        ref = runners["loop"](x)
        err = float((runners["vmap"](x) - ref).abs().max())  # also warms both arms up
    times: dict[str, list[float]] = {"loop": [], "vmap": []}
    for _ in range(rounds):
        for path, runner in runners.items():
            times[path].append(_time(runner, x, device))
    loop, vmap = (statistics.median(times[p]) for p in ("loop", "vmap"))
    auto = choose_path(models, device)
    faster = min(loop, vmap)
    auto_time = loop if auto == "loop" else vmap
    params = sum(p.numel() for p in models[0].parameters())
    print(f"{arch}: M={members} x {params / 1e6:.2f}M params, batch {batch}x3x32x32, {device}")
    print(f"  loop {loop * 1e3:8.1f} ms   vmap {vmap * 1e3:8.1f} ms   "
          f"vmap speed = {loop / vmap:.2f}x loop   (max |diff| {err:.1e}, setup {stack_s * 1e3:.0f} ms)")
    print(f"  auto picks {auto!r}: {faster / auto_time:.2f}x the speed of the faster path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=["lenet-l", "resnet8"])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for arch in args.archs:
        bench(arch, args.members, args.batch, args.rounds, device)


if __name__ == "__main__":
    main()
