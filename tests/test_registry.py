"""One registry type: registration, listing order, built-ins loaded on first lookup, one refusal."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pat.errors import PatError
from pat.registry import Registry


def test_register_get_list_and_refuse():
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1)
    reg.register("blue")(2)
    assert reg.get("blue") == 2 and "red" in reg and "green" not in reg
    assert reg.names() == ["red", "blue"] and list(reg) == ["red", "blue"] and len(reg) == 2
    ordered: Registry[int] = Registry("colour", sort=True)
    ordered.add("b", 0), ordered.add("a", 1)
    assert ordered.names() == ["a", "b"]
    with pytest.raises(PatError, match=r"^unknown colour 'green'; choose one of: red, blue\.$"):
        reg.get("green")
    with pytest.raises(PatError, match=r"^unknown paint 'green'; choose one of: red, blue or any hex\.$"):
        reg.also = "any hex"
        reg.get("green", argument="paint")
    reg.remove("red")
    assert reg.names() == ["blue"]


def test_builtins_are_imported_on_the_first_lookup_only():
    code = ("import sys; from pat.registry import SCHEDULES, STEPS\n"
            "assert 'pat.engine.schedules' not in sys.modules\n"
            "assert 'one-cycle' in SCHEDULES and 'pat.engine.schedules' in sys.modules\n"
            "assert {'sgd', 'sam', 'sharpbalance-mixed'} <= set(STEPS.names())")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_config_refuses_a_name_without_the_engine_imported_first():
    code = ("from pat.config import TrainConfig\n"
            "try:\n    TrainConfig(schedule='zigzag')\nexcept ValueError as e:\n    print(e)\n"
            "TrainConfig(schedule='cosine', optimizer='adam')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("unknown schedule 'zigzag'; choose one of: ") and "one-cycle" in out.stdout
