"""Tune pruned children briefly: the second half of Prune and Tune.

Each child gets a fresh optimizer and (by default) a per-batch cosine one-cycle schedule,
optionally on its own bagged subset of the training split; its mask is enforced after every
optimizer step. Children are independent jobs of :func:`pat.jobs.run_jobs`: an ensemble
directory is tuned child by child, each saved the moment it finishes, so a rerun skips
finished children and resumes an interrupted one from its last epoch, and under ``torchrun``
the children are sharded across ranks.

- :mod:`pat.tuner.child`: one child (:func:`tune_child`) and the Python API (:func:`tune`);
- :mod:`pat.tuner.together`: all children in one optimizer step (:func:`tune_together`);
- :mod:`pat.tuner.directory`: an ensemble directory's children as jobs (:func:`tune_directory`).

References:
    Whitaker & Whitley, "Prune and Tune Ensembles: Low-Cost Ensemble Learning with Sparse
    Independent Subnetworks", AAAI 2022.
"""

from pat.config import TuneConfig
from pat.tuner.child import parent_lr_of, resolve_max_lr, tune, tune_child
from pat.tuner.directory import ChildLedger, tune_directory
from pat.tuner.together import tune_together

__all__ = ["TuneConfig", "tune", "tune_child", "tune_together", "tune_directory", "resolve_max_lr",
           "parent_lr_of", "ChildLedger"]
