"""Which tensors are pruned, keeping masks through training, and the accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat.engine.callbacks import FitState
from pat.engine.masking import MaskEnforcer
from pat.errors import PatError
from pat.masks import (
    apply_masks,
    bake,
    check_masks,
    count_params_macs,
    enforce_masks,
    generate_masks,
    prunable_parameters,
    sparsity_report,
)
from pat.records import Child


class HeadFirst(nn.Module):
    """Registers its classifier first and the first-called conv last."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 5)  # the classifier, registered before everything else
        self.late = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Linear(8, 8)
        self.early = nn.Conv2d(3, 8, 3, padding=1)  # runs first, registered last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.late(torch.relu(self.early(x)))
        return self.fc(torch.relu(self.mid(x.mean((2, 3)))))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip


# --- prunable parameters ----------------------------------------------------------------


def test_classifier_is_excluded_by_identity_not_position():
    names = set(prunable_parameters(HeadFirst()))
    assert names == {"late.weight", "mid.weight", "early.weight"}
    assert "fc.weight" in prunable_parameters(HeadFirst(), include_classifier=True)


def test_first_layer_is_the_first_one_the_forward_calls():
    x = torch.zeros(1, 3, 8, 8)
    names = set(prunable_parameters(HeadFirst(), include_first=False, example_inputs=x))
    assert names == {"late.weight", "mid.weight"}


def test_trace_restores_train_mode_and_bn_statistics():
    model = small_net().train()
    before = model[1].running_mean.clone()
    prunable_parameters(model, include_first=False, example_inputs=torch.randn(2, 3, 8, 8))
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)


def test_include_and_exclude_patterns():
    model = HeadFirst()
    assert set(prunable_parameters(model, include=["*ly", "late"])) == {
        "early.weight",
        "late.weight",
    }
    assert set(prunable_parameters(model, exclude=["m*"])) == {"late.weight", "early.weight"}


def test_an_all_conv_net_without_linear_head_leaves_its_last_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.Flatten(1))
    assert set(prunable_parameters(model, example_inputs=torch.zeros(1, 3, 8, 8))) == {"0.weight"}


def test_only_conv_and_linear_weights_never_biases_or_norms():
    names = prunable_parameters(small_net())
    assert set(names) == {"0.weight", "3.weight", "7.weight"}


def test_bad_example_inputs_raise_pat_error():
    with pytest.raises(PatError, match="example_inputs"):
        prunable_parameters(
            HeadFirst(), include_first=False, example_inputs=torch.zeros(1, 5, 8, 8)
        )


# --- applying and enforcing -------------------------------------------------------------


def masked_net(sparsity: float = 0.5):
    model = small_net()
    masks = generate_masks(
        prunable_parameters(model), children=1, method="random", sparsity=sparsity
    )[0]
    apply_masks(model, masks)
    return model, masks


def test_apply_masks_zeroes_exactly_the_masked_entries():
    model, masks = masked_net()
    for name, p in model.named_parameters():
        if name in masks:
            assert (p[~masks[name]] == 0).all()
            assert p[masks[name]].count_nonzero() == masks[name].sum()  # random init: no zeros


def train_steps(model, opt, steps, enforcer=None):
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    state = FitState(model=model, optimizer=opt, scheduler=None, epochs=1, steps_per_epoch=steps)
    if enforcer is not None:
        enforcer.on_fit_start(state)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if enforcer is not None:
            enforcer.on_step_end(state)


OPTIMIZERS = {
    "sgd-nesterov": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_masked_weights_stay_zero_through_training(opt_name):
    model, masks = masked_net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = OPTIMIZERS[opt_name](model.parameters())
    train_steps(model, opt, 4, MaskEnforcer(masks))
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        assert (p[~keep] == 0).all(), name
        assert not torch.equal(p[keep], start[name][keep])  # the kept weights did train
        for t in opt.state[p].values():
            if t.shape == p.shape:
                assert (t[~keep] == 0).all()  # momentum / moments of pruned weights


def test_without_enforcement_the_masked_weights_revive():
    model, masks = masked_net()
    opt = OPTIMIZERS["sgd-nesterov"](model.parameters())
    train_steps(model, opt, 2)
    with pytest.raises(PatError, match="masked entries"):
        check_masks(model, masks)


def test_enforcer_defaults_to_the_childs_own_masks():
    model, masks = masked_net()
    model.pat_child = Child(masks=masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, 2, MaskEnforcer())
    check_masks(model, masks)


def test_enforce_masks_function_zeroes_optimizer_state():
    model, masks = masked_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, opt, 1)
    enforce_masks(model, masks, opt)
    check_masks(model, masks)
    p = dict(model.named_parameters())["3.weight"]
    assert (opt.state[p]["exp_avg_sq"][~masks["3.weight"]] == 0).all()


def test_check_masks_names_the_parameter():
    model, masks = masked_net()
    with torch.no_grad():
        model[3].weight[~masks["3.weight"]] = 1.0
    with pytest.raises(PatError, match=r"'3\.weight'"):
        check_masks(model, masks)


def test_masks_that_do_not_fit_the_model_are_refused():
    model, masks = masked_net()
    with pytest.raises(PatError, match="does not have"):
        apply_masks(model, {"nope.weight": masks["0.weight"]})
    with pytest.raises(PatError, match="shape"):
        apply_masks(model, {"0.weight": masks["3.weight"]})


def test_bake_makes_zeros_permanent_and_drops_masks():
    model, masks = masked_net()
    model.pat_child = Child(masks=masks)
    assert bake(model) is model and model.pat_child.masks == {}
    check_masks(model, masks)


# --- accounting -------------------------------------------------------------------------


def test_sparsity_report_rows_and_total():
    model, masks = masked_net(0.75)
    rows = sparsity_report(model, masks)
    assert [r["name"] for r in rows] == [*masks, "total"]
    for r in rows[:-1]:
        assert r["kept"] == int(masks[r["name"]].sum()) == r["nonzero"]
        assert r["sparsity"] == pytest.approx(1 - r["kept"] / r["total"])
    total = rows[-1]
    assert total["kept"] == sum(r["kept"] for r in rows[:-1])
    assert total["sparsity"] == pytest.approx(0.75, abs=0.02)


def test_count_params_counts_only_kept_entries_of_a_masked_child():
    model, masks = masked_net()
    x = torch.zeros(1, 3, 8, 8)
    dense_params, dense_macs = count_params_macs(small_net(), x)
    params, macs = count_params_macs(model, x, masks)
    assert dense_params == sum(p.numel() for p in model.parameters())
    assert params == dense_params - sum(int((~m).sum()) for m in masks.values())
    assert macs == dense_macs > 0  # masked zeros are still multiplied
