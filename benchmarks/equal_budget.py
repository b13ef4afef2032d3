"""Equal-budget benchmark: does a pat ensemble beat one model trained for the whole budget?

Every arm spends the same total training budget B (in epochs over the training split; each
row also shows optimizer steps, training FLOPs and seconds) unless marked:

- ``independent``: one model trained for B epochs. Its LR and schedule are chosen per seed on
  validation (grid ``--lrs`` x {parent, cosine}, by the best-epoch validation NLL), and its
  best epoch is picked on validation, never on test.
- ``snapshot``: one model trained for B epochs as M cosine cycles restarted at the chosen LR,
  one snapshot per cycle (Huang et al., "Snapshot Ensembles", ICLR 2017).
- ``deep (Mx)``: M independent models, B epochs each: M x the budget. The upper reference; its
  calibrated-NLL-vs-size curve gives every arm's deep-ensemble equivalent (DEE).
- ``pat ...``: :func:`pat.allocate_budget` splits B between a parent and its children; the
  parent's LR is chosen on validation with the same grid at its own length; children are
  split from it and tuned with :func:`pat.tune`. ``pat default`` is the library's default
  recipe; the other ``pat`` rows are the recovery variants studied in issue 11 (``--variants``).
- ``parent``: the PAT default's parent alone (its share of the budget), the floor the
  ensemble must not fall below.

Metrics are on the test split: accuracy, NLL, and NLL / ECE / Brier after temperature
scaling (one temperature per arm, fitted on validation); mean ± standard error over seeds.
The last lines give paired t-tests over seeds of ``pat default`` against ``independent``.

    python benchmarks/equal_budget.py --budget 48 [--seeds 5] [--batch-size 128]
        [--dataset digits | --dataset cifar10 --data-dir D] [--model lenet-s]
        [--variants all | name,name] [--deep 5] [--paper]

``--paper`` adds the arms of the paper's small-budget experiment (Adam at 1e-3, constant LR,
8 children x 1 epoch at half the budget), which this script replaces.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from pat.children import split
from pat.config import DataConfig, TrainConfig, TuneConfig
from pat.data import Dataset, load_dataset
from pat.engine.callbacks import Callback, FitState
from pat.engine.cost import example_input, fit_cost, sum_costs
from pat.engine.loop import fit, resolve_device
from pat.engine.optim import create_optimizer
from pat.engine.schedules import create_schedule
from pat.ensemble.calibration import fit_temperature, size_curve, deep_ensemble_equivalent
from pat.ensemble.metrics import accuracy, brier, ece, nll
from pat.ensemble.predict import collect_logits
from pat.parent import train_parent
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


def train_best(args: argparse.Namespace, data: Dataset, epochs: int, seed: int,
               cache: dict) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The best of the LR x schedule grid on validation, at its best validation epoch.

    Returns the model, its cost (the chosen run only: the grid search is the same care the
    PAT parent gets) and what was chosen.
    """
    key = (epochs, seed)
    if key not in cache:
        best = None
        for schedule in ("parent", "cosine"):
            for lr in args.lrs:
                keeper = BestOnVal()
                result = train_parent(train_config(args, epochs, lr, schedule, seed), data=data,
                                      callbacks=[keeper])
                if best is None or keeper.best < best[0]:
                    result.model.load_state_dict(keeper.state)
                    best = (keeper.best, result.model, result.cost,
                            {"lr": lr, "schedule": schedule, "best_epoch": keeper.epoch})
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


VARIANTS: dict[str, Recipe] = {
    "ar-0.5 x6": Recipe(),
    "ar-0.5 x2": Recipe(children=2),
    "ar-0.5 x4": Recipe(children=4),
    "cyclic d0.7 x6": Recipe(method="cyclic", sparsity=0.3),
    "cyclic d0.8 x6": Recipe(method="cyclic", sparsity=0.2),
    "random s0.2 x6": Recipe(method="random", sparsity=0.2),
    "random s0.1 x6": Recipe(method="random", sparsity=0.1),
    "dense x6": Recipe(method="random", sparsity=0.0),
    "share 0.25": Recipe(parent_share=0.25),
    "share 0.75": Recipe(parent_share=0.75),
    "lr x0.5": Recipe(lr_scale=0.5),
    "lr x2": Recipe(lr_scale=2.0),
    "constant lr": Recipe(schedule="constant"),
    "bagging 0.8": Recipe(bagging=0.8),
    "neuron partition x2": Recipe(children=2, method="partition", level="neuron", sparsity=None),
    "neuron physical cyclic d0.7": Recipe(method="cyclic", sparsity=0.3, level="neuron",
                                          physical=True, equal_flops=True),
}


def allocation(budget: int, recipe: Recipe) -> tuple[int, int]:
    """(parent epochs, epochs per child): children get whole epochs, the remainder goes to the parent."""
    child = max(1, round(budget * (1 - recipe.parent_share)) // recipe.children)
    return budget - child * recipe.children, child


def pat_members(args: argparse.Namespace, data: Dataset, budget: int, recipe: Recipe, seed: int,
                cache: dict) -> tuple[list[nn.Module], dict[str, Any], nn.Module, dict[str, Any]]:
    parent_epochs, child_epochs = allocation(budget, recipe)
    parent, parent_cost, chosen = train_best(args, data, parent_epochs, seed, cache)
    kids = split(parent, recipe.children, method=recipe.method, sparsity=recipe.sparsity,
                 level=recipe.level, physical=recipe.physical, seed=seed,
                 example_inputs=example_input(data, resolve_device(args.device)))
    epochs = child_epochs
    if recipe.equal_flops:
        dev = resolve_device(args.device)
        ratio = fit_flops(parent, data, dev) / fit_flops(kids[0], data, dev)
        epochs = max(1, round(child_epochs * ratio))
    config = TuneConfig(epochs=epochs, schedule=recipe.schedule, max_lr=chosen["lr"] * recipe.lr_scale,
                        lr=chosen["lr"] * recipe.lr_scale * 0.1, bagging=recipe.bagging, seed=seed,
                        device=args.device,
                        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir,
                                        batch_size=args.batch_size, seed=seed))
    kids = tune(kids, data, config)
    cost = sum_costs([parent_cost, *(k.pat_cost for k in kids)])
    info = {"parent_epochs": parent_epochs, "child_epochs": epochs, **chosen}
    return kids, cost, parent, {"cost": parent_cost, **info}


def fit_flops(model: nn.Module, data: Dataset, device: torch.device) -> int:
    from pat.engine.cost import forward_flops

    return forward_flops(model, example_input(data, device))


def paper_arms(args: argparse.Namespace, data: Dataset, budget: int, seed: int) -> dict[str, tuple]:
    """The paper's small-budget arms: Adam 1e-3, constant LR, half the budget to the parent."""
    def adam(epochs: int) -> nn.Module:
        cfg = replace(train_config(args, epochs, 1e-3, "constant", seed), optimizer="adam", weight_decay=0.0)
        return train_parent(cfg, data=data)

    arms = {}
    half = budget // 2
    parent = adam(half)
    for method in ("random", "anti-random"):
        kids = split(parent.model, 8, method=method, sparsity=0.5, seed=seed)
        n = max(1, half // 8)
        cfg = TuneConfig(epochs=n, schedule="one-cycle", max_lr=1e-3, optimizer="adam", weight_decay=0.0,
                         seed=seed, device=args.device,
                         data=DataConfig(dataset=args.dataset, batch_size=args.batch_size, seed=seed))
        kids = tune(kids, data, cfg)
        arms[f"paper {method} (8x{n} ep)"] = (kids, sum_costs([parent.cost, *(k.pat_cost for k in kids)]))
    full = adam(budget)
    arms["paper independent (adam)"] = ([full.model], full.cost)
    return arms


# -- evaluation ---------------------------------------------------------------------------------


def logits_of(models: list[nn.Module], data: Dataset, split_name: str) -> tuple[Tensor, Tensor]:
    return collect_logits(models, data.loader(split_name, batch_size=512))


def arm_row(members: list[nn.Module], cost: dict[str, Any], data: Dataset, *, epochs: float,
            steps_per_epoch: int, curve: Tensor | None) -> tuple[Row, Tensor, Tensor]:
    """Test metrics of the members' softmax mean, raw and temperature-scaled on validation."""
    val, vy = logits_of(members, data, "val")
    test, ty = logits_of(members, data, "test")
    val_lp = val.log_softmax(-1).exp().mean(0).log()
    test_lp = test.log_softmax(-1).exp().mean(0).log()
    t = fit_temperature(val_lp, vy, kind="logits")
    cal = (test_lp / t).softmax(-1)
    raw = test_lp.exp()
    row = {
        "acc": accuracy(raw, ty), "nll": nll(raw, ty), "nll_ts": nll(cal, ty), "ece_ts": ece(cal, ty),
        "brier_ts": brier(cal, ty), "T": t, "members": len(members),
        "member_acc": statistics.fmean(accuracy(p, ty) for p in test.softmax(-1)),
        "epochs": epochs, "steps": cost["steps"], "flops": cost["flops"], "seconds": cost["seconds"],
    }
    row["dee"] = deep_ensemble_equivalent(row["nll_ts"], curve)[0] if curve is not None else math.nan
    return row, val.softmax(-1), test.softmax(-1)


def run_seed(args: argparse.Namespace, data: Dataset, seed: int, variants: list[str]) -> dict[str, Row]:
    budget, steps = args.budget, len(data.loader("train", batch_size=args.batch_size))
    cache: dict = {}
    rows: dict[str, Row] = {}
    model, cost, chosen = train_best(args, data, budget, seed, cache)
    # the deep ensemble first: its size curve is every arm's DEE yardstick. Its members are
    # the independent model and M-1 more at the independent model's chosen LR and schedule.
    deep = [(model, cost)] + [train_fixed(args, data, budget, seed * 1000 + k, chosen) for k in range(1, args.deep)]
    deep_models = [m for m, _ in deep]
    curve = None
    if args.deep > 1:
        row, vp, tp = arm_row(deep_models, sum_costs([c for _, c in deep]), data,
                              epochs=budget * len(deep), steps_per_epoch=steps, curve=None)
        curve = size_curve(vp, data.val.y, tp, data.test.y)
        row["dee"] = float(len(deep))
        rows[f"deep ({args.deep}x budget)"] = row
    rows["independent"], _, _ = arm_row([model], cost, data, epochs=budget, steps_per_epoch=steps, curve=curve)
    rows["independent"].update({"lr": chosen["lr"], "best_epoch": chosen["best_epoch"]})
    members, cost = snapshot_members(args, data, budget, args.snapshots, chosen["lr"], seed)
    rows[f"snapshot ({args.snapshots} cycles)"], _, _ = arm_row(members, cost, data, epochs=budget,
                                                                steps_per_epoch=steps, curve=curve)
    for name in ["default", *variants]:
        recipe = default_recipe() if name == "default" else VARIANTS[name]
        kids, cost, parent, info = pat_members(args, data, budget, recipe, seed, cache)
        label = f"pat {name}"
        rows[label], _, _ = arm_row(kids, cost, data, epochs=budget, steps_per_epoch=steps, curve=curve)
        rows[label].update({k: info[k] for k in ("parent_epochs", "child_epochs")})
        if name == "default":
            rows["parent (pat default)"], _, _ = arm_row([parent], info["cost"], data,
                                                         epochs=info["parent_epochs"],
                                                         steps_per_epoch=steps, curve=curve)
    if args.paper:
        for name, (members, cost) in paper_arms(args, data, budget, seed).items():
            rows[name], _, _ = arm_row(members, cost, data, epochs=budget, steps_per_epoch=steps, curve=curve)
    return rows


def default_recipe() -> Recipe:
    """pat's default recipe, as :func:`pat.allocate_budget` and :class:`pat.TuneConfig` resolve it."""
    return Recipe()


# -- report -------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
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
    p.add_argument("--model", default="lenet-s")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lrs", default="0.05,0.1,0.2", help="SGD LR grid chosen from on validation")
    p.add_argument("--variants", default="", help="comma-separated recovery variants, or 'all'")
    p.add_argument("--deep", type=int, default=5, help="members of the deep-ensemble reference (0: none)")
    p.add_argument("--snapshots", type=int, default=4, help="cycles of the snapshot ensemble")
    p.add_argument("--paper", action="store_true", help="add the paper's small-budget arms (Adam 1e-3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.lrs = [float(v) for v in args.lrs.split(",")]
    variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_dataset(args.dataset, data_dir=args.data_dir, seed=0)
    steps = len(data.loader("train", batch_size=args.batch_size))
    print(f"{args.dataset}: train {len(data.train.y)}, val {len(data.val.y)}, test {len(data.test.y)}; "
          f"{args.model}, batch {args.batch_size} ({steps} steps/epoch); budget {args.budget} epochs; "
          f"{args.seeds} seeds; {torch.get_num_threads()} threads", flush=True)
    results = []
    for seed in range(args.seeds):
        results.append(run_seed(args, data, seed, variants))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print("\n".join(summarize(results)))
    print("independent: chosen LR per seed", [r["independent"]["lr"] for r in results],
          "best epoch", [r["independent"]["best_epoch"] for r in results])
    print("\n".join(paired(results, "pat default", "independent")))
    print("\n".join(paired(results, "pat default", "parent (pat default)")))
    print(f"mean ± standard error over {args.seeds} seeds; TS = temperature-scaled on validation; "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
