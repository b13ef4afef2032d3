"""Neuron masks and physical children: coupled channels, and physical == masked."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from model_helpers import randomized
from torch import nn

from pat.errors import PatError
from pat.masks import apply_masks, channel_groups, generate_masks, prunable_parameters, slim
from pat.masks.groups import kept_channels
from pat.masks.physical import rebuild_physical


def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class TinyRes(nn.Module):
    """Residual adds: {stem, body2} share channels, and so do {down, body3}."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.body1, self.body2 = cbr(3, c), cbr(c, c), cbr(c, c)
        self.body3, self.down = (
            cbr(c, 2 * c, 2),
            nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2), nn.BatchNorm2d(2 * c)),
        )
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.body2(torch.relu(self.body1(x))))
        x = torch.relu(self.down(x) + self.body3(x))
        return self.fc(x.mean((2, 3)))


class TinyDense(nn.Module):
    """DenseNet-style concatenation with pre-activation BN over the concatenated input."""

    def __init__(self, g: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, g, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(8 + g), nn.ReLU(), nn.Conv2d(8 + g, g, 3, padding=1))
        self.norm = nn.BatchNorm2d(8 + 2 * g)
        self.fc = nn.Linear(8 + 2 * g, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.fc(torch.relu(self.norm(x)).mean((2, 3)))


def mobilenet() -> nn.Module:
    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=5)


X = torch.randn(1, 3, 32, 32)


def neuron_masks(model: nn.Module, children: int = 2, **kwargs):
    roots = [n.rpartition(".")[0] for n in prunable_parameters(model, example_inputs=X)]
    groups = channel_groups(model, X, roots=roots)
    kwargs = {"method": "anti-random", **kwargs}
    return groups, generate_masks(model, children=children, level="neuron", groups=groups, **kwargs)


def rows_kept(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).all(1)


def test_neuron_masks_are_whole_rows_with_bias_and_norm():
    model = TinyDense()
    _, masks = neuron_masks(model)
    for m in masks:
        w = m["l1.2.weight"]
        rows = rows_kept(w)
        assert torch.equal(rows, w.reshape(w.shape[0], -1).any(1))  # all or nothing per row
        assert torch.equal(m["l1.2.bias"], rows)
        assert torch.equal(m["l2.0.weight"][8:], rows) and torch.equal(m["l2.0.bias"][8:], rows)
        assert torch.equal(m["norm.weight"][8:12], rows)  # the slice of the concatenation


def test_coupled_residual_channels_share_one_decision():
    _, masks = neuron_masks(TinyRes(), children=4, method="cyclic", sparsity=0.5)
    for m in masks:
        assert torch.equal(rows_kept(m["stem.0.weight"]), rows_kept(m["body2.0.weight"]))
        assert torch.equal(rows_kept(m["down.0.weight"]), rows_kept(m["body3.0.weight"]))
        assert torch.equal(m["down.0.bias"], rows_kept(m["down.0.weight"]))
        assert rows_kept(m["body1.0.weight"]).sum() == 4  # exactly half of 8
    assert "fc.weight" not in masks[0]  # the classifier keeps its outputs


def test_neuron_global_scope_keeps_exact_total_and_one_per_group():
    groups, masks = neuron_masks(
        TinyRes(), children=3, method="random", sparsity=0.9, scope="global"
    )
    total = sum(g.channels for g in groups)
    for m in masks:
        kept = kept_channels(groups, m)
        assert sum(len(v) for v in kept.values()) == max(round(0.1 * total), len(groups))
        assert all(len(v) >= 1 for v in kept.values())


def test_partition_with_too_few_channels_is_refused():
    with pytest.raises(PatError, match="keeps no channel"):
        neuron_masks(TinyRes(c=2), children=4, method="partition")


def resnext() -> nn.Module:
    """Grouped 3x3 convolutions: every conv group must keep the same channels."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=5)


MODELS = {"residual": TinyRes, "concat": TinyDense, "depthwise-se": mobilenet, "grouped": resnext}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_physical_child_equals_neuron_masked_child(name):
    parent = randomized(MODELS[name]())
    groups, masks = neuron_masks(parent, children=2, method="cyclic", sparsity=0.5)
    x = torch.randn(4, 3, 32, 32)
    for mask in masks:
        masked = copy.deepcopy(parent)
        apply_masks(masked, mask)
        physical = slim(copy.deepcopy(parent), kept_channels(groups, mask), X)
        n_parent = sum(p.numel() for p in parent.parameters())
        assert sum(p.numel() for p in physical.parameters()) < 0.5 * n_parent
        with torch.no_grad():
            for train in (False, True):  # eval: running stats; train: batch statistics
                for model in (masked, physical):
                    model.train(train)
                    for m in model.modules():
                        if isinstance(m, nn.Dropout):
                            m.eval()  # its random draws would differ with the widths
                torch.testing.assert_close(physical(x), masked(x), rtol=1e-4, atol=1e-5)


def test_rebuild_replays_kept_channels_on_a_fresh_parent():
    parent = TinyRes()
    groups, masks = neuron_masks(parent)
    kept = kept_channels(groups, masks[1])
    child = slim(TinyRes(), kept, X)
    fresh = rebuild_physical(TinyRes(), kept, input_shape=[1, 3, 32, 32])
    fresh.load_state_dict(child.state_dict())  # same shapes everywhere
    assert fresh.stem[0].out_channels == len(kept["body2.0"]) == 4  # stem is coupled to body2


def test_bad_kept_channels_are_refused():
    with pytest.raises(PatError, match="body1.0"):
        slim(TinyRes(), {"body1.0": [0, 99]}, X)
    with pytest.raises(PatError, match="does not have"):
        slim(TinyRes(), {"nope": [0]}, X)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.odd = Refuses()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.odd(self.conv(x)).mean((2, 3)))


class Refuses(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # stands in for any op the tracer cannot follow
            raise RuntimeError("unsupported op")
        return x


def test_untraceable_model_names_the_layer():
    with pytest.raises(PatError, match="at layer 'odd'.*unsupported op"):
        channel_groups(Untraceable(), X, roots=["conv"])


def test_norm_without_affine_terms_leaves_its_group_whole():
    # Without weight and bias, a BatchNorm turns a zero channel into -mean/std in eval mode:
    # such a channel cannot be silenced by a mask, so its group is not pruned.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5),
    )  # fmt: skip
    model(X)  # materialise the lazy head
    groups = channel_groups(model, X, roots=["0", "3"])
    assert [g.root for g in groups] == ["3"]
