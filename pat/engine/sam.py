"""Sharpness-aware step rules: ``sam`` and the SharpBalance ``sharpbalance-mixed`` step.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021) takes two passes per batch::

    g  = ∇L(w)                              first pass, at w
    e  = rho · T²g / ‖T g‖                  T = I (SAM) or diag(|w|) (adaptive, ASAM)
    g' = ∇L(w + e)                          second pass, at the perturbed point
    w ← optimizer.step(w, g')               any torch optimizer, state untouched by e

``‖·‖`` is the global L2 norm over every parameter that has a gradient (Kwon et al.,
"ASAM", ICML 2021 for the adaptive variant). The weights are restored from a saved copy,
not by subtracting ``e``, so a masked (zero) weight is exactly zero again before the
optimizer step. BatchNorm running statistics are updated in both passes, as in the
reference implementations; the second pass sees perturbed weights, so the stored stats
are a blend of the two, which the usual SAM recipes accept.

The mixed step (Li et al., "SharpBalance", 2024) applies SAM to some samples of a batch
and plain SGD to the rest. Which samples is a per-sample boolean ``sam_mask`` over the
whole training split, looked up through the indices that :class:`pat.data.loader.IndexedBatches` records
for the current batch, so :func:`pat.engine.loop.fit` runs it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim import Optimizer

from pat.data.loader import IndexedBatches
from pat.engine.steps import LossFn, StepRule, sgd_step
from pat.errors import check
from pat.registry import STEPS

__all__ = [
    "SAMStep",
    "MixedSAMStep",
    "sam_perturbation",
    "per_sample_sharpness",
    "measure_sharpness",
]

Autocast = Callable[[], AbstractContextManager]


@torch.no_grad()
def sam_perturbation(params: list[Tensor], rho: float, *, adaptive: bool = False) -> list[Tensor]:
    """The ascent step ``e`` of SAM (or ASAM) from the gradients stored in ``params``.

    Args:
        params: parameters whose ``.grad`` holds ∇L(w).
        rho: radius; ‖T⁻¹e‖ = rho.
        adaptive: scale by ``|w|`` (ASAM): ``e = rho · w²·g / ‖|w|·g‖``.

    Returns:
        One tensor per parameter, shaped like it. All zeros when the gradient is zero.
    """
    scaled = [p.grad * p.abs() if adaptive else p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    # a zero gradient has no ascent direction: e = 0 rather than 0/0
    scale = rho / norm.clamp_min(1e-12)
    return [(s * p.abs() if adaptive else s) * scale for s, p in zip(scaled, params, strict=True)]


def _with_grad(model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> list[Tensor]:
    """Parameters that have a gradient; with ``masks``, their pruned entries' gradients zeroed.

    Zeroing the first-pass gradient keeps ``e`` (and its norm) inside the kept weights, so a
    pruned weight is never perturbed; that gradient is discarded after ``e`` is made.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if masks:
        with torch.no_grad():
            for n, p in named:
                if n in masks:
                    p.grad.mul_(masks[n])
    return [p for _, p in named]


class _Perturbed:
    """Context: weights at ``w + e`` inside, restored bit-exactly from a copy on exit."""

    def __init__(self, params: list[Tensor], e: list[Tensor]) -> None:
        self.params, self.e = params, e

    def __enter__(self) -> None:
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.params]
            torch._foreach_add_(self.params, self.e)

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved)


class SAMStep:
    """The SAM step rule (see the module docstring); ``create_step("sam", rho=0.05)``.

    Args:
        rho: perturbation radius (0.05 is Foret et al.'s CIFAR default; ASAM uses ~0.5-2).
        adaptive: ASAM's scale-invariant perturbation.
        masks: ``{param name: bool mask}`` of a pruned child: pruned weights are not
            perturbed (their entries of ``e`` are 0). Keeping them at zero through the update
            is still the mask callback's job.
    """

    def __init__(self, rho: float = 0.05, adaptive: bool = False,
                 masks: Mapping[str, Tensor] | None = None) -> None:
        check(rho > 0, f"rho must be positive. Got {rho}.")
        self.rho, self.adaptive, self.masks = float(rho), bool(adaptive), masks

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, optimizer: Optimizer,
                 loss_fn: LossFn, autocast: Autocast) -> tuple[Tensor, Tensor]:
        """Take one SAM step on the batch; a step rule (:mod:`pat.engine.steps`).

        Returns:
            The batch's loss and (B, C) logits at the unperturbed weights, both detached.
        """
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
            loss = loss_fn(logits, y)
        loss.backward()
        params = _with_grad(model, self.masks)
        e = sam_perturbation(params, self.rho, adaptive=self.adaptive)
        optimizer.zero_grad(set_to_none=True)
        with _Perturbed(params, e):
            with autocast():
                loss_fn(model(x), y).backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    def __repr__(self) -> str:
        return f"SAMStep(rho={self.rho}, adaptive={self.adaptive})"


class MixedSAMStep:
    """SharpBalance's step: SAM on the batch's samples in ``sam_mask``, SGD on the others.

    For a batch of B samples split into S (in the mask) and R (the rest), with per-sample
    losses ℓ_i and ``loss_fn`` a mean::

        e  = rho · g_S / ‖g_S‖,      g_S = ∇ mean_{i∈S} ℓ_i(w)
        g' = |S|/B · ∇ mean_{i∈S} ℓ_i(w + e)  +  |R|/B · ∇ mean_{i∈R} ℓ_i(w)

    i.e. the gradient of the batch-mean loss with the SAM samples evaluated at the perturbed
    point. With S = all it is the SAM step; with S empty, the plain step. Each subset goes
    through the model as its own forward pass, so BatchNorm normalises S and R with their own
    statistics (and updates its running stats from both).

    Args:
        rho: perturbation radius.
        sam_mask: (N,) bool over the training split (on the batches' device).
        batches: the :class:`IndexedBatches` that :func:`fit` iterates; read for the indices.
        adaptive: ASAM perturbation.
        masks: pruned weights that are not perturbed (see :class:`SAMStep`).
    """

    def __init__(self, rho: float, sam_mask: Tensor, batches: IndexedBatches, *,
                 adaptive: bool = False, masks: Mapping[str, Tensor] | None = None) -> None:
        check(rho > 0, f"rho must be positive. Got {rho}.")
        check(sam_mask.dtype == torch.bool and sam_mask.dim() == 1,
              f"sam_mask must be a (N,) bool tensor. Got {tuple(sam_mask.shape)} {sam_mask.dtype}.")
        self.rho, self.adaptive, self.masks = float(rho), bool(adaptive), masks
        self.sam_mask, self.batches = sam_mask, batches

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, optimizer: Optimizer,
                 loss_fn: LossFn, autocast: Autocast) -> tuple[Tensor, Tensor]:
        """Take one mixed step on the batch; a step rule (:mod:`pat.engine.steps`).

        Returns:
            The batch-mean loss and (B, C) logits at the unperturbed weights, both detached.
        """
        check(self.batches.indices is not None and len(self.batches.indices) == len(y),
              "the mixed SAM step needs the IndexedBatches it was built with as fit's data.")
        mask = self.sam_mask.to(y.device)[self.batches.indices]
        n_sam = int(mask.sum())
        if n_sam == 0:
            return sgd_step(model, x, y, optimizer, loss_fn, autocast)
        if n_sam == len(y):
            return SAMStep(self.rho, self.adaptive, self.masks)(model, x, y, optimizer, loss_fn, autocast)
        rest, batch = ~mask, len(y)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits_s = model(x[mask])
            loss_s = loss_fn(logits_s, y[mask])
        loss_s.backward()
        params = _with_grad(model, self.masks)
        e = sam_perturbation(params, self.rho, adaptive=self.adaptive)
        optimizer.zero_grad(set_to_none=True)
        with _Perturbed(params, e):
            with autocast():
                (loss_fn(model(x[mask]), y[mask]) * (n_sam / batch)).backward()
        with autocast():
            logits_r = model(x[rest])
            loss_r = loss_fn(logits_r, y[rest])
        (loss_r * ((batch - n_sam) / batch)).backward()  # accumulates onto the SAM part
        optimizer.step()
        logits = torch.empty(batch, logits_s.shape[1], dtype=logits_s.dtype, device=logits_s.device)
        logits[mask], logits[rest] = logits_s.detach(), logits_r.detach().to(logits_s.dtype)
        loss = (loss_s.detach().float() * n_sam + loss_r.detach().float() * (batch - n_sam)) / batch
        return loss, logits

    def __repr__(self) -> str:
        return f"MixedSAMStep(rho={self.rho}, adaptive={self.adaptive}, sam={int(self.sam_mask.sum())})"


# -- sharpness measures ---------------------------------------------------------------------------


def per_sample_sharpness(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.cross_entropy) -> Tensor:
    """Squared norm of each sample's loss gradient, ‖∇_w ℓ(f(x_i; w), y_i)‖², in one vmap.

    SharpBalance's per-sample sharpness proxy. The model runs in eval mode (BatchNorm uses
    its running statistics, so a sample's score does not depend on its batch); the train/eval
    flag is restored afterwards. ``torch.func.vmap(grad(...))`` over
    ``functional_call`` computes all B gradients in one batched pass.

    Args:
        model: the network scored; its parameters are not changed.
        x: (B, ...) inputs.
        y: (B,) labels.
        loss_fn: a mean loss of ``(logits, labels)``; each sample is scored alone.

    Returns:
        (B,) float32 scores.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out.float(), yi.unsqueeze(0))

    was_training = model.training
    model.eval()
    try:
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    finally:
        model.train(was_training)
    return sum(g.flatten(1).float().square().sum(1) for g in grads.values())


def _batch_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    with torch.no_grad():
        return loss_fn(model(x).float(), y)


def measure_sharpness(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    rho: float,
    draws: int = 5,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, float]:
    """Average loss increase under adaptive perturbations of radius ``rho`` (eval mode).

    For each batch b, with T = diag(|w|) (scale-invariant, Kwon et al. 2021; the adaptive
    sharpness of Andriushchenko et al., "A Modern Look at the Relationship between Sharpness
    and Generalization", ICML 2023)::

        random: mean over ``draws`` of  L_b(w + T·rho·d/‖d‖) - L_b(w),   d ~ N(0, I)
        worst:  L_b(w + rho·T²g/‖Tg‖) - L_b(w),   g = ∇L_b(w)   (one ascent step)

    both averaged over batches weighted by batch size. The weights are restored exactly.

    Returns:
        ``{"loss": mean L(w), "random": ..., "worst": ...}``.
    """
    check(rho > 0, f"rho must be positive. Got {rho}.")
    check(draws >= 1, f"draws must be >= 1. Got {draws}.")
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)  # CPU stream: the same draws on every device
    total = {"loss": 0.0, "random": 0.0, "worst": 0.0}
    n = 0
    try:
        for x, y in batches:
            base = _batch_loss(model, x, y, loss_fn)
            rand = 0.0
            for _ in range(draws):
                d = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in d]))
                e = [p.detach().abs() * t * (rho / norm) for p, t in zip(params, d, strict=True)]
                with _Perturbed(params, e):
                    rand += float(_batch_loss(model, x, y, loss_fn) - base)
            model.zero_grad(set_to_none=True)
            loss_fn(model(x).float(), y).backward()
            moved = _with_grad(model)
            e = sam_perturbation(moved, rho, adaptive=True)
            model.zero_grad(set_to_none=True)
            with _Perturbed(moved, e):
                worst = float(_batch_loss(model, x, y, loss_fn) - base)
            total["loss"] += float(base) * len(y)
            total["random"] += rand / draws * len(y)
            total["worst"] += worst * len(y)
            n += len(y)
    finally:
        model.train(was_training)
    check(n > 0, "sharpness data is empty.")
    return {k: v / n for k, v in total.items()}


@STEPS.register("sam")
def _sam(rho: float = 0.05, adaptive: bool = False, masks: Mapping[str, Tensor] | None = None) -> StepRule:
    return SAMStep(rho, adaptive, masks)


@STEPS.register("sharpbalance-mixed")
def _mixed(rho: float, sam_mask: Tensor, batches: IndexedBatches, adaptive: bool = False,
           masks: Mapping[str, Tensor] | None = None) -> StepRule:
    return MixedSAMStep(rho, sam_mask, batches, adaptive=adaptive, masks=masks)
