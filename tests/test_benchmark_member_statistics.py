from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import member_statistics  # noqa: E402


def test_scores_the_same_members_both_ways_and_reports_the_paired_difference(capsys):
    member_statistics.main(["--seeds", "2", "--epochs", "1"])
    out = capsys.readouterr().out
    seeds = [line for line in out.splitlines() if line.startswith("seed ")]
    assert len(seeds) == 2 and all("as trained" in s and "recomputed" in s for s in seeds)
    # one epoch leaves running averages far from the weights: the two scorings differ
    assert all(s.split("as trained ")[1].split(",")[0] != s.split("recomputed ")[1] for s in seeds)
    assert "recomputed - as trained: TS-NLL" in out
    with pytest.raises(SystemExit) as refused:
        member_statistics.main(["--seeds", "1"])
    assert refused.value.code == 2
