"""Configuration: one frozen dataclass per stage, validated eagerly, saved with every output.

Units are given in comments; LRs are per batch of ``batch_size`` samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from pat.engine.optim import OPTIMIZERS
from pat.engine.schedules import list_schedules
from pat.errors import PatError, check

__all__ = ["DataConfig", "TrainConfig", "to_dict", "from_dict", "load_yaml", "save_yaml"]

C = TypeVar("C")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str = "./data"
    val_fraction: float = 0.1  # share of the training split held out for selection
    batch_size: int = 128
    seed: int = 0  # data split and shuffling seed

    def __post_init__(self) -> None:
        check(self.batch_size > 0, f"batch_size must be positive. Got {self.batch_size}.")
        check(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1). Got {self.val_fraction}.")


@dataclass(frozen=True)
class TrainConfig:
    """Training a parent (or any model from scratch). Defaults: the Prune-and-Tune recipe."""

    model: str = "lenet-s"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    epochs: int = 10
    optimizer: str = "sgd"  # sgd (Nesterov) | adam
    lr: float = 0.1  # base LR; 1e-3 is the usual choice for adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "parent"  # 0.1 for 50%, linear to 0.001 at 90%, then constant
    seed: int = 0  # weight initialisation seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool | None = None  # bf16 autocast; None = on for CUDA only

    def __post_init__(self) -> None:
        check(self.epochs > 0, f"epochs must be positive. Got {self.epochs}.")
        check(self.lr > 0, f"lr must be positive. Got {self.lr}.")
        check(self.optimizer in OPTIMIZERS,
              f"optimizer {self.optimizer!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}.")
        check(self.schedule in list_schedules(),
              f"schedule {self.schedule!r} is unknown; choose one of: {', '.join(list_schedules())}.")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-able dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any], *, where: str = "config") -> C:
    """Build ``cls`` from a dict, refusing unknown keys with a message that names them."""
    if not isinstance(data, dict):
        raise PatError(f"{where} must be a mapping. Got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PatError(f"{where} has unknown keys {unknown}; known: {sorted(known)}.")
    kwargs = {}
    for name, value in data.items():
        sub = hints[name]
        nested = dataclasses.is_dataclass(sub) and isinstance(value, dict)
        kwargs[name] = from_dict(sub, value, where=f"{where}.{name}") if nested else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PatError(f"{where}: {e}.") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PatError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PatError(f"config file {str(path)!r} is not valid YAML ({str(e).splitlines()[0]}).") from None
    return data or {}


def save_yaml(config: Any, path: str | Path) -> None:
    from pat.engine.checkpoint import atomic_write

    text = yaml.safe_dump(to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()))
