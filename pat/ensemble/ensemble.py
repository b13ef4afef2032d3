"""The :class:`Ensemble`: members plus a combiner, usable as one classifier."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pat.ensemble.predict import COMBINERS, MemberRunner, combine, eval_mode, normalize_weights
from pat.errors import PatError, check

__all__ = ["Ensemble"]


class Ensemble(nn.Module):
    """M member classifiers whose softmax outputs are combined.

    ``forward(x)`` is :meth:`predict_proba`: it returns probabilities, not logits.

    Args:
        models: the members (any ``nn.Module`` returning logits).
        names: one name per member (default ``member-<i>``).
        weights: ``(M,)`` non-negative member weights (normalised); implies
            ``combiner="weighted"`` unless another combiner is given.
        combiner: ``"mean"``, ``"weighted"`` or ``"vote"`` (see :func:`pat.ensemble.combine`).
        path: how members run together: ``"auto"``, ``"loop"`` or ``"vmap"``
            (:mod:`pat.ensemble.predict`).
        temperature: the ensemble's temperature ``T`` (:func:`pat.fit_temperature` on
            validation data): :meth:`predict_proba` returns ``softmax(log(combined) / T)``.
        member_temperatures: ``(M,)``, used by :meth:`member_probs` (each member alone).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        names: Sequence[str] | None = None,
        weights: Any = None,
        *,
        combiner: str | None = None,
        path: str = "auto",
        temperature: float | None = None,
        member_temperatures: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        models = list(models)
        check(models, "models must hold at least one member. Got 0.")
        self.members = nn.ModuleList(models)
        self.names = list(names) if names is not None else [f"member-{i}" for i in range(len(models))]
        check(len(self.names) == len(models),
              f"names must have one entry per member ({len(models)}). Got {len(self.names)}.")
        self.weights = None if weights is None else normalize_weights(weights, len(models))
        self.combiner = combiner or ("weighted" if weights is not None else "mean")
        check(self.combiner in COMBINERS,
              f"combiner must be one of {list(COMBINERS)}. Got {self.combiner!r}.")
        check(self.combiner != "weighted" or self.weights is not None,
              "combiner='weighted' needs weights. Got None.")
        self.path = path
        check(temperature is None or temperature > 0, f"temperature must be positive. Got {temperature}.")
        self.temperature = temperature
        if member_temperatures is not None:
            member_temperatures = [float(t) for t in member_temperatures]
            check(len(member_temperatures) == len(models) and all(t > 0 for t in member_temperatures),
                  f"member_temperatures must be {len(models)} positive numbers. Got {member_temperatures}.")
        self.member_temperatures = member_temperatures
        self._runner: MemberRunner | None = None

    def __len__(self) -> int:
        return len(self.members)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Ensemble:
        # .to() / .cuda() / .half() move the members; stacked copies of their weights are stale.
        self._runner = None
        return super()._apply(fn, *args, **kwargs)

    def member_logits(self, x: Tensor) -> Tensor:
        """``x`` ``(B, ...)`` → every member's logits, ``(M, B, C)`` float32, uncalibrated.

        Runs in eval mode without autograd. With the vmap path the members' weights are
        stacked on first use; call :meth:`refresh` after changing them in place.
        """
        if self._runner is None:
            device = next(self.parameters()).device
            self._runner = MemberRunner(list(self.members), device=device, path=self.path)
        with eval_mode(self.members), torch.inference_mode():
            return self._runner.logits(x)

    def member_probs(self, x: Tensor, *, calibrated: bool = True) -> Tensor:
        """``x`` ``(B, ...)`` → every member's softmax ``(M, B, C)``.

        Each member is at its own temperature when the ensemble has member temperatures and
        ``calibrated``.
        """
        logits = self.member_logits(x)
        if calibrated and self.member_temperatures is not None:
            logits = logits / logits.new_tensor(self.member_temperatures)[:, None, None]
        return logits.softmax(dim=-1)

    def refresh(self) -> None:
        """Forget cached stacked weights (after editing members in place)."""
        self._runner = None

    def predict_proba(self, x: Tensor, *, calibrated: bool = True) -> Tensor:
        """``x`` ``(B, ...)`` → combined probabilities ``(B, C)``.

        The members' raw softmax is combined; with ``calibrated`` and an ensemble
        temperature ``T`` the result is ``softmax(log(combined) / T)`` (same argmax).
        """
        weights = self.weights if self.combiner == "weighted" else None
        probs = combine(self.member_probs(x, calibrated=False), self.combiner, weights)
        if calibrated and self.temperature is not None:
            probs = (probs.clamp_min(1e-12).log() / self.temperature).softmax(dim=-1)
        return probs

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, ...)`` → calibrated combined probabilities ``(B, C)``.

        The same as :meth:`predict_proba` with its defaults, so that ``ensemble(x)`` works.
        """
        return self.predict_proba(x)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        selected_only: bool = False,
        calibrated: bool = True,
        argument: str = "ENSEMBLE_DIR",
    ) -> Ensemble:
        """Load every member of an ensemble directory (or only the recorded selection).

        With ``selected_only`` the selection's weights (if any) become the member weights.
        With ``calibrated`` the temperatures of ``pat calibrate`` are loaded too (the team's
        own temperature for ``selected_only``).
        """
        from pat.ensemble.members import load_members
        from pat.store import EnsembleDir

        ens = EnsembleDir.load(path, argument=argument)
        check(len(ens) > 0, f"{argument} {str(ens.path)!r} holds no members.")
        indices, weights = list(range(len(ens))), None
        if selected_only:
            selection = ens.selection_indices()
            if selection is None:
                raise PatError(f"{argument} {str(ens.path)!r} has no recorded selection; "
                               "select members first or load all of them.")
            indices, weights = selection
        records = [ens.members[i] for i in indices]
        models = load_members(ens, records, device=device)  # a packed file is read once
        temperature = member_ts = None
        record = ens.calibration(argument=argument) if calibrated else None
        if record is not None:
            member_ts = [record["members"][r["name"]] for r in records]
            if not selected_only:
                temperature = record["ensemble"]
            elif (record.get("selection") or {}).get("selected") == [r["name"] for r in records]:
                temperature = record["selection"]["temperature"]
        return cls(models, [r["name"] for r in records], weights, temperature=temperature,
                   member_temperatures=member_ts).to(device)
