"""Every script in examples/ runs as written and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
# script -> (arguments, a line it must print). Greedy selection keeps the best prefix of its
# picks, so ``--size 2`` is an upper bound: which team wins on validation can change with the
# machine's float results (a second pick of the same member makes a team of one); its format cannot.
CASES = {
    "prune_torchvision.py": (["--model", "resnet18", "--children", "2"], r"child 1 +[\d,]+ parameters"),
    "prune_and_tune_digits.py": ([], r"ensemble: accuracy \d"),
    "evaluate_checkpoints.py": ([], r"ensemble +accuracy \d"),
    "greedy_selection.py": (["--size", "2"], r"team \[\d+(, \d+)?\]"),
    "soup_children.py": ([], r"soup +accuracy \d"),
    "lr_pool_greedy.py": (["--size", "2"], r"team \['[\w.-]+'(, '[\w.-]+')?\]: accuracy \d"),
    "starsse_soup.py": ([], r"ensemble of 4 accuracy \d.*\nsoup +accuracy \d"),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    args, expected = CASES[script]
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(expected, proc.stdout), proc.stdout
    if script == "prune_torchvision.py":  # physical children are really thinner
        counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) parameters", proc.stdout)]
        assert len(counts) == 3 and all(c < counts[0] for c in counts[1:]), proc.stdout


def test_tune_refuses_a_model_that_does_not_take_the_data():
    import pat
    from pat.errors import PatError

    data = pat.load_dataset("digits")
    rgb = pat.create_model("lenet-s", num_classes=10, in_channels=3)
    with pytest.raises(PatError, match=r"children\[0\] .* does not take 'digits' images of shape \(1, 32, 32\)"):
        pat.tune([rgb], data, pat.TuneConfig(epochs=1))
    many = pat.create_model("lenet-s", num_classes=100, in_channels=1)
    with pytest.raises(PatError, match=r"returns \(2, 100\) .* 'digits' has 10 classes"):
        pat.tune([many], data, pat.TuneConfig(epochs=1))
