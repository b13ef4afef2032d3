"""Member predictions: collect every member's softmax on a split once, cache it, combine it.

Everything downstream (selectors, metrics, plots) works on the ``(M, N, C)`` tensor of
probabilities that :func:`collect_probs` returns, so a split is run through the members
once, not once per selector or metric.

Two ways to run M members on a batch:

- ``"loop"``: a Python loop, one forward per member. Works for any members, including
  physically pruned children of different widths.
- ``"vmap"``: ``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``: one
  batched forward for all members (convolutions become grouped convolutions). Needs
  members of one architecture with identical parameter shapes (masked children qualify).

``path="auto"`` picks ``"vmap"`` on CUDA when the members allow it and ``"loop"``
otherwise: on CPU the loop was as fast or faster in ``benchmarks/ensemble_inference.py``
(see ``docs/ensemble.md`` for the figures).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from pat.errors import PatError, check

__all__ = [
    "COMBINERS",
    "check_probs",
    "normalize_weights",
    "same_architecture",
    "choose_path",
    "eval_mode",
    "MemberRunner",
    "collect_logits",
    "collect_probs",
    "cached_logits",
    "cached_probs",
    "combine",
]

COMBINERS = ("mean", "weighted", "vote")
_WORDS = {"probs": "probabilities", "logits": "logits"}
_PATHS = ("auto", "loop", "vmap")


# -- validation shared by the whole ensemble package --------------------------------------
def check_probs(
    probs: Tensor | Sequence[Tensor], labels: Tensor | None = None, *, argument: str = "probs"
) -> Tensor:
    """Return ``probs`` as an ``(M, N, C)`` float tensor, or raise one-line :class:`PatError`.

    Args:
        probs: ``(M, N, C)`` member probabilities, or a sequence of M ``(N, C)`` tensors.
        labels: optional ``(N,)`` integer labels checked against ``probs``.
        argument: how the error messages name ``probs`` (e.g. ``"val_probs"``).
    """
    if not isinstance(probs, Tensor):
        probs = list(probs)
        check(probs, f"{argument} must hold at least one member. Got 0.")
        for i, p in enumerate(probs):
            if p.dim() != 2:
                raise PatError(f"{argument}[{i}] must be (N, C). Got shape {tuple(p.shape)}.")
            if p.shape[1] != probs[0].shape[1]:
                raise PatError(
                    f"members have different class counts: member 0 has {probs[0].shape[1]}, "
                    f"member {i} has {p.shape[1]}."
                )
            if p.shape[0] != probs[0].shape[0]:
                raise PatError(
                    f"members have predictions for different numbers of samples: member 0 has "
                    f"{probs[0].shape[0]}, member {i} has {p.shape[0]}."
                )
        probs = torch.stack(probs)
    if probs.dim() != 3:
        raise PatError(f"{argument} must be (M, N, C). Got shape {tuple(probs.shape)}.")
    check(probs.shape[0] >= 1, f"{argument} must hold at least one member. Got 0.")
    check(probs.is_floating_point(), f"{argument} must be a float tensor. Got {probs.dtype}.")
    if labels is not None:
        if labels.dim() != 1 or labels.shape[0] != probs.shape[1]:
            raise PatError(
                f"labels must be ({probs.shape[1]},) to match {argument} {tuple(probs.shape)}. "
                f"Got shape {tuple(labels.shape)}."
            )
        check(not labels.is_floating_point(), f"labels must be integers. Got {labels.dtype}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= probs.shape[2]):
            raise PatError(
                f"labels must be in [0, {probs.shape[2]}). Got values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
    return probs


def normalize_weights(weights: Any, size: int, *, argument: str = "weights") -> Tensor:
    """Return ``weights`` as a float32 ``(size,)`` tensor summing to 1, or raise PatError."""
    w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu().flatten()
    if w.numel() != size:
        raise PatError(f"{argument} must have one entry per member ({size}). Got {w.numel()}.")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise PatError(
            f"{argument} must be finite, non-negative and not all zero. Got {w.tolist()}."
        )
    return w / w.sum()


# -- running members --------------------------------------------------------------------
def same_architecture(models: Sequence[nn.Module]) -> bool:
    """True when every member has the class, parameter and buffer names/shapes of the first."""

    def signature(m: nn.Module) -> list[tuple[str, torch.Size, torch.dtype]]:
        tensors = [*m.named_parameters(), *m.named_buffers()]
        return [(k, v.shape, v.dtype) for k, v in tensors]

    ref_type, ref = type(models[0]), signature(models[0])
    return all(type(m) is ref_type and signature(m) == ref for m in models[1:])


def choose_path(models: Sequence[nn.Module], device: torch.device, path: str = "auto") -> str:
    """Resolve ``path`` to ``"loop"`` or ``"vmap"`` (the rule is in the module docstring)."""
    check(path in _PATHS, f"path must be one of {list(_PATHS)}. Got {path!r}.")
    if path == "loop":
        return "loop"
    same = same_architecture(models)
    if path == "vmap":
        check(same, "path='vmap' needs members of one architecture with identical parameter "
                    "shapes; these differ, use path='loop'.")
        return "vmap"
    return "vmap" if same and len(models) > 1 and device.type == "cuda" else "loop"


@contextmanager
def eval_mode(models: Iterable[nn.Module]) -> Iterator[None]:
    """Put members in eval mode and restore each module's own flag afterwards."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class MemberRunner:
    """Run M members on one batch, giving ``(M, B, C)`` float32 outputs.

    :meth:`logits` gives the members' logits; calling the runner gives their softmax.

    Members are moved to ``device``. For the vmap path the members' weights are stacked once
    here; build a new runner after changing them.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        device: str | torch.device | None = None,
        path: str = "auto",
        amp: bool = False,
    ) -> None:
        self.models = list(models)
        check(self.models, "models must hold at least one member. Got 0.")
        self.device = torch.device(device) if device is not None else _device_of(self.models[0])
        self.path = choose_path(self.models, self.device, path)
        self.amp = amp
        for m in self.models:
            m.to(self.device)
        if self.path == "vmap":
            with torch.no_grad(), eval_mode(self.models):
                params, buffers = stack_module_state(self.models)
            # stack_module_state returns fresh leaves that require grad; inference needs none.
            self.params = {k: v.detach() for k, v in params.items()}
            self.buffers = {k: v.detach() for k, v in buffers.items()}
            # The base module only provides the forward code; its own tensors live on "meta".
            self.base = copy.deepcopy(self.models[0]).to("meta").eval()
            self._batched = vmap(self._one, in_dims=(0, 0, None))

    def _one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def logits(self, x: Tensor) -> Tensor:
        """``x``: one input batch ``(B, ...)`` → member logits ``(M, B, C)`` float32."""
        x = x.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.path == "vmap":
                logits = self._batched(self.params, self.buffers, x)
            else:
                logits = torch.stack([m(x) for m in self.models])
        return logits.float()

    def __call__(self, x: Tensor) -> Tensor:
        """``x``: one input batch ``(B, ...)`` → member probabilities ``(M, B, C)``."""
        return self.logits(x).softmax(dim=-1)


def _device_of(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise PatError(f"loader must yield (x, y) batches. Got a {type(batch).__name__}.")
    return batch[0], batch[1]


def collect_logits(
    models: Sequence[nn.Module],
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    amp: bool = False,
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Every member's logits on every sample of ``loader``.

    Members run in eval mode under ``torch.inference_mode`` (their train/eval flags are
    restored afterwards) and are moved to ``device`` (default: the first member's device).
    The loader is iterated once.

    Args:
        models: M members (classifiers returning logits).
        loader: yields ``(x, y)`` batches.
        device: where the members run; default: the first member's device.
        amp: bf16 autocast for the forward; logits are returned in float32.
        path: ``"auto"``, ``"loop"`` or ``"vmap"`` (see the module docstring).

    Returns:
        ``logits`` ``(M, N, C)`` float32 on CPU, and ``labels`` ``(N,)`` int64 on CPU.
    """
    runner = MemberRunner(models, device=device, path=path, amp=amp)
    logits, labels = [], []
    with eval_mode(runner.models), torch.inference_mode():
        for batch in loader:
            x, y = _split_batch(batch)
            logits.append(runner.logits(x).cpu())
            labels.append(y.reshape(-1).cpu())
    check(logits, "loader yielded no batches.")
    return torch.cat(logits, dim=1), torch.cat(labels).long()


def collect_probs(
    models: Sequence[nn.Module],
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    amp: bool = False,
    path: str = "auto",
    temperatures: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Every member's softmax on every sample of ``loader`` (see :func:`collect_logits`).

    Args:
        models: M members (classifiers returning logits).
        loader: yields ``(x, y)`` batches.
        device: where the members run; default: the first member's device.
        amp: bf16 autocast for the forward; probabilities are returned in float32.
        path: ``"auto"``, ``"loop"`` or ``"vmap"`` (see the module docstring).
        temperatures: one per member; member m's probabilities are ``softmax(z_m / T_m)``
            (:func:`pat.ensemble.calibration.fit_temperature`). Default: raw softmax.

    Returns:
        ``probs`` ``(M, N, C)`` float32 on CPU, and ``labels`` ``(N,)`` int64 on CPU.
    """
    logits, labels = collect_logits(models, loader, device=device, amp=amp, path=path)
    if temperatures is not None:
        t = torch.as_tensor(list(temperatures), dtype=torch.float32)
        check(t.numel() == logits.shape[0] and bool((t > 0).all()),
              f"temperatures must be {logits.shape[0]} positive numbers. Got {t.tolist()}.")
        logits = logits / t[:, None, None]
    return logits.softmax(dim=-1), labels


# -- the cache --------------------------------------------------------------------------
def cached_probs(
    ens_dir: Any,
    split_name: str,
    compute: Callable[[], tuple[Tensor, Tensor]],
    *,
    key: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Probabilities of all members of ``ens_dir`` on a split, computed once and cached.

    The cache is ``<ens_dir>/probs-<split_name>.pt``. It is reused only while the member
    files are unchanged (names, files, sizes, mtimes and inodes, see
    :meth:`EnsembleDir.fingerprint`) and ``key`` (describe the data here: dataset, split
    size, corruption, ...) is equal; otherwise ``compute()`` runs and the cache is rewritten.

    Args:
        ens_dir: a :class:`pat.store.EnsembleDir`.
        split_name: a file-name-safe split name such as ``"val"`` or ``"test-contrast-3"``.
        compute: returns ``(probs (M, N, C), labels (N,))`` for the manifest's members in order.
        key: a JSON-able description of the data the cache must match (see above).
    """
    return _cached(ens_dir, "probs", split_name, compute, key, check_probs)


def cached_logits(
    ens_dir: Any,
    split_name: str,
    compute: Callable[[], tuple[Tensor, Tensor]],
    *,
    key: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Like :func:`cached_probs` for member logits ``(M, N, C)``: ``<ens_dir>/logits-<split>.pt``.

    Logits, not probabilities, are what temperature scaling and the energy score need;
    ``softmax`` of them gives the probabilities.
    """

    def check_logits(logits: Tensor, labels: Tensor, *, argument: str) -> Tensor:
        check(logits.dim() == 3, f"{argument} must be (M, N, C). Got shape {tuple(logits.shape)}.")
        check(bool(torch.isfinite(logits).all()), f"{argument} holds non-finite values.")
        check_probs(logits.float().softmax(-1), labels, argument=argument)
        return logits

    return _cached(ens_dir, "logits", split_name, compute, key, check_logits)


def _cached(ens_dir: Any, kind: str, split_name: str, compute: Callable[[], tuple[Tensor, Tensor]],
            key: dict[str, Any] | None, validate: Callable[..., Tensor]) -> tuple[Tensor, Tensor]:
    from pat.engine.checkpoint import load_checkpoint, save_checkpoint

    check(split_name and all(c.isalnum() or c in "-_." for c in split_name),
          f"split_name must be a non-empty file-name-safe string. Got {split_name!r}.")
    file = ens_dir.path / f"{kind}-{split_name}.pt"
    stamp = {"members": ens_dir.fingerprint(), "key": key or {}}
    if file.is_file():
        try:
            cached = load_checkpoint(file, argument=f"{kind} cache")
        except PatError:
            cached = None  # unreadable cache: recompute and overwrite it
        if cached is not None and cached.get("stamp") == stamp:
            return cached[kind], cached["labels"]
    values, labels = compute()
    values = validate(values, labels, argument=f"compute() {kind}")
    check(values.shape[0] == len(ens_dir),
          f"compute() returned {_WORDS[kind]} of {values.shape[0]} members; the ensemble has "
          f"{len(ens_dir)}.")
    values, labels = values.float().cpu().contiguous(), labels.long().cpu().contiguous()
    save_checkpoint(file, {"kind": kind, "split": split_name, "stamp": stamp,
                           kind: values, "labels": labels})
    return values, labels


# -- combiners --------------------------------------------------------------------------
def combine(probs: Tensor, method: str = "mean", weights: Any = None) -> Tensor:
    """Combine member probabilities ``(M, N, C)`` into ensemble probabilities ``(N, C)``.

    - ``"mean"``: the average of the members' softmax (weights must be None).
    - ``"weighted"``: ``sum_m w_m p_m`` with ``weights`` (M,) normalised to sum to 1.
    - ``"vote"``: majority vote of the members' argmax, one vote each, blended with half a
      vote of the mean probability: ``(votes + 0.5 * mean) / (M + 0.5)``. A class with more
      votes always wins (half a vote cannot overturn one), ties go to the class of higher
      mean probability, rows sum to 1 and NLL stays finite.
    """
    probs = check_probs(probs)
    check(method in COMBINERS, f"method must be one of {list(COMBINERS)}. Got {method!r}.")
    m, _, c = probs.shape
    if method == "mean":
        check(weights is None, "weights are used by method='weighted'; got weights with "
                               "method='mean'.")
        return probs.mean(dim=0)
    if method == "weighted":
        check(weights is not None, "method='weighted' needs weights. Got None.")
        w = normalize_weights(weights, m).to(probs)
        return torch.einsum("m,mnc->nc", w, probs)
    check(weights is None, "method='vote' counts one vote per member; got weights.")
    votes = nn.functional.one_hot(probs.argmax(-1), c).sum(dim=0).to(probs)
    return (votes + 0.5 * probs.mean(dim=0)) / (m + 0.5)
