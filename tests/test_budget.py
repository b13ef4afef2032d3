from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from pat.budget import BudgetConfig, allocate_budget
from pat.comparison import baseline_trend
from pat.config import (
    DataConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
    TuneConfig,
    from_dict,
    load_yaml,
)
from pat.engine.checkpoint import load_checkpoint
from pat.errors import PatError
from pat.pipeline import resolve_budget, run


@pytest.mark.parametrize("epochs", [3, 8, 16, 17, 48, 100, 301])
@pytest.mark.parametrize("children", [1, 2, 6, 9])
@pytest.mark.parametrize("bagging", [None, 0.8])
def test_allocation_adds_up_to_the_budget(epochs, children, bagging):
    a = allocate_budget(BudgetConfig(epochs=epochs), train_size=1295, batch_size=128, children=children,
                        bagging=bagging)
    child_pass = a.child_steps_per_epoch / a.steps_per_epoch
    assert a.parent_epochs >= 1 and a.child_epochs >= 1 and 1 <= a.children <= children
    # never more than the budget, and less by at most one parent epoch (whole-epoch rounding)
    assert a.spent_epochs <= epochs + 1e-9
    assert a.spent_epochs > epochs - 1 - child_pass
    assert a.steps == a.parent_epochs * a.steps_per_epoch + a.children * a.child_epochs * a.child_steps_per_epoch


def test_children_that_would_not_recover_are_not_made():
    # 8 child epochs of 11 steps for 6 children: 11 steps each, below 30 -> 2 children of 44
    a = allocate_budget(BudgetConfig(epochs=16, min_child_steps=30), train_size=1295, batch_size=128, children=6)
    assert (a.parent_epochs, a.children, a.child_epochs) == (8, 2, 4)
    # at the default minimum (10 steps) an epoch of 11 steps is enough for each of the six
    d = allocate_budget(BudgetConfig(epochs=16), train_size=1295, batch_size=128, children=6)
    assert (d.parent_epochs, d.children, d.child_epochs) == (10, 6, 1)
    # batch 256: 6 steps an epoch; 8 epochs for the children buy 4 children of 2 epochs (12 steps)
    e = allocate_budget(BudgetConfig(epochs=16), train_size=1295, batch_size=256, children=6)
    assert (e.parent_epochs, e.children, e.child_epochs) == (8, 4, 2)
    # a large budget keeps every child asked for
    b = allocate_budget(BudgetConfig(epochs=48), train_size=1295, batch_size=128, children=6)
    assert (b.parent_epochs, b.children, b.child_epochs) == (24, 6, 4)
    # a larger data set: one epoch is plenty of steps, all six children, whole epochs each
    c = allocate_budget(BudgetConfig(epochs=16), train_size=50_000, batch_size=128, children=6)
    assert (c.children, c.child_epochs) == (6, 1) and c.parent_epochs == 10


def test_steps_and_flops_budgets_are_converted_to_epochs():
    by_steps = allocate_budget(BudgetConfig(steps=176), train_size=1295, batch_size=128, children=2)
    by_epochs = allocate_budget(BudgetConfig(epochs=16), train_size=1295, batch_size=128, children=2)
    assert by_steps == by_epochs
    by_flops = allocate_budget(BudgetConfig(flops=16 * 1295 * 1000.0), train_size=1295, batch_size=128,
                               children=2, flops_per_sample=1000.0)
    assert by_flops == by_epochs
    with pytest.raises(PatError, match="FLOPs per sample"):
        allocate_budget(BudgetConfig(flops=1e9), train_size=1295, batch_size=128, children=2)


@pytest.mark.parametrize("cost", [0.05, 0.29, 0.5, 0.97])
@pytest.mark.parametrize("children", [2, 6])
def test_cheaper_children_get_the_epochs_their_cost_saves(cost, children):
    dense = allocate_budget(BudgetConfig(epochs=48), train_size=1295, batch_size=128, children=children)
    a = allocate_budget(BudgetConfig(epochs=48), train_size=1295, batch_size=128, children=children, child_cost=cost)
    assert a.children == dense.children and a.child_cost == cost
    # every epoch the cost saves goes to the children (rounded down to whole epochs each)
    assert a.child_epochs == int(dense.child_epochs / cost + 1e-6)
    assert 48 - 1 < a.spent_epochs <= 48 + 1e-9
    # a budget in steps counts optimizer steps, whatever each costs
    assert allocate_budget(BudgetConfig(steps=528), train_size=1295, batch_size=128, children=children,
                           child_cost=cost) == dense
    with pytest.raises(PatError, match=r"child_cost must be in \(0, 1\]. Got 1.5"):
        allocate_budget(BudgetConfig(epochs=48), train_size=1295, batch_size=128, children=2, child_cost=1.5)


@pytest.mark.parametrize("epochs", [8, 16, 48, 301])
@pytest.mark.parametrize("children", [2, 6])
@pytest.mark.parametrize("cost", [1.0, 0.29])
def test_a_batchnorm_recomputation_is_charged_to_each_child(epochs, children, cost):
    kw = {"train_size": 50_000, "batch_size": 128, "children": children, "child_cost": cost}
    free = allocate_budget(BudgetConfig(epochs=epochs), **kw)
    a = allocate_budget(BudgetConfig(epochs=epochs), **kw, recompute_bn=True)
    # each child pays a forward pass over its data (a third of its epoch) before its first step
    assert a.child_passes == a.child_epochs + 1 / 3 and a.recompute_bn
    assert a.spent_epochs == pytest.approx(a.parent_epochs + a.children * (a.child_epochs + 1 / 3) * cost)
    assert epochs - 1 - cost < a.spent_epochs <= epochs + 1e-9
    assert a.children * a.child_epochs <= free.children * free.child_epochs and a.parent_epochs >= round(epochs / 2)
    # a budget in steps counts optimizer steps: the pass takes none
    steps = BudgetConfig(steps=epochs * a.steps_per_epoch)
    assert allocate_budget(steps, **kw, recompute_bn=True) == allocate_budget(steps, **kw)


def test_a_batchnorm_charge_moves_child_epochs_back_to_the_parent():
    kw = {"train_size": 50_000, "batch_size": 128, "children": 6}
    assert allocate_budget(BudgetConfig(epochs=48), **kw).child_epochs == 4
    a = allocate_budget(BudgetConfig(epochs=48), **kw, recompute_bn=True)
    assert (a.parent_epochs, a.children, a.child_epochs, a.spent_epochs) == (28, 6, 3, 48)
    assert "BatchNorm recomputation costs a third of its epoch" in a.describe()
    with pytest.raises(PatError, match="leaves no child a single epoch"):  # 1 epoch left, 4/3 needed
        allocate_budget(BudgetConfig(epochs=3), **kw, recompute_bn=True)


@pytest.mark.parametrize("kwargs, words", [
    ({}, "exactly one of epochs, steps, flops. Got none"),
    ({"epochs": 4, "steps": 10}, "Got epochs, steps"),
    ({"epochs": -1}, "budget.epochs must be a positive number. Got -1"),
    ({"steps": "ten"}, "budget.steps must be a positive number. Got 'ten'"),
    ({"epochs": 8, "parent_share": 1.0}, "parent_share must be in (0, 1). Got 1.0"),
    ({"epochs": 8, "min_child_steps": 0}, "min_child_steps must be a positive integer. Got 0"),
])  # fmt: skip
def test_bad_budgets_are_refused_with_the_argument(kwargs, words):
    with pytest.raises(PatError) as e:
        BudgetConfig(**kwargs)
    assert words in str(e.value)


def test_the_parents_share_follows_the_children_unless_the_budget_gives_it(digits):
    """Physical children, cheap enough to tune for several times a masked child's epochs, get a
    quarter-budget trunk; masked children a half one; a share the budget gives is kept (decision 74)."""
    kw = {"train_size": 1295, "batch_size": 128, "children": 2}
    masked = allocate_budget(BudgetConfig(epochs=48), **kw)
    physical = allocate_budget(BudgetConfig(epochs=48), **kw, child_cost=0.29, physical=True)
    assert (masked.parent_epochs, masked.parent_share) == (24, 0.5)
    assert (physical.parent_epochs, physical.parent_share, physical.child_epochs) == (12, 0.25, 62)
    assert physical.spent_epochs <= 48 and physical.as_dict()["parent_share"] == 0.25
    given = allocate_budget(BudgetConfig(epochs=48, parent_share=0.5), **kw, child_cost=0.29, physical=True)
    assert (given.parent_epochs, given.parent_share) == (24, 0.5)
    steps = allocate_budget(BudgetConfig(steps=528), **kw, physical=True)  # steps: the share still follows
    assert steps.parent_epochs == 12
    # pat run's default split is physical: its trunk gets a quarter of the budget
    resolved, a = resolve_budget(RunConfig(budget=BudgetConfig(epochs=48)), digits)
    assert resolved.parent.epochs == a.parent_epochs == 12 and a.children == 2
    six = RunConfig(budget=BudgetConfig(epochs=48), split=SplitConfig(children=6))
    assert resolve_budget(six, digits)[0].parent.epochs == 24
    with pytest.raises(PatError, match="budget.parent_share must be in \\(0, 1\\). Got True"):
        BudgetConfig(epochs=48, parent_share=True)


def test_budget_too_small_for_one_child_epoch():
    with pytest.raises(PatError, match="leaves no child a single epoch"):
        allocate_budget(BudgetConfig(epochs=1), train_size=1295, batch_size=128, children=2)


def test_run_config_reads_a_budget_and_resolves_it(digits):
    masked = {"children": 6, "level": "connection", "physical": False, "method": "random", "sparsity": 0.2}
    config = from_dict(RunConfig, {"budget": {"epochs": 48}, "split": masked})
    assert config.budget == BudgetConfig(epochs=48) and config.split == SplitConfig(children=6)
    resolved, allocation = resolve_budget(config, digits)
    assert (resolved.parent.epochs, resolved.split.children, resolved.tune.epochs) == (24, 6, 4)
    # the parent is a trunk at a constant LR and the children peak at that LR
    assert resolved.parent.schedule == "constant" and resolved.tune.max_lr == resolved.parent.lr
    annealed, _ = resolve_budget(from_dict(RunConfig, {"budget": {"epochs": 48, "trunk": False}}), digits)
    assert annealed.parent.schedule == RunConfig().parent.schedule and annealed.tune.max_lr is None
    explicit, _ = resolve_budget(from_dict(RunConfig, {"budget": {"epochs": 48}, "tune": {"max_lr": 0.3}}), digits)
    assert explicit.tune.max_lr == 0.3
    assert resolved.budget == config.budget and allocation.children == 6
    assert resolve_budget(resolved, digits)[0] == resolved  # resolving twice changes nothing
    with pytest.raises(PatError, match="config.budget has unknown keys"):
        from_dict(RunConfig, {"budget": {"epoch": 48}})
    with pytest.raises(PatError, match=r"budget must be a mapping such as \{epochs: 48\}. Got 48"):
        from_dict(RunConfig, {"budget": 48})
    with pytest.raises(PatError, match="baseline must be true or false. Got 'yes'"):
        from_dict(RunConfig, {"baseline": "yes"})
    two_batches = RunConfig(tune=TuneConfig(data=DataConfig(batch_size=32)), budget=BudgetConfig(epochs=8))
    with pytest.raises(PatError, match="one batch size for parent and children"):
        resolve_budget(two_batches, digits)


@pytest.mark.slow
def test_run_with_a_budget_writes_the_allocation_and_the_validation_check(tmp_path):
    data = DataConfig(dataset="digits", batch_size=128)
    config = RunConfig(parent=TrainConfig(epochs=1, lr=0.05, data=data), split=SplitConfig(children=6),
                       tune=TuneConfig(epochs=1, max_lr=0.05, data=data), budget=BudgetConfig(epochs=6),
                       baseline=True, out=str(tmp_path / "run"))
    lines = []
    result = run(config, announce=lines.append)
    a = result.allocation
    assert lines == [f"split: {a.children} masked children (connection level, random at sparsity 0.2)",
                     a.describe()] and a.parent_epochs + a.children * a.child_epochs == 6
    saved = load_yaml(tmp_path / "run" / "config.yaml")
    assert (saved["parent"]["epochs"], saved["split"]["children"], saved["tune"]["epochs"]) == (
        a.parent_epochs, a.children, a.child_epochs)
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads(text.splitlines()[1].removeprefix("# allocation: ")) == a.as_dict()
    assert from_dict(RunConfig, yaml.safe_load(text)) == resolve_budget(config, result_data())[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["allocation"] == a.as_dict()
    check = metrics["validation"]
    assert check["members"] == a.children
    lost, won = check["flips"]["lost"], check["flips"]["won"]
    diff = check["nll_diff"]
    assert diff["mean"] == pytest.approx(check["ensemble"]["nll"] - check["parent"]["nll"], abs=1e-5)
    assert check["worse"] == (lost - won > 1.96 * (lost + won) ** 0.5 or diff["mean"] > 1.96 * diff["se"])
    assert check["parent_at_chance"] == (check["parent"]["accuracy"] <= 1.5 / 10)
    # the baseline is the parent's recipe as configured for the whole budget, not the trunk's
    baseline = load_checkpoint(tmp_path / "run" / "independent.pt")["config"]
    assert baseline["epochs"] == 6 and baseline["schedule"] == config.parent.schedule
    assert result.rows[-1]["name"] == "independent (6 ep)"
    history = load_checkpoint(tmp_path / "run" / "independent.pt")["history"]
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert metrics["baseline_trend"] == {"best_epoch": best, "epochs": 6, "still_improving": best == 6}
    assert result.baseline_trend == metrics["baseline_trend"]
    run(config)  # a rerun of the same budgeted config continues the same run


def result_data():
    from pat.data import load_dataset

    return load_dataset("digits")


def _history(losses):
    return [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(losses)]


@pytest.mark.parametrize(("losses", "best", "still"), [
    ([0.9, 0.5, 0.4, 0.3], 4, True),  # best at the last epoch: still improving
    ([0.9, 0.3, 0.4, 0.5], 2, False),
    ([1.0 - i / 100 for i in range(95)] + [0.01], 96, True),  # the last tenth of 96 is epochs 87-96
    ([1.0 - i / 100 for i in range(87)] + [0.9] * 9, 87, True),
    ([1.0 - i / 100 for i in range(86)] + [0.9] * 10, 86, False),
    ([0.5, float("nan"), 0.6], 1, False),  # a diverged epoch is not a best one
])  # fmt: skip
def test_baseline_trend_says_whether_one_model_was_still_improving(losses, best, still):
    assert baseline_trend(_history(losses)) == {"best_epoch": best, "epochs": len(losses), "still_improving": still}
    assert baseline_trend([{"epoch": 1, "train_loss": 0.3}]) is None  # no validation split


def test_the_run_notes_when_one_model_was_still_improving():
    from pat.cli.children import _trend_line
    from pat.cli.render import console

    for trend, shown in (({"best_epoch": 95, "epochs": 96, "still_improving": True}, True),
                         ({"best_epoch": 40, "epochs": 96, "still_improving": False}, False), (None, False)):
        with console.capture() as captured:
            _trend_line(trend)
        text = captured.get()
        assert ("lowest validation loss at epoch 95 of 96" in text and "docs/tuning.md" in text) == shown
        assert bool(text) == shown


def test_a_budget_charges_physical_children_their_flops(tmp_path, digits):
    """A budgeted run of physical children: each child step is charged the child's FLOPs share,
    measured before the parent trains; the run and its baseline spend the same FLOPs."""
    import torch

    from pat.engine.checkpoint import load_model
    from pat.engine.cost import example_input, forward_flops
    from pat.ensemble.ensemble import Ensemble

    data = DataConfig(dataset="digits", batch_size=128)
    config = RunConfig(parent=TrainConfig(lr=0.05, data=data), tune=TuneConfig(data=data),
                       split=SplitConfig(children=2, level="neuron", method="partition", sparsity=None, physical=True),
                       budget=BudgetConfig(epochs=4), baseline=True, out=str(tmp_path / "run"))
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    resolved, a = resolve_budget(config, digits)
    assert torch.equal(torch.random.get_rng_state(), state)  # measuring the children moved no seed
    masked = resolve_budget(dataclasses.replace(config, split=SplitConfig(children=2)), digits)[1]
    assert (masked.parent_epochs, masked.child_epochs) == (2, 1)  # half the budget, then a dense epoch each
    # a quarter to the trunk (decision 74), the rest in child epochs at the children's cost
    assert a.parent_epochs == 1 and a.child_cost < 1 / 3
    assert a.child_epochs == int((4 - a.parent_epochs) / (2 * a.child_cost)) >= 3 * masked.child_epochs
    result = run(config)
    run_dir = tmp_path / "run"
    x = example_input(digits)
    parent = forward_flops(load_model(run_dir / "parent.pt")[0], x)
    members = Ensemble.load(run_dir / "children").members
    # the cost measured on a freshly built model is the trained parent's children's
    assert a.child_cost == pytest.approx(sum(forward_flops(m, x) for m in members) / len(members) / parent)
    assert load_yaml(run_dir / "config.yaml")["tune"]["epochs"] == a.child_epochs
    # what the parent and children spent is the budget (less at most one epoch), and the baseline's
    spent = load_checkpoint(run_dir / "parent.pt")["cost"]["flops"] + sum(
        load_checkpoint(run_dir / "children" / f"child-{i}.pt")["cost"]["flops"] for i in range(2))
    budget = 3 * parent * len(digits.train.y) * 4
    assert budget - 3 * parent * len(digits.train.y) < spent <= budget * 1.001
    independent = load_checkpoint(run_dir / "independent.pt")
    assert independent["config"]["epochs"] == 4 and a.spent_epochs <= 4  # the whole budget, not less
    assert result.rows[-1]["name"] == "independent (4 ep)"


@pytest.mark.slow
def test_a_budget_charges_the_children_their_batchnorm_recomputation(tmp_path, digits):
    """A budgeted run of a model with BatchNorm: the forward pass that recomputes each child's
    statistics is inside the budget, as its checkpoint records it."""
    from pat.engine.checkpoint import load_model
    from pat.engine.cost import example_input, forward_flops

    data = DataConfig(dataset="digits", batch_size=128)
    config = RunConfig(parent=TrainConfig(model="resnet8", lr=0.05, data=data), tune=TuneConfig(data=data),
                       split=SplitConfig(children=2), budget=BudgetConfig(epochs=8), out=str(tmp_path / "run"))
    resolved, a = resolve_budget(config, digits)
    assert a.recompute_bn and (a.parent_epochs, a.children, a.child_epochs) == (5, 2, 1)
    off = dataclasses.replace(config, tune=dataclasses.replace(config.tune, recompute_bn=False))
    assert not resolve_budget(off, digits)[1].recompute_bn  # nothing recomputed, nothing charged
    lenet = dataclasses.replace(config, parent=dataclasses.replace(config.parent, model="lenet-s"))
    assert not resolve_budget(lenet, digits)[1].recompute_bn  # no BatchNorm
    run(config)
    run_dir = tmp_path / "run"
    children = [load_checkpoint(run_dir / "children" / f"child-{i}.pt")["cost"] for i in range(2)]
    assert [c["bn_samples"] for c in children] == [len(digits.train.y)] * 2
    parent = load_checkpoint(run_dir / "parent.pt")["cost"]
    dense = 3 * forward_flops(load_model(run_dir / "parent.pt")[0], example_input(digits)) * len(digits.train.y)
    # the parent's own statistics pass when its training ends is outside the budget, as one
    # model's is (decision 73): both arms pay it
    assert parent["bn_samples"] == len(digits.train.y)
    spent = parent["flops"] - dense / 3 + sum(c["flops"] for c in children)
    # within the budget, and within one epoch of it (whole epochs); uncharged, 2 x 2 child epochs
    # and the two passes would have spent 8 2/3 epochs
    assert 8 * dense - dense < spent <= 8 * dense * 1.001
    assert json.loads((run_dir / "metrics.json").read_text())["allocation"]["recompute_bn"] is True
