"""pat.children (pat.split): children of any classifier, and saving / loading them."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pat.children import load_child, save_child, split
from pat.engine.checkpoint import save_model
from pat.errors import PatError
from pat.masks import apply_masks, check_masks, generate_masks, prunable_parameters
from pat.models import create_model, get_classifier
from pat.records import Child


@pytest.fixture(scope="module")
def parent() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=5).eval()


def test_children_are_masked_copies_and_the_parent_is_untouched(parent):
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    children = split(parent, 4, method="anti-random", seed=3)
    assert all(torch.equal(v, before[k]) for k, v in parent.state_dict().items())
    assert len(children) == 4 and not hasattr(parent, "pat_child")
    for i, child in enumerate(children):
        assert child is not parent and child.pat_child.recipe == {
            "method": "anti-random", "sparsity": 0.5, "level": "connection", "scope": "layer",
            "seed": 3, "index": i, "physical": False, "children": 4, "rescale": True,
        }  # fmt: skip
        check_masks(child, child.pat_child.masks)
        head = get_classifier(child)
        assert all(
            p is not head.weight for n, p in child.named_parameters() if n in child.pat_child.masks
        )
    a, b = children[0].pat_child.masks, children[1].pat_child.masks
    assert all((a[k] ^ b[k]).all() for k in a)  # a complement pair


def test_partition_default_sparsity_and_conflicting_sparsity(parent):
    children = split(parent, 3, method="partition")
    assert children[0].pat_child.recipe["sparsity"] == pytest.approx(2 / 3)
    with pytest.raises(PatError, match="sparsity=0.5"):
        split(parent, 3, method="partition", sparsity=0.5)


def test_excluded_layers_keep_all_their_weights(parent):
    child = split(parent, 2, exclude=["layers.0.*"])[0]
    assert not any(k.startswith("layers.0.") for k in child.pat_child.masks)
    w = child.get_submodule("layers.0.0.conv1").weight
    assert w.count_nonzero() == w.numel()


def test_physical_needs_neuron_level(parent):
    with pytest.raises(PatError, match="physical=True.*level='connection'"):
        split(parent, 2, physical=True)


def test_neuron_level_without_spec_or_inputs_asks_for_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    with pytest.raises(PatError, match="example_inputs"):
        split(model, 2, level="neuron")


def test_nothing_to_prune_is_refused(parent):
    with pytest.raises(PatError, match="nothing to prune"):
        split(parent, 2, include=["no-such-layer"])
    with pytest.raises(PatError, match=r"model must be a torch.nn.Module. Got str \(a checkpoint's path\? pat.load_model"):
        split("parent.pt", 2)  # a checkpoint's path is not its model: pat.load_model reads it


def test_masked_child_round_trips(parent, tmp_path):
    child = split(parent, 2, method="cyclic", sparsity=0.7, seed=5)[1]
    save_child(tmp_path / "c.pt", child, metrics={"acc": 0.5})
    loaded = load_child(tmp_path / "c.pt")
    assert loaded.pat_child.recipe == child.pat_child.recipe
    assert set(loaded.pat_child.masks) == set(child.pat_child.masks)
    assert all(torch.equal(loaded.pat_child.masks[k], v) for k, v in child.pat_child.masks.items())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), child(x))


def test_loading_a_child_whose_masks_do_not_fit_fails(parent, tmp_path):
    child = split(parent, 2)[0]
    name = next(iter(child.pat_child.masks))
    masks = dict(child.pat_child.masks)
    masks[name] = ~masks[name]  # the other child's mask
    save_model(tmp_path / "bad.pt", child, kind="child", masks=masks, recipe=child.pat_child.recipe)
    with pytest.raises(PatError, match="masked entries"):
        load_child(tmp_path / "bad.pt")


def test_loading_a_plain_model_as_child_fails(parent, tmp_path):
    save_model(tmp_path / "m.pt", parent)
    with pytest.raises(PatError, match="not a child"):
        load_child(tmp_path / "m.pt")


def test_physical_child_is_thinner_and_round_trips(parent, tmp_path):
    masked, physical = (
        split(parent, 2, method="anti-random", level="neuron", physical=p, seed=1)[0]
        for p in (False, True)
    )
    assert physical.pat_child.masks == {} and physical.pat_child.kept
    assert sum(p.numel() for p in physical.parameters()) < 0.4 * sum(
        p.numel() for p in parent.parameters()
    )
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(physical(x), masked(x), rtol=1e-4, atol=1e-5)
    save_child(tmp_path / "p.pt", physical)
    loaded = load_child(tmp_path / "p.pt")
    assert loaded.pat_child.kept == physical.pat_child.kept
    torch.testing.assert_close(loaded.eval()(x), physical(x))


TORCHVISION = ["resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0",
               "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_split_in_connection_mode(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    head = get_classifier(model)
    head_name = next(n for n, m in model.named_modules() if m is head)
    if name in ("vit_b_16", "swin_t"):
        # The big transformers: masks and applying them only, on the model itself
        # (no deep copies, no forward), to keep the test short.
        masks = generate_masks(prunable_parameters(model), children=2, method="anti-random")
        apply_masks(model, masks[0])
        children = [model]
        model.pat_child = Child(masks=masks[0])
    else:
        children = split(model, 2, method="anti-random")
        masks = [c.pat_child.masks for c in children]
        with torch.no_grad():
            assert children[0](torch.randn(1, 3, 64, 64)).shape == (1, 10)
    for child in children:
        assert f"{head_name}.weight" not in child.pat_child.masks and child.pat_child.masks
        check_masks(child, child.pat_child.masks)
    assert all((masks[0][k] ^ masks[1][k]).all() for k in masks[0])


def test_a_child_carries_one_typed_record_that_tuning_fills_in(digits):
    from pat.config import DataConfig, TuneConfig
    from pat.tuner import tune

    children = split(create_model("lenet-s", in_channels=1), 2, method="anti-random")
    for child in children:  # the architecture spec every created model has, and the child's record
        assert {k for k in vars(child) if k.startswith("pat_")} == {"pat_spec", "pat_child"}
        assert isinstance(child.pat_child, Child) and child.pat_child.metrics is None
    tune(children, digits, TuneConfig(epochs=1, max_lr=0.05, data=DataConfig(batch_size=128)))
    for i, child in enumerate(children):
        record = child.pat_child
        assert record.recipe["index"] == i and record.masks and record.kept is None
        assert 0 < record.metrics["val_acc"] <= 1 and record.cost["steps"] == len(digits.train.y) // 128 + 1
    plain = create_model("lenet-s", in_channels=1)
    tune([plain], digits, TuneConfig(epochs=1, max_lr=0.05))  # a plain model gets a record too
    assert plain.pat_child.masks == {} and plain.pat_child.cost["steps"] > 0
