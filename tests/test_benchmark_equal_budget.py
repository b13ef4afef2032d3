from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import equal_budget  # noqa: E402


def test_default_arm_is_pat_runs_own_defaults():
    from pat.budget import BudgetConfig
    from pat.config import RunConfig

    recipe, split = equal_budget.default_recipe(), RunConfig().split
    assert (recipe.children, recipe.method, recipe.sparsity, recipe.level, recipe.physical) == (
        split.children, split.method, split.sparsity, split.level, split.physical)
    assert recipe.equal_flops == split.physical  # pat run's budget charges physical children their FLOPs
    assert recipe.trunk == BudgetConfig(epochs=1).trunk and recipe.lr_scale == 1.0


@pytest.mark.slow
def test_every_arm_spends_the_budget_and_the_report_reads_back(tmp_path, capsys):
    save = tmp_path / "rows.json"
    equal_budget.main(["--budget", "4", "--seeds", "2", "--deep", "2", "--snapshots", "2", "--lrs", "0.05",
                       "--variants", "trunk dense x6", "--threads", "1", "--save", str(save)])
    printed = capsys.readouterr().out
    assert "pat default - independent: acc" in printed and "paired t-test p =" in printed
    assert "pat trunk dense x6 - independent: nll_ts" in printed  # every recipe is tested, not only the default
    assert "pat trunk dense x6 - pat default: acc" in printed
    results = json.loads(save.read_text())
    assert len(results) == 2
    for rows in results:
        steps = rows["independent"]["steps"]
        for arm in ("independent (last epoch)", "snapshot (2 cycles)", "pat trunk dense x6"):
            assert rows[arm]["steps"] == steps, arm  # equal budget, in optimizer steps
        # the default's physical children are charged their FLOPs: more steps, the same FLOPs
        flops = rows["independent"]["flops"]
        assert rows["pat default"]["steps"] > steps and 0.9 * flops <= rows["pat default"]["flops"] <= flops
        assert rows["deep (2x budget)"]["steps"] == 2 * steps
        assert rows["parent (pat default)"]["steps"] < steps
        assert rows["independent"]["schedule"] in ("parent", "cosine")  # the grid's choice is kept
    equal_budget.main(["--report", str(save)])
    assert capsys.readouterr().out.splitlines()[0].startswith("arm")
    # --reuse: only the variants run, beside the saved rows of the same seeds. The default's own
    # recipe as a variant retrains the same trunk and children, so it must reproduce its row
    again = tmp_path / "again.json"
    equal_budget.main(["--budget", "4", "--seeds", "2", "--deep", "0", "--snapshots", "0", "--lrs", "0.05",
                       "--variants", "trunk physical partition x2 flops share 0.25", "--threads", "1",
                       "--reuse", str(save), "--save", str(again)])
    assert "pat trunk physical partition x2 flops share 0.25 - pat default: acc +0.0000" in capsys.readouterr().out
    for old, new in zip(results, json.loads(again.read_text()), strict=True):
        assert {k: v for k, v in new.items() if k != "pat trunk physical partition x2 flops share 0.25"} == old
        variant = new["pat trunk physical partition x2 flops share 0.25"]
        assert {k: variant[k] for k in ("acc", "nll_ts", "steps")} == {k: old["pat default"][k] for k in ("acc", "nll_ts", "steps")}
    with pytest.raises(SystemExit) as refused:  # a file of other seeds cannot be paired
        equal_budget.main(["--seeds", "3", "--reuse", str(save), "--variants", "trunk dense x6"])
    assert refused.value.code == 2 and "--reuse" in capsys.readouterr().err


def test_train_size_takes_a_fixed_class_balanced_subset_and_leaves_val_and_test():
    import torch

    from pat.data import load_dataset

    data = load_dataset("digits", seed=0)
    small = equal_budget.smaller_train(data, 300)
    counts = torch.bincount(small.train.y, minlength=data.num_classes)
    full = torch.bincount(data.train.y, minlength=data.num_classes)
    assert abs(len(small.train) - 300) <= data.num_classes  # rounded per class
    assert torch.all((counts - full * 300 / len(data.train)).abs() <= 1)  # in the classes' proportions
    assert small.val is data.val and small.test is data.test
    rows = {tuple(r.tolist()) for r in data.train.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in small.train.x.flatten(1))  # drawn from train, nothing else
    again = equal_budget.smaller_train(data, 300)
    assert torch.equal(again.train.y, small.train.y) and torch.equal(again.train.x, small.train.x)  # every seed


@pytest.mark.parametrize("size", ["5", "100000"])
def test_train_size_out_of_range_is_refused(size, capsys):
    with pytest.raises(SystemExit) as exc:
        equal_budget.main(["--train-size", size, "--seeds", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--train-size must be between 10 and" in err and f"Got {size}." in err
