# measured (python benchmarks/producers.py --seeds 3 --epochs 6; CPU, 2 cores shared with
# other jobs, so timings are noisy; 2026-11-22). digits: 1295 train images = 11 steps of 128
# per epoch, so 6 epochs = 66 optimizer steps: the small-budget regime, far from converged.
# speed, batch 128 lenet-s: SAM/SGD step 2.99x (a smoke run minutes earlier: 1.70x; the
#   ideal is ~2x); mixed step with half the batch in the SAM subset / SAM step 1.41x (three
#   smaller passes instead of two); per-sample sharpness of 64 samples, loop/vmap 8.9x (1.85x
#   in the smoke run), values equal.
# test metrics, mean ± s.e. over 3 seeds:
#   LR pool (4 policies x LRs 0.1, 0.05 = 8 members)
#     best single (by val)   acc 0.892±0.022  nll 0.370±0.066  ece 0.102±0.009
#     mean of all 8          acc 0.915±0.003  nll 0.668±0.062  ece 0.343±0.037  (underfit low-LR members blur it)
#     greedy team (<=4)      acc 0.906±0.009  nll 0.346±0.046  ece 0.113±0.020
#   StarSSE vs SSE (start: lenet-s trained 6 epochs; member 1 +3 epochs, 3 cycles of 3 epochs,
#   cycle LR 0.04)
#     StarSSE member mean    acc 0.931±0.018  nll 0.251±0.053  ece 0.067±0.008
#     StarSSE ensemble of 4  acc 0.951±0.013  nll 0.227±0.045  ece 0.091±0.015  disagree 0.069
#     SSE member mean        acc 0.941±0.019  nll 0.214±0.059  ece 0.058±0.010
#     SSE ensemble of 4      acc 0.967±0.009  nll 0.180±0.046  ece 0.090±0.021  disagree 0.075
#     (SSE member k has trained k cycles, StarSSE members one: SSE had more training here)
#   3 members, 6 epochs (SharpBalance: 3 full-SAM + 3 mixed), rho 0.05, lr 0.05 cosine
#     plain ensemble        acc 0.908±0.011  nll 0.598±0.093  ece 0.284±0.044  disagree 0.250±0.090
#     SAM-only ensemble     acc 0.883±0.011  nll 0.646±0.019  ece 0.277±0.011  disagree 0.162±0.002
#     SharpBalance ensemble acc 0.890±0.014  nll 0.630±0.019  ece 0.275±0.013  disagree 0.159±0.003
#     member means: plain 0.817±0.049, SAM 0.843±0.004, SharpBalance 0.848±0.009 accuracy
#   In this regime SharpBalance is within noise of SAM-only (slightly better NLL and member
#   accuracy, no gain in disagreement); no claim about converged CIFAR-sized runs follows.
"""The three alternative producers on digits, and the cost of their step rules.

Speed (two arms side by side in one process, same model, same batches):
  * SAM step vs plain SGD step (SAM needs two forward/backward passes: expect ~2x);
  * the mixed SharpBalance step (half the batch in the SAM subset) vs the SAM step;
  * per-sample sharpness with one ``torch.func.vmap(grad)`` vs a per-sample Python loop.

Accuracy (digits, lenet-s, mean ± standard error over seeds; accuracy, NLL and ECE on test):
  * LR pool: best single member (by val accuracy) vs the mean of all members vs a greedy
    team (Caruana selection on val, size 4);
  * StarSSE vs SSE from the same fine-tuned start: members' mean and their ensemble;
  * SharpBalance vs SAM-only vs plain ensembles of 3 members, with pairwise disagreement.

Budgets: digits keeps 1295 training images (after val and test), so one epoch is 11 optimizer
steps of 128; the script prints the exact sizes.

    python benchmarks/producers.py [--seeds 3] [--epochs 6] [--arms speed,pool,starsse,sharpbalance]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pat.config import DataConfig
from pat.data import IndexedBatches, load_dataset
from pat.engine.checkpoint import load_model
from pat.engine.sam import MixedSAMStep, SAMStep, per_sample_sharpness
from pat.engine.steps import sgd_step
from pat.ensemble import GreedySelector, collect_probs, pairwise_disagreement
from pat.ensemble.metrics import accuracy, ece, nll
from pat.models import create_model
from pat.parent import train_parent
from pat.producers.lr_pool import PoolConfig, train_pool
from pat.producers.sharpbalance import SharpBalanceConfig, train_sharpbalance
from pat.producers.starsse import StarSSEConfig, train_starsse


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def speed(data, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model("lenet-s", num_classes=10, in_channels=1).to(device)
    x, y = next(iter(data.loader("train", batch_size=128, device=device)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctx = contextlib.nullcontext  # full precision: the step rules' autocast factory
    sgd = timed(lambda: sgd_step(model, x, y, opt, F.cross_entropy, ctx), 30)
    sam = timed(lambda: SAMStep(0.05)(model, x, y, opt, F.cross_entropy, ctx), 30)
    idx = torch.arange(len(y), device=x.device)
    batches = IndexedBatches([(x, y + 10 * idx)], 10)
    list(batches)  # sets .indices
    half = torch.arange(len(y), device=x.device) % 2 == 0
    mixed = timed(lambda: MixedSAMStep(0.05, half, batches)(model, x, y, opt, F.cross_entropy, ctx), 30)
    xs, ys = x[:64], y[:64]
    vm = timed(lambda: per_sample_sharpness(model, xs, ys), 5)

    def loop() -> torch.Tensor:
        model.eval()
        out = []
        for i in range(len(ys)):
            g = torch.autograd.grad(F.cross_entropy(model(xs[i:i + 1]), ys[i:i + 1]), list(model.parameters()))
            out.append(sum((t ** 2).sum() for t in g))
        model.train()
        return torch.stack(out)

    lp = timed(loop, 2)
    torch.testing.assert_close(per_sample_sharpness(model, xs, ys), loop(), rtol=1e-3, atol=1e-6)
    return {"sgd_ms": sgd * 1e3, "sam_ms": sam * 1e3, "sam_over_sgd": sam / sgd,
            "mixed_half_ms": mixed * 1e3, "mixed_over_sam": mixed / sam,
            "vmap_ms_64": vm * 1e3, "loop_ms_64": lp * 1e3, "loop_over_vmap": lp / vm}


def member_probs(ens, data, names=None):
    models = [load_model(ens.member_path(m))[0] for m in ens.members if names is None or m["name"] in names]
    val = collect_probs(models, data.loader("val", batch_size=512))
    test = collect_probs(models, data.loader("test", batch_size=512))
    return val, test


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}


def disagreement(probs: torch.Tensor) -> float:
    d = pairwise_disagreement(probs)
    m = d.shape[0]
    return float((d.sum() - d.diagonal().sum()) / (m * (m - 1)))


def pool_arm(data, seed: int, epochs: int, out: Path) -> dict[str, dict[str, float]]:
    cfg = PoolConfig(model="lenet-s", data=DataConfig(dataset="digits", seed=0), epochs=epochs,
                     lrs=(0.1, 0.05), seed=100 * seed, device="cpu")
    ens = train_pool(cfg, out / f"pool{seed}", data=data)
    (pv, yv), (pt, yt) = member_probs(ens, data)
    best = max(range(len(pv)), key=lambda i: accuracy(pv[i], yv))
    greedy = GreedySelector(size=4).fit(pv, yv)
    w = torch.as_tensor(greedy.weights_, dtype=torch.float32)
    team = (pt[greedy.selected_] * w[:, None, None]).sum(0) / w.sum()
    return {"pool best single (by val)": scores(pt[best], yt),
            f"pool mean of all {len(pt)}": scores(pt.mean(0), yt) | {"disagree": disagreement(pt)},
            "pool greedy team (<=4)": scores(team, yt)}


def starsse_arm(data, seed: int, epochs: int, out: Path) -> dict[str, dict[str, float]]:
    from pat.config import TrainConfig

    parent = out / f"parent{seed}.pt"
    torch.manual_seed(seed)
    # the "pretrained" start: a lenet-s trained briefly on digits (no pretrained weights offline)
    train_parent(TrainConfig(model="lenet-s", data=DataConfig(dataset="digits"), epochs=epochs,
                             seed=seed, device="cpu", schedule="one-cycle"), data=data, out=parent)
    result = {}
    for sse in (False, True):
        cfg = StarSSEConfig(pretrained=str(parent), data=DataConfig(dataset="digits", seed=seed),
                            members=4, epochs=max(1, epochs // 2), cycle_epochs=max(1, epochs // 2),
                            lr=0.02, cycle_lr_mult=2.0, sse=sse, seed=seed, device="cpu")
        ens = train_starsse(cfg, out / f"{'sse' if sse else 'star'}{seed}", data=data)
        _, (pt, yt) = member_probs(ens, data)
        name = "SSE" if sse else "StarSSE"
        result[f"{name} member mean"] = {k: sum(scores(p, yt)[k] for p in pt) / len(pt) for k in ("acc", "nll", "ece")}
        result[f"{name} ensemble of 4"] = scores(pt.mean(0), yt) | {"disagree": disagreement(pt)}
    return result


def sharpbalance_arm(data, seed: int, epochs: int, out: Path) -> dict[str, dict[str, float]]:
    result = {}
    for mode in ("plain", "sam", "sharpbalance"):
        cfg = SharpBalanceConfig(model="lenet-s", data=DataConfig(dataset="digits", seed=seed), members=3,
                                 epochs=epochs, initial_epochs=max(1, epochs // 2), rho=0.05, lr=0.05,
                                 mode=mode, seed=100 * seed, device="cpu")
        ens = train_sharpbalance(cfg, out / f"{mode}{seed}", data=data)
        _, (pt, yt) = member_probs(ens, data)
        result[f"{mode} member mean"] = {k: sum(scores(p, yt)[k] for p in pt) / len(pt) for k in ("acc", "nll", "ece")}
        result[f"{mode} ensemble of 3"] = scores(pt.mean(0), yt) | {"disagree": disagreement(pt)}
    return result


def summarise(runs: list[dict[str, dict[str, float]]]) -> list[str]:
    lines = []
    for arm in runs[0]:
        keys = runs[0][arm].keys()
        parts = []
        for k in keys:
            vals = [r[arm][k] for r in runs]
            mean = sum(vals) / len(vals)
            se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) if len(vals) > 1 else float("nan")
            parts.append(f"{k} {mean:.4f}±{se:.4f}")
        lines.append(f"  {arm:32s} " + "  ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--arms", default="speed,pool,starsse,sharpbalance")
    parser.add_argument("--out", default=None, help="Keep the ensembles here (default: a temp dir).")
    parser.add_argument("--log", default=None, help="Append each finished arm's JSON here.")
    args = parser.parse_args()
    arms = args.arms.split(",")
    data = load_dataset("digits")
    print(f"device cpu, torch threads {torch.get_num_threads()}, digits train {len(data.train.y)} "
          f"(= {len(data.loader('train', batch_size=128))} steps of 128 per epoch), val {len(data.val.y)}, "
          f"test {len(data.test.y)}; lenet-s, {args.epochs} epochs, seeds {args.seeds}", flush=True)
    if "speed" in arms:
        s = speed(data, "cpu")
        print("speed (batch 128, lenet-s, CPU): " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()), flush=True)
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out or tmp.name)
    for arm, fn in (("pool", pool_arm), ("starsse", starsse_arm), ("sharpbalance", sharpbalance_arm)):
        if arm not in arms:
            continue
        runs = []
        start = time.perf_counter()
        for seed in range(args.seeds):
            runs.append(fn(data, seed, args.epochs, out))
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps({"arm": arm, "seed": seed, "result": runs[-1]}) + "\n")
        print(f"{arm} ({args.seeds} seeds, {time.perf_counter() - start:.0f}s), test metrics mean ± s.e.:")
        print("\n".join(summarise(runs)), flush=True)


if __name__ == "__main__":
    main()
