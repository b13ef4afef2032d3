"""Rescaling kept weights at split time: which layers, by how much, and what it restores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat.children import split
from pat.config import SplitConfig
from pat.engine.checkpoint import load_model
from pat.errors import PatError
from pat.masks.rescale import normalized_layers


def mlp(width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def test_kept_weights_are_scaled_by_n_over_kept_and_pairs_average_to_the_parent():
    parent = mlp()
    a, b = split(parent, 2, method="anti-random", example_inputs=torch.randn(1, 32))
    assert a.pat_child.recipe["rescale"] is True and set(a.pat_child.masks) == {"0.weight", "2.weight"}
    for name, w in parent.named_parameters():
        wa, wb = dict(a.named_parameters())[name], dict(b.named_parameters())[name]
        if name in a.pat_child.masks:
            mask = a.pat_child.masks[name]
            factor = mask.numel() / int(mask.sum())
            assert torch.equal(wa[mask], w[mask] * factor) and not wa[~mask].any()
            # a complement pair of even-sized tensors: the average is the parent again
            torch.testing.assert_close((wa + wb) / 2, w)
        else:  # biases and the classifier are not touched
            assert torch.equal(wa, w) and torch.equal(wb, w)


def test_rescale_false_keeps_the_parents_values():
    parent = mlp()
    child = split(parent, 2, rescale=False, example_inputs=torch.randn(1, 32))[0]
    assert child.pat_child.recipe["rescale"] is False
    for name, mask in child.pat_child.masks.items():
        w, wc = dict(parent.named_parameters())[name], dict(child.named_parameters())[name]
        assert torch.equal(wc[mask], w[mask])


def test_rescaled_children_start_at_the_parents_logit_scale(digits_parent, digits):
    # A trained LeNet-S prunes four layers; their pre-activations are dominated by their
    # means, so each pruned layer at half density halves the logits unless rescaled.
    parent, _ = load_model(digits_parent)
    x = next(iter(digits.loader("test", batch_size=512)))[0]
    with torch.no_grad():
        ref = parent.eval()(x).norm()
        ratios = {
            rescale: [float(c(x).norm() / ref) for c in split(parent, 4, method="random", rescale=rescale)]
            for rescale in (False, True)
        }  # fmt: skip
    assert max(ratios[False]) < 0.25  # about 2**-4
    assert all(0.5 < r < 2 for r in ratios[True])


class ConvNet(nn.Module):
    """conv -> BN, conv -> in-place ReLU -> BN, conv -> permute -> LayerNorm, conv -> pool."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.r2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(8)
        self.c3, self.n3 = nn.Conv2d(8, 8, 3, padding=1), nn.LayerNorm(8)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.n1(self.c1(x))
        x = self.n2(self.r2(self.c2(x)))
        x = self.n3(self.c3(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.relu(self.c4(x))
        return self.fc(x.mean((2, 3)))


def test_layers_that_feed_a_norm_are_found_by_trace_and_left_unscaled():
    model = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    assert normalized_layers(model, x) == {"c1", "c2", "c3"}
    assert normalized_layers(model) == {"c1", "c3"}  # no inputs: registered just before a norm
    parent_w = {n: p.clone() for n, p in model.named_parameters()}
    child = split(model, 2, example_inputs=x)[0]
    for name, mask in child.pat_child.masks.items():
        w = dict(child.named_parameters())[name]
        factor = 1.0 if name != "c4.weight" else mask.numel() / int(mask.sum())
        assert torch.equal(w[mask], parent_w[name][mask] * factor), name


def test_the_trace_leaves_train_mode_and_batchnorm_statistics_alone():
    model = ConvNet().train()
    before = model.n1.running_mean.clone()
    normalized_layers(model, torch.randn(2, 3, 8, 8))
    assert model.training and torch.equal(model.n1.running_mean, before)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"rescale": True, "level": "neuron"}, "neuron level does not rescale. Got level='neuron'."),
        ({"rescale": "yes"}, "rescale must be True, False or None. Got 'yes'."),
    ],
)
def test_bad_rescale_is_one_line_pat_error(kwargs, fragment):
    with pytest.raises(PatError) as e:
        split(mlp(), 2, example_inputs=torch.randn(1, 32), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_config_refuses_rescale_at_neuron_level():
    with pytest.raises(PatError, match="neuron level does not rescale"):
        SplitConfig(level="neuron", rescale=True)
    assert SplitConfig(level="neuron").rescale is None  # the default adapts
