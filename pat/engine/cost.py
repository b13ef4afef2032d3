"""What a member cost: optimizer steps, samples, training FLOPs, seconds, inference MACs.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one forward pass of
one sample through the model's *real* shapes: a masked child (same shapes, zeros in them)
costs what its dense parent costs, a physically slimmed child (fewer channels) costs less.
Training FLOPs = 3 × forward FLOPs per sample × sample passes: a backward pass costs about two
forwards (Kaplan et al., 2020), and a SAM step makes two forward/backward passes per sample,
so its samples count twice (SharpBalance's mixed step: only its SAM samples count twice).
Inference MACs = forward FLOPs / 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pat.budget import TRAIN_FLOPS_PER_FORWARD  # forward + backward ≈ 3 forwards

if TYPE_CHECKING:
    from pat.data import Dataset
    from pat.engine.callbacks import FitState

__all__ = [
    "TRAIN_FLOPS_PER_FORWARD",
    "example_input",
    "forward_flops",
    "inference_macs",
    "sample_passes",
    "training_cost",
    "fit_cost",
    "sum_costs",
]

_SUMMED = ("steps", "samples", "flops", "seconds")


def _one_sample(example_input: Tensor) -> Tensor:
    return example_input[:1] if example_input.dim() > 0 and len(example_input) > 1 else example_input


def example_input(data: Dataset, device: torch.device | str = "cpu") -> Tensor:
    """A (1, C, H, W) zero sample of ``data``'s training split (what the model is fed)."""
    return torch.zeros(1, *data.sample_shape, device=device)


def forward_flops(model: nn.Module, example_input: Tensor) -> int:
    """FLOPs of one forward pass of one sample (the first of ``example_input`` (B, ...)).

    Runs in eval mode under ``torch.no_grad``; the model's train/eval flags are restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    flags = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), example_input.device)
    x = _one_sample(example_input).to(device)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, training in flags.items():
            m.training = training
    return int(counter.get_total_flops())


def inference_macs(model: nn.Module, example_input: Tensor) -> int:
    """Multiply-accumulates of one forward pass of one sample (= FLOPs / 2)."""
    return forward_flops(model, example_input) // 2


def sample_passes(step: Any, y: Tensor) -> int | Tensor:
    """Forward/backward passes the step rule ``step`` just made over the batch with labels ``y``.

    Plain steps: one per sample. SAM: two per sample. SharpBalance's mixed step: two for
    the batch's SAM samples, one for the rest (a 0-d tensor on the batch's device, so the
    loop need not synchronise every step).
    """
    from pat.engine.sam import MixedSAMStep, SAMStep

    if isinstance(step, SAMStep):
        return 2 * len(y)
    if isinstance(step, MixedSAMStep) and step.batches.indices is not None:
        n_sam = step.sam_mask.to(y.device)[step.batches.indices].sum()
        return n_sam + len(y)
    return len(y)


def training_cost(forward_flops_per_sample: int, *, steps: int, samples: int, seconds: float,
                  passes: int | None = None) -> dict[str, Any]:
    """The cost record of one training run (plain data, stored in checkpoints and manifests).

    Args:
        forward_flops_per_sample: from :func:`forward_flops`.
        steps: optimizer steps taken.
        samples: training samples seen (one per sample per step, over all epochs).
        seconds: wall-clock training time.
        passes: forward/backward sample passes (:func:`sample_passes`); default ``samples``.
    """
    passes = samples if passes is None else passes
    return {"steps": int(steps), "samples": int(samples),
            "flops": TRAIN_FLOPS_PER_FORWARD * int(forward_flops_per_sample) * int(passes),
            "seconds": float(seconds), "forward_flops_per_sample": int(forward_flops_per_sample)}


def fit_cost(state: FitState, example_input: Tensor, *, model: nn.Module | None = None,
             bn_samples: int = 0, **extra: Any) -> dict[str, Any]:
    """:func:`training_cost` of a finished :func:`pat.engine.loop.fit` run (``extra`` is added).

    ``bn_samples``: samples of the forward-only pass that recomputed the model's BatchNorm
    statistics after the run (:mod:`pat.engine.batchnorm`), charged a forward pass each.
    """
    model = model if model is not None else state.model
    cost = training_cost(forward_flops(model, example_input), steps=state.step,
                         samples=state.samples, seconds=state.seconds, passes=state.sample_passes)
    if bn_samples:
        cost["flops"] += cost["forward_flops_per_sample"] * int(bn_samples)
        cost["bn_samples"] = int(bn_samples)
    return {**cost, **extra}


def sum_costs(costs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum steps, samples, FLOPs and seconds over cost records."""
    return {k: sum(c.get(k) or 0 for c in costs) for k in _SUMMED}
