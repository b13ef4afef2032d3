"""A guard against a run that collapses partway: keep the best validation state, hand it back.

A network held at a constant LR (pat's trunk) can learn for a while, then fall to a constant
prediction and stay there: on a tenth of Fashion-MNIST one trunk in six reached 80 %
validation accuracy at epoch 17 and sat at chance from epoch 23 to 48, and its last epoch was
then what every child started from. :class:`CollapseGuard` keeps a copy of the epoch with the
lowest validation loss and, only when the last epoch has *collapsed*, loads it back at the end
of the fit. A run that did not collapse ends exactly as it would without the guard.

Children tuned together are one fit; a guard per child (``member=i``) watches child ``i``'s
own validation metrics and keeps only its weights, for the caller to hand back.

A network with BatchNorm trained at a high constant LR can *look* collapsed in eval mode
while it is not: its running statistics lag its weights. With a ``recheck``
(:func:`pat.engine.batchnorm.recalibrated_metrics`) a last epoch that looks collapsed is
judged again on a copy with recomputed statistics, and kept when it holds up there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from pat.engine.callbacks import Callback, FitState
from pat.engine.loop import _inner

__all__ = ["CollapseGuard", "collapsed", "describe_restored"]


def collapsed(last: Mapping[str, float], best: Mapping[str, float], num_classes: int) -> bool:
    """Whether epoch metrics ``last`` have collapsed against the best epoch's ``best``.

    Collapsed means a validation loss that is not finite, or a validation accuracy that has
    given back more than half of what ``best`` had gained over chance (1 / ``num_classes``):
    80 % → 10 % on ten classes is a collapse, 81 % → 78 % is the noise of a constant LR.
    """
    if not math.isfinite(last["val_loss"]):
        return True
    chance = 1.0 / num_classes
    return last["val_acc"] - chance < 0.5 * (best["val_acc"] - chance)


class CollapseGuard(Callback):
    """Hand back the lowest-validation-loss epoch when training ends collapsed.

    Needs ``val_loss`` and ``val_acc`` in the epoch metrics (``fit`` with ``eval_data={"val":
    ...}``); without them it does nothing. The best state is held on the CPU and travels in
    ``fit``'s resume state, so an interrupted run that resumes decides as an uninterrupted one
    would. Under DDP every rank sees the same validation metrics and restores the same state.
    After the fit, ``restored`` is None (the last epoch stands) or a record of what was handed
    back: ``{"epoch", "val_loss", "val_acc", "last": {"epoch", "val_loss", "val_acc"}}``.

    With ``member=i`` it watches child ``i`` of children tuned together: its metrics
    ``val_loss/i`` and ``val_acc/i``, and the weights ``weights(model)`` returns. It then loads
    nothing back itself (the fit's model holds every child): :attr:`kept` is the state to give
    the child when it was restored.

    ``recheck(model)`` gives validation metrics with fresh BatchNorm statistics (or None: no
    BatchNorm); it is called only for a last epoch that looks collapsed, and a last epoch that
    does not look collapsed there stands.
    """

    def __init__(self, num_classes: int, *, member: int | None = None,
                 weights: Callable[[nn.Module], Mapping[str, Tensor]] | None = None,
                 recheck: Callable[[nn.Module], Mapping[str, float] | None] | None = None) -> None:
        if member is not None and weights is None:
            raise ValueError("CollapseGuard(member=...) needs weights: the member's state in the fit's model.")
        self.num_classes = num_classes
        self.member, self.weights = member, weights
        suffix = "" if member is None else f"/{member}"
        self.loss_key, self.acc_key = f"val_loss{suffix}", f"val_acc{suffix}"
        self.recheck = recheck
        self.best: dict[str, Any] | None = None  # epoch, val_loss, val_acc, state_dict
        self.restored: dict[str, Any] | None = None

    @property
    def kept(self) -> dict[str, Tensor] | None:
        """The weights of the epoch handed back (CPU copies), or None when the last epoch stood."""
        return self.best["state_dict"] if self.restored is not None and self.best is not None else None

    def _consider(self, state: FitState) -> None:
        self._offer(int(state.metrics.get("epoch", 0)), state.metrics, _inner(state.model))

    def _offer(self, epoch: int, metrics: Mapping[str, float], model: nn.Module) -> None:
        """Keep ``model``'s weights (CPU copies) as epoch ``epoch`` if its validation loss is the lowest yet."""
        loss = metrics.get(self.loss_key)
        if loss is None or self.acc_key not in metrics or not math.isfinite(loss):
            return
        if self.best is None or loss < self.best["val_loss"]:
            source = self.weights(model) if self.weights is not None else model.state_dict()
            self.best = {"epoch": epoch, "val_loss": float(loss), "val_acc": float(metrics[self.acc_key]),
                         "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in source.items()}}

    def start(self, model: nn.Module, metrics: Mapping[str, float]) -> None:
        """Make the state a fit starts from its epoch 0, if ``metrics`` (its validation metrics) are.

        For a child: the network as split is a trained one, and a tuning that diverged from
        its first steps (every epoch at chance) is handed back that, not the least bad of
        its collapsed epochs. Call it before the fit; a resumed fit's own record replaces it.
        """
        self.best = None
        self._offer(0, metrics, model)

    def on_fit_start(self, state: FitState) -> None:
        """A resumed fit's restored epoch was written before this guard saw it: consider it now."""
        self.restored = None
        if state.history and (self.best is None or self.best["epoch"] < state.history[-1]["epoch"]):
            self._consider(state)

    def on_epoch_end(self, state: FitState) -> None:
        """Remember the epoch if its validation loss is the lowest so far."""
        self._consider(state)

    def on_fit_end(self, state: FitState) -> None:
        """Load the best epoch back if the last one collapsed."""
        history = state.history[-1] if state.history else {}
        if self.best is None or self.loss_key not in history or self.acc_key not in history:
            return
        last = {"epoch": int(history["epoch"]), "val_loss": float(history[self.loss_key]),
                "val_acc": float(history[self.acc_key])}
        if self.best["epoch"] == last["epoch"] or not collapsed(last, self.best, self.num_classes):
            return
        fresh = self.recheck(_inner(state.model)) if self.recheck is not None else None
        if fresh is not None and self.loss_key in fresh and self.acc_key in fresh:
            again = {"epoch": last["epoch"], "val_loss": float(fresh[self.loss_key]),
                     "val_acc": float(fresh[self.acc_key])}
            if not collapsed(again, self.best, self.num_classes):  # stale running statistics, not a collapse
                return
        if self.member is None:
            _inner(state.model).load_state_dict(self.best["state_dict"])
        self.restored = {**{k: self.best[k] for k in ("epoch", "val_loss", "val_acc")}, "last": last}

    def state_dict(self) -> dict[str, Any] | None:
        """The best epoch so far (with its weights), for the resume state."""
        return dict(self.best) if self.best is not None else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the best epoch an interrupted fit had seen."""
        self.best = dict(state)


def describe_restored(restored: Mapping[str, Any], what: str = "the model") -> str:
    """One line saying which epoch was handed back and why (for the CLI)."""
    last = restored["last"]
    at = f"epoch {restored['epoch']}"
    kept = at if restored["epoch"] else "its starting state (epoch 0)"
    return (f"{what} collapsed: validation accuracy {last['val_acc']:.2%} at its last epoch "
            f"({last['epoch']}) against {restored['val_acc']:.2%} at {at}; {kept} was kept")
