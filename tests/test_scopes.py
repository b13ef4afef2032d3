"""Models torch-pruning cannot trace whole: their blocks shrink inside, their edges stay."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import randomized
from torch import nn

import pat
from pat.errors import PatError
from pat.masks import apply_masks, channel_groups, generate_masks, prunable_parameters, slim
from pat.masks.groups import kept_channels
from pat.masks.physical import rebuild_physical
from pat.masks.scopes import scope_inputs, split_key

X = torch.randn(2, 3, 16, 16)


class Refuses(nn.Module):
    """Stands in for an op the tracer cannot follow (ShuffleNet's shuffle, Swin's windows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("unsupported op")
        return x.flip(1)  # a channel permutation, as a shuffle is


class Bottleneck(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(hidden, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(self.a(x)))  # its output channels are its input's


class Shuffled(nn.Module):
    def __init__(self, c: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.block1, self.block2 = Bottleneck(c, hidden), Bottleneck(c, hidden)
        self.shuffle = Refuses()
        self.mlp = nn.Sequential(nn.Linear(c, 16), nn.GELU(), nn.Linear(16, c))
        self.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.shuffle(self.block1(self.stem(x))))
        x = x.mean((2, 3))
        return self.fc(x + self.mlp(x))


def groups_of(model: nn.Module):
    roots = [n.rpartition(".")[0] for n in prunable_parameters(model, example_inputs=X)]
    return channel_groups(model, X, roots=roots)


def test_only_what_is_internal_to_a_block_is_grouped():
    groups = groups_of(Shuffled())
    # the hidden widths of both bottlenecks and of the MLP; never a block's output channels
    # (a residual add ties them to its input) nor the stem's (they cross the shuffle)
    assert sorted(g.root for g in groups) == ["block1.a.0", "block2.a.0", "mlp.0"]
    assert sorted(g.scope for g in groups) == ["block1", "block2", "mlp"]
    assert all(split_key(g.key) == (g.scope, g.root) for g in groups)


def test_scoped_physical_child_equals_neuron_masked_child():
    parent = randomized(Shuffled()).eval()
    groups = groups_of(parent)
    masks = generate_masks(parent, children=2, level="neuron", method="partition", groups=groups)
    for mask in masks:
        masked = copy.deepcopy(parent)
        apply_masks(masked, mask)
        physical = slim(copy.deepcopy(parent), kept_channels(groups, mask), X)
        assert physical.block1.a[0].out_channels == 6 and physical.mlp[0].out_features == 8
        assert physical.block1.b[0].out_channels == 8  # the block's edge stays whole
        with torch.no_grad():
            torch.testing.assert_close(physical(X), masked(X), rtol=1e-4, atol=1e-5)


def test_scoped_child_is_rebuilt_from_its_kept_record():
    parent = randomized(Shuffled()).eval()
    child = pat.split(parent, 2, method="partition", level="neuron", physical=True, example_inputs=X)[1]
    assert all("/" in k for k in child.pat_child.kept)  # "scope/root": replayed within the block
    fresh = rebuild_physical(Shuffled(), child.pat_child.kept, input_shape=[1, 3, 16, 16])
    fresh.load_state_dict(child.state_dict())  # same shapes everywhere
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(X), child.eval()(X))


def test_a_block_called_twice_is_not_a_scope():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(self.body(x))

    calls = scope_inputs(Twice(), X)
    assert "body" not in calls and "body.0" not in calls


def test_nothing_internal_keeps_the_whole_models_refusal():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Refuses(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    with pytest.raises(PatError, match="cannot trace.*unsupported op"):
        channel_groups(model, X, roots=["0"])


def test_a_scope_the_model_lacks_is_refused():
    with pytest.raises(PatError, match="scope 'nope'"):
        slim(Shuffled(), {"nope/nope.0": [0]}, X)
