from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import equal_budget  # noqa: E402


def test_default_arm_is_pats_own_defaults():
    from pat.budget import BudgetConfig
    from pat.config import SplitConfig

    recipe = equal_budget.default_recipe()
    assert (recipe.children, recipe.method, recipe.sparsity) == (SplitConfig().children, SplitConfig().method,
                                                                 SplitConfig().sparsity)
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
        for arm in ("independent (last epoch)", "snapshot (2 cycles)", "pat default", "pat trunk dense x6"):
            assert rows[arm]["steps"] == steps, arm  # equal budget, in optimizer steps
        assert rows["deep (2x budget)"]["steps"] == 2 * steps
        assert rows["parent (pat default)"]["steps"] < steps
        assert rows["independent"]["schedule"] in ("parent", "cosine")  # the grid's choice is kept
    equal_budget.main(["--report", str(save)])
    assert capsys.readouterr().out.splitlines()[0].startswith("arm")
