"""Configuration: one frozen dataclass per stage, validated eagerly, saved with every output.

Units are given in comments; LRs are per batch of ``batch_size`` samples.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import types
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from pat.budget import BudgetConfig
from pat.errors import PatError, check
from pat.io import atomic_write
from pat.registry import OPTIMIZERS, SCHEDULES, STEPS

__all__ = ["BudgetConfig", "DataConfig", "TrainConfig", "SplitConfig", "TuneConfig", "RunConfig", "run_split", "to_dict", "from_dict", "load_yaml", "save_yaml",
           "plain_config", "check_field_types"]

C = TypeVar("C")

# the plain kinds a config field may be annotated with: (does a value fit, how a message says it)
_KINDS: dict[Any, tuple[Callable[[Any], bool], list[str]]] = {
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), ["an integer"]),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), ["a number"]),
    str: (lambda v: isinstance(v, str), ["a string"]),
    bool: (lambda v: isinstance(v, bool), ["true", "false"]),
    type(None): (lambda v: v is None, ["null"]),
}


def check_field_types(config: Any) -> None:
    """Refuse a field of a config dataclass whose value is not of its annotated kind.

    Only the plain kinds are checked: ``int`` (any integral number but a bool), ``float`` (any
    real number but a bool), ``str`` and ``bool``, each optionally ``| None`` or a union of
    them. ``epochs: '3'`` from a YAML file, or ``TuneConfig(epochs=1.5)``, is then one line
    naming the field instead of a comparison error, or a schedule error much later.
    """
    for name, hint in get_type_hints(type(config)).items():
        kinds = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        if not all(k in _KINDS for k in kinds):
            continue  # a section, a tuple, a mapping: checked by its own code
        value = getattr(config, name)
        if not any(_KINDS[k][0](value) for k in kinds):
            words = [w for k in kinds for w in _KINDS[k][1]]
            wanted = " or ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} or {words[-1]}"
            raise PatError(f"{name} must be {wanted}. Got {value!r}.")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, how it is split for validation, and how it is batched."""

    dataset: str = "digits"
    data_dir: str = "./data"
    val_fraction: float = 0.1  # share of the training split held out for selection
    batch_size: int = 128
    seed: int = 0  # data split and shuffling seed

    def __post_init__(self) -> None:
        check_field_types(self)
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
    pretrained: bool = False  # start from torchvision's DEFAULT ImageNet weights (tv: models only)
    # BatchNorm statistics recomputed on the unaugmented training split once training ends
    # (the running averages of augmented batches and of weights still moving are not the model's)
    recompute_bn: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        check(self.epochs > 0, f"epochs must be positive. Got {self.epochs}.")
        check(self.lr > 0, f"lr must be positive. Got {self.lr}.")
        # checked here, not only by create_model, so a run is refused before any data is loaded
        check(not self.pretrained or self.model.startswith("tv:"),
              f"--pretrained needs a torchvision model (tv:<name>); pat's zoo has no pretrained weights. "
              f"Got --pretrained with model {self.model!r}.")
        OPTIMIZERS.get(self.optimizer)
        SCHEDULES.get(self.schedule)


@dataclass(frozen=True)
class SplitConfig:
    """How a parent is cloned and pruned into children (see docs/masks.md)."""

    children: int = 6
    # the default keeps 80% of the parent in every child: at equal budget, children that keep
    # more recover in fewer steps and average to a better ensemble (docs/benchmarks.md)
    method: str = "random"  # random | anti-random | partition | cyclic
    sparsity: float | None = 0.2  # share of units pruned; None = implied by the method
    level: str = "connection"  # connection | neuron
    scope: str = "layer"  # layer | global
    physical: bool = False  # neuron level only: remove pruned channels
    seed: int = 0  # masks are a pure function of (seed, child, parameter name)
    include_first: bool = True
    include_classifier: bool = False
    rescale: bool | None = None  # kept weights x n/kept; None = on at connection level
    pack: bool = False  # write the disjoint physical children as one packed file (pat.pack)

    def __post_init__(self) -> None:
        check_field_types(self)
        check(self.children >= 1, f"children must be at least 1. Got {self.children}.")
        check(self.sparsity is None or 0 <= self.sparsity < 1,
              f"sparsity must be in [0, 1). Got {self.sparsity}.")
        check(self.level in ("connection", "neuron"),
              f"level must be 'connection' or 'neuron'. Got {self.level!r}.")
        check(self.scope in ("layer", "global"), f"scope must be 'layer' or 'global'. Got {self.scope!r}.")
        check(not (self.physical and self.level != "neuron"),
              "physical children need level='neuron' (connection-level pruning removes no channel).")
        check(self.rescale is None or isinstance(self.rescale, bool),
              f"rescale must be true, false or null. Got {self.rescale!r}.")
        check(not (self.rescale and self.level != "connection"),
              f"rescale compensates connection-level pruning; neuron level does not rescale. Got level={self.level!r}.")
        if self.pack:  # packing lays disjoint, physically slimmed children side by side
            check(self.level == "neuron", f"pack needs level='neuron' (whole channels). Got level={self.level!r}.")
            check(self.method == "partition",
                  f"pack needs method='partition' (children that share no channel). Got method={self.method!r}.")
            check(self.physical, "pack needs physical=True (children slimmed to their own channels). Got physical=False.")
            check(self.children >= 2, f"pack needs at least 2 children. Got children={self.children}.")

    def describe(self) -> str:
        """One line: ``2 physical children (neuron level, partition)``, ``6 masked children (...)``."""
        method = self.method if self.sparsity is None else f"{self.method} at sparsity {self.sparsity:g}"
        kind = "packed" if self.pack else "physical" if self.physical else "masked"
        return f"{self.children} {kind} children ({self.level} level, {method})"


def run_split() -> SplitConfig:
    """How ``pat run`` splits its parent when the config has no ``split`` section.

    Two physical children that partition the parent's channels (each keeps a disjoint half of
    every hidden layer, about 0.3 of its FLOPs): at an equal budget in FLOPs each tunes about
    three times as long as a masked child, and the pair ran ahead of or level with six masked
    children in eight of the nine regimes measured (docs/decisions.md, 71). ``pat split`` keeps
    :class:`SplitConfig`'s defaults; a run config's ``split`` section given in part is merged
    onto these (decision 70).
    """
    return SplitConfig(children=2, level="neuron", method="partition", sparsity=None, physical=True)


@dataclass(frozen=True)
class TuneConfig:
    """Tuning each pruned child back to accuracy: its schedule, optimizer and data."""

    epochs: int = 10  # passes over the (bagged) training split, per child
    schedule: str = "one-cycle"  # one-cycle | constant
    max_lr: float | None = None  # one-cycle peak per batch of data.batch_size; None: max_lr_share x parent's LR
    max_lr_share: float = 0.2  # the peak as a share of the LR the parent trained at (docs/tuning.md)
    lr: float = 0.01  # the fixed LR of the constant ("fine-tune") schedule
    optimizer: str = "sgd"  # sgd (Nesterov) | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cycle_momentum: bool = False  # one-cycle momentum cycling 0.95 → 0.85 → 0.95
    bagging: float | None = None  # each child trains on its own seeded share of the split
    step: str = "sgd"  # step rule (pat.engine.steps)
    recompute_bn: bool = True  # BatchNorm statistics recomputed on the child's data after tuning
    seed: int = 0  # bagging and shuffling; child i uses (seed, i)
    # all children in one grouped network, one optimizer step for all (the same result as one by
    # one, to float rounding); "auto": only where a timed step says it is faster
    together: bool | str = False
    device: str = "auto"
    amp: bool | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_field_types(self)
        check(self.epochs > 0, f"epochs must be positive. Got {self.epochs}.")
        check(self.together in (True, False, "auto"),
              f"together must be true, false or 'auto'. Got {self.together!r}.")
        check(self.schedule in ("one-cycle", "constant"),
              f"schedule must be 'one-cycle' or 'constant'. Got {self.schedule!r}.")
        check(self.max_lr is None or self.max_lr > 0, f"max_lr must be positive. Got {self.max_lr}.")
        check(self.max_lr_share > 0, f"max_lr_share must be positive. Got {self.max_lr_share}.")
        check(self.lr > 0, f"lr must be positive. Got {self.lr}.")
        OPTIMIZERS.get(self.optimizer)
        STEPS.get(self.step)  # an unknown step rule is refused with the config, before any work
        check(self.bagging is None or 0 < self.bagging <= 1,
              f"bagging must be in (0, 1]. Got {self.bagging}.")


@dataclass(frozen=True)
class RunConfig:
    """The whole pipeline: parent → split → tune → evaluate (``pat run CONFIG.yaml``)."""

    parent: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # two physical children that partition the parent's channels (run_split); a split section
    # changes only the keys it gives
    split: SplitConfig = dataclasses.field(default_factory=run_split)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    out: str = "runs/pat"  # directory: parent.pt, children/, config.yaml, metrics.json
    # a total budget ({epochs: N} | {steps: N} | {flops: N}) that pat.budget allocates: it sets
    # parent.epochs, split.children (at most the given number) and tune.epochs
    budget: BudgetConfig | None = None
    # also train one model (the parent's recipe) for the run's whole budget: the model the
    # ensemble has to beat, shown next to it
    baseline: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        check(self.budget is None or isinstance(self.budget, BudgetConfig),
              f"budget must be a mapping such as {{epochs: 48}}. Got {self.budget!r}.")


def _dataclass_of(hint: Any) -> Any:
    """``X`` for a hint ``X``, ``X | None`` or ``Optional[X]`` naming a dataclass, else None."""
    if get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if dataclasses.is_dataclass(hint) else None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-able dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any], *, where: str = "config", base: C | None = None) -> C:
    """Build ``cls`` from a dict, refusing unknown keys with a message that names them.

    A key left out takes its value from ``base`` when one is given, else the field's default.
    A nested section given in part is merged the same way onto that field's own default, so
    ``split: {seed: 1}`` in a run config changes the seed of ``pat run``'s default split and
    nothing else (decision 70).
    """
    if not isinstance(data, dict):
        raise PatError(f"{where} must be a mapping. Got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PatError(f"{where} has unknown keys {unknown}; known: {sorted(known)}.")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_of(hints[name])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where=f"{where}.{name}", base=_default_of(known[name], base, sub))
        kwargs[name] = value
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as e:
        raise PatError(f"{where}: {e}.") from None
    except PatError as e:  # named by the section it came from: parent.epochs is not tune.epochs
        changed = _changed_defaults(base) if base is not None else ""
        defaults = f" (keys left out of {where} take this run's defaults: {changed})" if changed else ""
        raise PatError(f"{where}: {e}{defaults}") from None


def _default_of(f: dataclasses.Field, base: Any, sub: type) -> Any:
    """What a nested section given in part is merged onto: ``base``'s value or the field's default."""
    if base is not None:
        value = getattr(base, f.name)
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = None
    return value if isinstance(value, sub) else None


def _changed_defaults(config: Any) -> str:
    """``name=value`` for each field of ``config`` that differs from its class's default."""
    plain = type(config)()
    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in fields(config)
                     if getattr(config, f.name) != getattr(plain, f.name))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file as a dict (empty for an empty file).

    Raises:
        PatError: the file is missing or is not valid YAML.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise PatError(f"config file {str(path)!r} {what}.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PatError(f"config file {str(path)!r} is not valid YAML ({str(e).splitlines()[0]}).") from None
    return data or {}


def save_yaml(config: Any, path: str | Path, *, header: str = "") -> None:
    """Write ``config`` as YAML, atomically; ``header`` (comment lines) goes first."""
    text = header + yaml.safe_dump(to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def plain_config(config: Any) -> dict[str, Any]:
    """The config as JSON would read it back (tuples become lists), for equality checks."""
    return json.loads(json.dumps(to_dict(config)))
