from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from pat.children import split
from pat.cli import cli
from pat.config import DataConfig, SplitConfig, TuneConfig
from pat.data import IndexedBatches, load_dataset
from pat.engine.checkpoint import load_checkpoint
from pat.engine.cost import (
    example_input,
    forward_flops,
    inference_macs,
    sample_passes,
    training_cost,
)
from pat.engine.loop import fit
from pat.engine.sam import MixedSAMStep, SAMStep
from pat.engine.steps import sgd_step
from pat.ensemble.cost import directory_cost
from pat.models import create_model
from pat.pipeline import split_to_directory
from pat.producers.lr_pool import PoolConfig, train_pool
from pat.producers.sharpbalance import SharpBalanceConfig, train_sharpbalance
from pat.tuner import tune_directory

X = torch.zeros(4, 1, 32, 32)


def test_masked_child_costs_its_parent_and_physical_child_costs_less():
    torch.manual_seed(0)
    parent = create_model("lenet-s", in_channels=1)
    masked = split(parent, 2, level="neuron", example_inputs=X[:1])[0]
    physical = split(parent, 2, level="neuron", physical=True, example_inputs=X[:1])[0]
    dense = forward_flops(parent, X)
    assert dense > 0
    assert forward_flops(masked, X) == dense  # same shapes, zeros in them
    assert forward_flops(physical, X) < forward_flops(masked, X)
    assert inference_macs(parent, X) == dense // 2
    assert forward_flops(parent, X[:1]) == dense  # one sample, whatever the batch


def test_forward_flops_restores_train_flags():
    model = create_model("lenet-s", in_channels=1)
    model.train()
    next(iter(model.children())).eval()
    flags = [m.training for m in model.modules()]
    forward_flops(model, X)
    assert [m.training for m in model.modules()] == flags


def test_training_cost_rule_and_step_passes():
    cost = training_cost(10, steps=2, samples=8, seconds=1.5)
    assert cost == {"steps": 2, "samples": 8, "flops": 240, "seconds": 1.5, "forward_flops_per_sample": 10}
    assert training_cost(10, steps=2, samples=8, seconds=0, passes=16)["flops"] == 480
    y = torch.zeros(6, dtype=torch.long)
    assert sample_passes(sgd_step, y) == 6
    assert sample_passes(SAMStep(0.05), y) == 12
    batches = IndexedBatches([], 2)
    batches.indices = torch.arange(6)
    mixed = MixedSAMStep(0.05, torch.tensor([True, False] * 5), batches)
    assert int(sample_passes(mixed, y)) == 6 + 3  # only the SAM samples count twice


def test_fit_counts_survive_resume(tmp_path, blobs):
    x, y = blobs
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    model = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resume = tmp_path / "state.pt"
    fit(model, train, epochs=1, optimizer=opt, resume_path=resume)
    state = fit(model, train, epochs=2, optimizer=opt, resume_path=resume)
    assert (state.step, state.samples, state.sample_passes) == (6, 192, 192)
    assert state.seconds > 0


def test_tuned_directory_records_every_cost_and_sums_them(tmp_path, digits, digits_parent):
    parent_cost = load_checkpoint(digits_parent)["cost"]
    assert parent_cost["steps"] > 0 and parent_cost["samples"] == len(digits.train.y)
    ens = split_to_directory(digits_parent, tmp_path / "children", SplitConfig(children=2))
    assert directory_cost(ens)["complete"] is False  # split, not tuned yet
    ens = tune_directory(str(ens.path), digits, TuneConfig(epochs=1, max_lr=0.05, data=DataConfig(batch_size=64)))
    report = directory_cost(ens)
    for record in ens.members:
        cost = record["cost"]
        assert cost["steps"] > 0 and cost["seconds"] > 0
        assert cost["flops"] == 3 * cost["forward_flops_per_sample"] * cost["samples"]
        assert cost["forward_flops_per_sample"] == parent_cost["forward_flops_per_sample"]  # masked
        assert cost["parent"] == record["parent"]
        assert load_checkpoint(ens.member_path(record))["cost"] == cost
    assert report["parent"] == parent_cost and report["complete"] is True
    children = sum(m["cost"]["flops"] for m in ens.members)
    assert report["total"]["flops"] == parent_cost["flops"] + children
    assert report["total"]["steps"] == parent_cost["steps"] + sum(m["cost"]["steps"] for m in ens.members)

    result = CliRunner().invoke(cli, ["info", str(ens.member_path(ens.members[0]))])
    assert result.exit_code == 0, result.output
    assert "training FLOPs" in result.output and "inference MACs" in result.output


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("synthetic", train_size=64, test_size=32, in_channels=1, seed=0)


def test_pool_members_record_cost(tmp_path, tiny_data):
    config = PoolConfig(model="lenet-s", data=DataConfig(dataset="synthetic", batch_size=32), epochs=1,
                        policies=("multistep",), lrs=(0.05,), device="cpu")
    ens = train_pool(config, tmp_path / "pool", data=tiny_data)
    (record,) = ens.members
    cost = record["cost"]
    n = len(tiny_data.train.y)
    assert (cost["steps"], cost["samples"]) == (2, n)
    assert cost["flops"] == 3 * forward_flops(create_model("lenet-s", in_channels=1), example_input(tiny_data)) * n
    report = directory_cost(ens)
    assert report["complete"] and report["parent"] is None and report["total"]["flops"] == cost["flops"]


def test_sharpbalance_counts_both_phases_and_sam_twice(tmp_path, tiny_data):
    config = SharpBalanceConfig(model="lenet-s", data=DataConfig(dataset="synthetic", batch_size=32),
                                members=2, epochs=2, initial_epochs=1, rho=0.1, flat_ratio=0.5, lr=0.05,
                                device="cpu")
    ens = train_sharpbalance(config, tmp_path / "sb", data=tiny_data)
    for record in ens.members:
        cost, fwd, n = record["cost"], record["cost"]["forward_flops_per_sample"], len(tiny_data.train.y)
        assert (cost["steps"], cost["samples"]) == (4, 2 * n)  # phase 1 + phase 2
        sam_in_phase2 = round(record["recipe"]["sam_fraction"] * n)
        assert cost["flops"] == 3 * fwd * (2 * n + n + sam_in_phase2)  # phase 1 is all SAM
