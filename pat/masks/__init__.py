"""Masks: which weights each child keeps.

* :mod:`pat.masks.generate`: random / anti-random / partition / cyclic masks, pure and seeded;
* :mod:`pat.masks.apply`: which tensors are pruned, enforcing masks during training, accounting;
* :mod:`pat.masks.groups`: the coupled output channels a neuron mask keeps or removes together;
* :mod:`pat.masks.physical`: physical channel removal (torch-pruning).

See ``docs/masks.md``.
"""

from pat.masks.apply import MaskSet as MaskSet
from pat.masks.apply import apply_masks as apply_masks
from pat.masks.apply import bake as bake
from pat.masks.apply import check_masks as check_masks
from pat.masks.apply import count_params_macs as count_params_macs
from pat.masks.apply import enforce_masks as enforce_masks
from pat.masks.apply import prunable_parameters as prunable_parameters
from pat.masks.apply import sparsity_report as sparsity_report
from pat.masks.generate import generate_masks as generate_masks
from pat.masks.groups import ChannelGroup as ChannelGroup
from pat.masks.groups import channel_groups as channel_groups
from pat.masks.physical import rebuild_physical as rebuild_physical
from pat.masks.physical import slim as slim

__all__ = [
    "MaskSet",
    "ChannelGroup",
    "apply_masks",
    "bake",
    "channel_groups",
    "check_masks",
    "count_params_macs",
    "enforce_masks",
    "generate_masks",
    "prunable_parameters",
    "rebuild_physical",
    "slim",
    "sparsity_report",
]
