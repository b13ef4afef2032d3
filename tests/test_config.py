from __future__ import annotations

import dataclasses

import pytest

from pat.config import (
    DataConfig,
    SplitConfig,
    TrainConfig,
    TuneConfig,
    from_dict,
    load_yaml,
    save_yaml,
    to_dict,
)
from pat.errors import PatError


def test_yaml_round_trip(tmp_path):
    config = TrainConfig(model="resnet8", epochs=3, data=DataConfig(dataset="synthetic", batch_size=32))
    save_yaml(config, tmp_path / "c.yaml")
    assert from_dict(TrainConfig, load_yaml(tmp_path / "c.yaml")) == config
    assert to_dict(config)["data"]["batch_size"] == 32


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epochs": 0}, "epochs must be positive. Got 0."),
        ({"lr": -1.0}, "lr must be positive. Got -1.0."),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"schedule": "zigzag"}, "unknown schedule 'zigzag'"),
        ({"data": {"batch_size": 0}}, "batch_size must be positive. Got 0."),
        ({"data": {"val_fraction": 1.0}}, r"val_fraction must be in \[0, 1\). Got 1.0."),
        ({"epoch": 3}, r"config has unknown keys \['epoch'\]"),
    ],
)
def test_bad_values_name_argument_and_value(data, message):
    with pytest.raises(PatError, match=message):
        from_dict(TrainConfig, data)


def test_every_config_refuses_a_value_of_the_wrong_kind_and_takes_numpy_numbers():
    import numpy as np

    from pat.producers.lr_pool import PoolConfig
    from pat.producers.sharpbalance import SharpBalanceConfig
    from pat.producers.starsse import StarSSEConfig

    for cls, extra in [(DataConfig, {}), (TrainConfig, {}), (TuneConfig, {}), (PoolConfig, {}),
                       (StarSSEConfig, {"pretrained": "p.pt"}), (SharpBalanceConfig, {})]:
        with pytest.raises(PatError, match=r"^seed must be an integer\. Got '3'\.$"):
            cls(seed="3", **extra)
        with pytest.raises(PatError, match=r"^seed must be an integer\. Got True\.$"):
            cls(seed=True, **extra)
        assert cls(seed=np.int64(3), **extra).seed == 3
    with pytest.raises(PatError, match=r"^max_lr must be a number or null\. Got '0\.1'\.$"):
        TuneConfig(max_lr="0.1")
    assert TuneConfig(max_lr=np.float32(0.1), epochs=2).max_lr == pytest.approx(0.1)
    with pytest.raises(PatError, match=r"^sparsity must be a number or null\. Got \[0\.5\]\.$"):
        SplitConfig(sparsity=[0.5])
    with pytest.raises(PatError, match=r"^recompute_bn must be true or false\. Got 1\.$"):
        PoolConfig(recompute_bn=1)


@pytest.mark.parametrize("key", ["step", "optimizer"])
def test_tune_config_refuses_an_unknown_rule_when_built(key):
    """Before any child is loaded or any header printed (``pat tune --step foo``)."""
    assert TuneConfig(step="sam").step == "sam"
    with pytest.raises(PatError, match="unknown (step rule|optimizer) 'foo'; choose one of: .*"):
        from_dict(TuneConfig, {key: "foo"})


def test_train_config_pretrained_needs_a_torchvision_model():
    assert TrainConfig(model="tv:resnet18", pretrained=True).pretrained is True
    with pytest.raises(PatError, match=r"--pretrained .* Got --pretrained with model 'resnet20'\.$"):
        TrainConfig(model="resnet20", pretrained=True)
    with pytest.raises(PatError, match=r"pretrained must be true or false\. Got 'yes'"):
        TrainConfig(model="tv:resnet18", pretrained="yes")  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class _Inner:
    a: int = 1
    b: int = 2

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise PatError(f"a and b must differ. Got {self.a} twice.")


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(a=5))
    plain: _Inner = dataclasses.field(default_factory=_Inner)


def test_a_section_given_in_part_is_merged_onto_its_fields_own_default():
    """``inner``'s default is not its class's: the keys a section leaves out come from it."""
    assert from_dict(_Outer, {"inner": {"b": 3}}) == _Outer(inner=_Inner(a=5, b=3))
    assert from_dict(_Outer, {"plain": {"b": 3}}) == _Outer(plain=_Inner(a=1, b=3))
    assert from_dict(_Outer, {"inner": {}}) == _Outer()
    # an error that comes from a merged default says which values came from it
    with pytest.raises(PatError, match=r"^config.inner: a and b must differ. Got 5 twice. \(keys left out of "
                                       r"config.inner take this run's defaults: a=5\)$"):
        from_dict(_Outer, {"inner": {"b": 5}})
    # every error names its section (parent.epochs is not tune.epochs); no defaults were merged here
    with pytest.raises(PatError, match=r"^config.plain: a and b must differ. Got 1 twice.$"):
        from_dict(_Outer, {"plain": {"b": 1}})
