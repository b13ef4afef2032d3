# re-measured 2026-11-22 with pat's default rescaling of kept weights at the split (same
# machine, --threads 1, both batch sizes side by side; full tables in docs/benchmarks.md):
#   batch 128: independent 97.83±0.75 / NLL 0.090; PAT random 95.77±1.47 / 0.212;
#              PAT anti-random 96.21±0.32 / 0.218; ablation AR constant 97.38±0.58 / 0.106 (303 s)
#   batch 32:  independent 98.72±0.58 / 0.039; PAT random 98.55±0.41 / 0.062;
#              PAT anti-random 98.50±0.25 / 0.065; ablation R constant 98.77±0.15 / 0.051 (380 s)
# The figures below were measured before, i.e. what --no-rescale gives now.
# measured: digits, lenet-s, Adam lr 1e-3, 5 seeds, on 2 CPU cores shared with other jobs (the
# two batch sizes ran side by side with --threads 1), 2026-11-22. Test accuracy / NLL / ECE,
# mean±std (standard error); "member" = mean accuracy of the single members.
#   python benchmarks/small_budget.py --seeds 5 --batch-size 128 --threads 1   (11 steps/epoch)
#   arm                            ep steps  acc %              NLL                  ECE %             member
#   independent                    16   176  97.83±0.75 (0.33)  0.090±0.009 (0.004)   2.79±0.70 (0.31)  97.83
#   parent (reference)              8    88  94.87±1.57 (0.70)  0.182±0.037 (0.017)   5.76±2.05 (0.92)  94.87
#   PAT random (8x1 ep)            16   176  86.74±1.68 (0.75)  1.242±0.054 (0.024)  55.80±1.70 (0.76)  85.89
#   PAT anti-random (8x1 ep)       16   176  87.24±0.46 (0.20)  1.239±0.024 (0.011)  56.23±1.21 (0.54)  86.45
#   ablation R constant (2x4 ep)   16   176  94.32±0.85 (0.38)  0.250±0.018 (0.008)  10.36±1.84 (0.82)  93.31
#   ablation R one-cycle (2x4 ep)  16   176  93.82±1.20 (0.54)  0.338±0.023 (0.010)  16.13±0.74 (0.33)  93.29
#   ablation AR constant (2x4 ep)  16   176  94.37±0.67 (0.30)  0.252±0.013 (0.006)  10.63±2.01 (0.90)  93.48
#   ablation AR one-cycle (2x4 ep) 16   176  94.09±1.14 (0.51)  0.334±0.014 (0.006)  16.06±1.15 (0.51)  93.54
#   python benchmarks/small_budget.py --seeds 5 --batch-size 32 --threads 1    (41 steps/epoch)
#   independent                    16   656  98.72±0.58 (0.26)  0.039±0.017 (0.008)   1.16±0.30 (0.13)  98.72
#   parent (reference)              8   328  98.11±0.82 (0.37)  0.072±0.017 (0.008)   2.12±0.34 (0.15)  98.11
#   PAT random (8x1 ep)            16   656  96.49±0.96 (0.43)  0.240±0.007 (0.003)  13.63±1.57 (0.70)  95.57
#   PAT anti-random (8x1 ep)       16   656  96.55±1.02 (0.45)  0.236±0.003 (0.001)  13.43±1.55 (0.69)  95.66
#   ablation R constant (2x4 ep)   16   656  98.27±0.82 (0.37)  0.076±0.024 (0.011)   3.72±0.99 (0.44)  97.97
#   ablation R one-cycle (2x4 ep)  16   656  98.22±0.32 (0.14)  0.090±0.008 (0.004)   4.54±0.34 (0.15)  98.25
#   ablation AR constant (2x4 ep)  16   656  98.27±0.60 (0.27)  0.077±0.021 (0.009)   3.84±1.46 (0.65)  97.74
#   ablation AR one-cycle (2x4 ep) 16   656  98.16±0.25 (0.11)  0.089±0.006 (0.003)   4.56±0.25 (0.11)  98.05
#   ... --batch-size 32 --schedule constant --ablation-epochs 0 --threads 2 (constant-LR children)
#   PAT random (8x1 ep)            16   656  97.05±0.58 (0.26)  0.172±0.018 (0.008)   9.69±0.91 (0.41)  94.90
#   PAT anti-random (8x1 ep)       16   656  97.60±0.15 (0.07)  0.169±0.016 (0.007)   9.99±0.73 (0.33)  95.07
# Verdict on digits: independent > PAT(AR) >= PAT(R) in both regimes, not the paper's order;
# AR vs R is within one standard error except batch 32 + constant LR (~2 se); in the ablation
# constant LR beats one-cycle on NLL/ECE. Wall time 769 s (batch 128) and 997 s (batch 32). See docs/benchmarks.md.
"""Small-budget comparison of Prune and Tune at equal total epochs (Whitaker & Whitley, 2022).

Claim checked (paper, Adam at lr 1e-3 throughout, LeNet-S): with the same number of training
epochs, an ensemble of pruned-and-tuned children beats one independently trained model, and
anti-random children beat random ones:

    PAT anti-random  >  PAT random  >  independent

Arms, per seed (the default budget is 16 epochs for every arm):

1. ``independent``: one model trained 16 epochs (same init and batches as the parent, so it
   is the parent trained 8 epochs longer);
2. ``PAT random``: the parent (8 epochs), 8 children with independent random masks
   (sparsity 0.5), each tuned 1 epoch, softmax averaged;
3. ``PAT anti-random``: the same parent, 8 children as 4 complement pairs, each tuned 1 epoch.

Ablation (same parent; 2 children tuned ``--ablation-epochs`` each, 8 + 2 x 4 = 16 epochs):
random vs anti-random masks x constant LR (1e-3) vs one-cycle (max_lr 1e-3).

Budgets are printed as epochs and as optimizer steps: digits keeps 1295 training images, so
one epoch is 11 steps of 128 (41 of 32), and a child "tuned one epoch" takes only 11 steps.
Accuracy, NLL and ECE (15 bins) are on the test split; mean ± std (and standard error) over
seeds. References: Whitaker & Whitley, "Prune and Tune Ensembles", AAAI 2022.

    python benchmarks/small_budget.py [--seeds 5] [--batch-size 128] [--model lenet-s]
        [--dataset digits | --dataset cifar10 --data-dir D] [--ablation-epochs 4]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from pat.children import split
from pat.config import DataConfig, TrainConfig, TuneConfig
from pat.data import Dataset, load_dataset
from pat.ensemble.metrics import accuracy, classification_metrics
from pat.ensemble.predict import collect_probs, combine
from pat.parent import train_parent
from pat.tuner import tune

LR = 1e-3  # Adam, the paper's small-budget setting, for parent, independent and children
Row = dict[str, float]


def evaluate(models: list[nn.Module], data: Dataset) -> Row:
    """Test metrics of the softmax mean of ``models`` and the mean accuracy of its members."""
    probs, labels = collect_probs(models, data.loader("test", batch_size=512))  # (M, N, C)
    row = classification_metrics(combine(probs), labels)
    row["member_acc"] = statistics.fmean(accuracy(p, labels) for p in probs)
    return row


def train(args: argparse.Namespace, data: Dataset, epochs: int, seed: int) -> nn.Module:
    """A model trained from scratch with Adam at a constant ``LR`` (the paper's recipe)."""
    config = TrainConfig(
        model=args.model, epochs=epochs, optimizer="adam", lr=LR, weight_decay=0.0,
        schedule="constant", seed=seed, device=args.device,
        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, seed=seed),
    )  # fmt: skip
    return train_parent(config, data=data).model


def pat_arm(args: argparse.Namespace, data: Dataset, parent: nn.Module, *, children: int,
            method: str, epochs: int, schedule: str, seed: int) -> Row:
    """Split ``parent`` into ``children`` masked copies, tune each ``epochs``, evaluate the mean."""
    kids = split(parent, children, method=method, sparsity=0.5, seed=seed, rescale=args.rescale)
    config = TuneConfig(
        epochs=epochs, schedule=schedule, max_lr=args.max_lr, lr=LR, optimizer="adam",
        weight_decay=0.0, seed=seed, device=args.device,
        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, seed=seed),
    )  # fmt: skip
    return evaluate(tune(kids, data, config), data)


def run_seed(args: argparse.Namespace, data: Dataset, seed: int, steps: int) -> dict[str, Row]:
    """Every arm for one seed; each row also carries its budget in epochs and optimizer steps."""
    pe, ce, n = args.parent_epochs, args.child_epochs, args.children
    total = pe + n * ce
    rows: dict[str, Row] = {}

    def put(name: str, epochs: int, row: Row) -> None:
        rows[name] = {**row, "epochs": epochs, "steps": epochs * steps}

    put("independent", total, evaluate([train(args, data, total, seed)], data))
    parent = train(args, data, pe, seed)
    put("parent (reference)", pe, evaluate([parent], data))
    for method, label in (("random", "PAT random"), ("anti-random", "PAT anti-random")):
        row = pat_arm(args, data, parent, children=n, method=method, epochs=ce,
                      schedule=args.schedule, seed=seed)
        put(f"{label} ({n}x{ce} ep)", total, row)
    if args.ablation_epochs > 0:
        ae = args.ablation_epochs
        for method, label in (("random", "R"), ("anti-random", "AR")):
            for schedule in ("constant", "one-cycle"):
                row = pat_arm(args, data, parent, children=2, method=method, epochs=ae,
                              schedule=schedule, seed=seed)
                put(f"ablation {label} {schedule} (2x{ae} ep)", pe + 2 * ae, row)
    return rows


def summarize(results: list[dict[str, Row]]) -> list[str]:
    """Plain-text table: mean ± std (se) over seeds of each metric, one line per arm."""

    def cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        mean = statistics.fmean(values) * scale
        std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{mean:.{digits}f}±{std:.{digits}f} ({std / math.sqrt(len(values)):.{digits}f})"

    head = f"{'arm':34} {'ep':>3} {'steps':>5}  {'acc % mean±std (se)':22} {'NLL':22} {'ECE %':20} {'member acc %':>12}"
    lines = [head, "-" * len(head)]
    columns: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rows in results:
        for arm, row in rows.items():
            for key, value in row.items():
                columns[arm][key].append(value)
    for arm, col in columns.items():
        lines.append(
            f"{arm:34} {int(col['epochs'][0]):>3} {int(col['steps'][0]):>5}  "
            f"{cell(col['accuracy'], 100):22} {cell(col['nll'], digits=3):22} "
            f"{cell(col['ece'], 100):20} {statistics.fmean(col['member_acc']) * 100:>12.2f}"
        )  # fmt: skip
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--model", default="lenet-s")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--parent-epochs", type=int, default=8)
    p.add_argument("--children", type=int, default=8)
    p.add_argument("--child-epochs", type=int, default=1)
    p.add_argument("--schedule", default="one-cycle", choices=("one-cycle", "constant"),
                   help="children's LR schedule in the main arms")
    p.add_argument("--max-lr", type=float, default=LR, help="one-cycle peak LR of the children")
    p.add_argument("--ablation-epochs", type=int, default=4, help="0 skips the 2-child ablation")
    p.add_argument("--no-rescale", dest="rescale", action="store_false",
                   help="children keep the parent's values on kept weights (the paper; pat rescales by n/kept)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.children % 2:
        p.error(f"--children must be even (anti-random children come in complement pairs). Got {args.children}.")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_dataset(args.dataset, data_dir=args.data_dir, seed=0)  # one fixed val/test carve
    steps = len(data.loader("train", batch_size=args.batch_size))
    print(f"{args.dataset}: train {len(data.train.y)}, val {len(data.val.y)}, test {len(data.test.y)}; "
          f"batch {args.batch_size} -> {steps} optimizer steps per epoch; model {args.model}; "
          f"Adam lr {LR}, children {args.schedule} (max_lr {args.max_lr}), "
          f"{'rescaled' if args.rescale else 'not rescaled'} at split; device "
          f"{'cuda' if args.device != 'cpu' and torch.cuda.is_available() else 'cpu'}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    results = []
    for seed in range(args.seeds):
        results.append(run_seed(args, data, seed, steps))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print("\n".join(summarize(results)))
    print(f"{args.seeds} seeds; member acc = mean accuracy of the single members; "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
