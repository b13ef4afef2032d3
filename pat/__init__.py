"""pat: low-cost deep ensembles by pruning.

Train one parent, split it into differently pruned children, tune each briefly, and
average their softmax::

    import pat
    children = pat.split(model, 6, method="anti-random", sparsity=0.5)
    pat.tune(children, pat.load_dataset("digits"), pat.TuneConfig(epochs=4, max_lr=0.05))
    ensemble = pat.Ensemble(children)

The names in ``__all__`` are the public API; everything else may change. They are loaded
on first use, so ``import pat`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from pat.errors import PatError as PatError

__version__ = "0.1.0"

_API = {
    # data and models
    "load_dataset": "pat.data", "list_datasets": "pat.data", "Dataset": "pat.data",
    "DeviceLoader": "pat.data",
    "create_model": "pat.models", "list_models": "pat.models", "get_classifier": "pat.models",
    # configs
    "DataConfig": "pat.config", "TrainConfig": "pat.config", "SplitConfig": "pat.config",
    "TuneConfig": "pat.config", "RunConfig": "pat.config", "BudgetConfig": "pat.budget",
    "allocate_budget": "pat.budget",
    # training
    "fit": "pat.engine.loop", "train_parent": "pat.parent",
    "save_model": "pat.engine.checkpoint", "load_model": "pat.engine.checkpoint",
    # prune and tune
    "split": "pat.children", "iter_split": "pat.children", "save_child": "pat.children",
    "load_child": "pat.children", "Child": "pat.records",
    # other producers
    "PoolConfig": "pat.producers.lr_pool", "train_pool": "pat.producers.lr_pool",
    "pool_members": "pat.producers.lr_pool", "StarSSEConfig": "pat.producers.starsse",
    "train_starsse": "pat.producers.starsse", "starsse_members": "pat.producers.starsse",
    "SharpBalanceConfig": "pat.producers.sharpbalance",
    "train_sharpbalance": "pat.producers.sharpbalance",
    "sharpbalance_members": "pat.producers.sharpbalance", "Member": "pat.records",
    "generate_masks": "pat.masks", "MaskEnforcer": "pat.engine.masking", "tune": "pat.tuner",
    "run": "pat.pipeline",
    # ensembles
    "Ensemble": "pat.ensemble", "EnsembleDir": "pat.ensemble", "collect_probs": "pat.ensemble",
    "evaluate": "pat.ensemble", "combine": "pat.ensemble", "create_selector": "pat.ensemble",
    "list_selectors": "pat.ensemble", "AllSelector": "pat.ensemble", "TopKSelector": "pat.ensemble",
    "RandomSelector": "pat.ensemble", "BruteForceSelector": "pat.ensemble",
    "GreedySelector": "pat.ensemble", "FocalSelector": "pat.ensemble",
    "uniform_soup": "pat.ensemble", "greedy_soup": "pat.ensemble",
    "average_state_dicts": "pat.ensemble", "recalibrate_bn": "pat.ensemble",
    "collect_logits": "pat.ensemble", "fit_temperature": "pat.ensemble",
    "apply_temperature": "pat.ensemble", "deep_ensemble_equivalent": "pat.ensemble",
}  # fmt: skip

__all__ = ["__version__", "PatError", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'pat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # let type checkers and IDEs see the real objects
    from pat.budget import BudgetConfig, allocate_budget
    from pat.children import iter_split, load_child, save_child, split
    from pat.config import DataConfig, RunConfig, SplitConfig, TrainConfig, TuneConfig
    from pat.data import Dataset, DeviceLoader, list_datasets, load_dataset
    from pat.engine.checkpoint import load_model, save_model
    from pat.engine.loop import fit
    from pat.engine.masking import MaskEnforcer
    from pat.ensemble import (
        AllSelector,
        BruteForceSelector,
        Ensemble,
        EnsembleDir,
        FocalSelector,
        GreedySelector,
        RandomSelector,
        TopKSelector,
        apply_temperature,
        average_state_dicts,
        collect_logits,
        collect_probs,
        combine,
        create_selector,
        deep_ensemble_equivalent,
        evaluate,
        fit_temperature,
        greedy_soup,
        list_selectors,
        recalibrate_bn,
        uniform_soup,
    )  # fmt: skip
    from pat.masks import generate_masks
    from pat.models import create_model, get_classifier, list_models
    from pat.parent import train_parent
    from pat.pipeline import run
    from pat.producers.lr_pool import PoolConfig, pool_members, train_pool
    from pat.producers.sharpbalance import (
        SharpBalanceConfig,
        sharpbalance_members,
        train_sharpbalance,
    )
    from pat.producers.starsse import StarSSEConfig, starsse_members, train_starsse
    from pat.records import Child, Member
    from pat.tuner import tune
