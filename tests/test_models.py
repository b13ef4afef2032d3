"""The model zoo: sizes, shapes, specs that rebuild, classifier lookup, errors."""

from __future__ import annotations

import copy
import json
import math
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._api import WeightsEnum

import pat.models as models
from pat.engine.checkpoint import load_model, save_model
from pat.errors import PatError
from pat.models import create_model, get_classifier, list_models, register_model, spec_of

# Small settings for the generic architectures, so that every name stays cheap on CPU;
# wrn-28-10 gets its own tests below and is built as few times as possible.
SMALL = {"wrn": {"depth": 10, "widen_factor": 2}}
CHEAP = [name for name in list_models() if name != "wrn-28-10"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "name, expected", [("lenet-s", 253_290), ("lenet-m", 1_007_306), ("lenet-l", 4_017_546)]
)
def test_lenet_parameter_counts_match_the_paper(name: str, expected: int) -> None:
    assert n_params(create_model(name)) == expected
    # A grey input only shrinks the first conv: (3 - 1) input channels x c1 filters x 5 x 5.
    c1 = create_model(name).features[0].out_channels
    assert n_params(create_model(name, in_channels=1)) == expected - 2 * c1 * 25


def test_reference_sizes_of_cifar_networks() -> None:
    # Counts of the reference CIFAR implementations (projection shortcuts for resnet18).
    assert n_params(create_model("resnet18")) == pytest.approx(11.17e6, rel=0.01)
    assert n_params(create_model("densenet121")) == pytest.approx(6.96e6, rel=0.01)
    assert n_params(create_model("resnet20")) == pytest.approx(0.27e6, rel=0.03)


def test_wrn_28_10_has_36_5m_parameters_and_runs_on_grey_images() -> None:
    assert n_params(create_model("wrn-28-10")) == pytest.approx(36.5e6, rel=0.01)
    model = create_model("wrn-28-10", in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", CHEAP)
def test_forward_shape(name: str, in_channels: int) -> None:
    model = create_model(name, num_classes=5, in_channels=in_channels, **SMALL.get(name, {}))
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_spec_rebuilds_the_same_architecture(name: str) -> None:
    kwargs = SMALL.get(name, {"dropout": 0.1} if name.startswith("wrn-") else {})
    model = create_model(name, num_classes=4, in_channels=1, **kwargs)
    spec = spec_of(model)
    assert spec == {"name": name, "kwargs": {"num_classes": 4, "in_channels": 1, **kwargs}}
    assert json.loads(json.dumps(spec)) == spec  # checkpoints store it as plain data
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    assert shapes(rebuilt) == shapes(model)


def test_spec_survives_checkpoint_copy_and_wrappers(tmp_path) -> None:
    model = create_model("resnet8", num_classes=3)
    save_model(tmp_path / "m.pt", model)
    loaded, ckpt = load_model(tmp_path / "m.pt")
    assert ckpt["arch"] == spec_of(model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert spec_of(copy.deepcopy(model)) == spec_of(model)  # children are deep copies
    assert spec_of(nn.DataParallel(model)) == spec_of(model)
    assert spec_of(torch.compile(model)) == spec_of(model)
    spec_of(model)["kwargs"]["num_classes"] = 99  # a copy: the model's spec is unchanged
    assert spec_of(model)["kwargs"]["num_classes"] == 3
    assert spec_of(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", CHEAP)
def test_zoo_classifier_is_the_last_layer(name: str) -> None:
    model = create_model(name, num_classes=6, **SMALL.get(name, {}))
    head = get_classifier(model)
    assert isinstance(head, nn.Linear) and head.out_features == 6
    # By identity: zeroing the head's weight and bias must zero the model's output.
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    assert torch.count_nonzero(model.eval()(torch.randn(2, 3, 32, 32))) == 0
    assert get_classifier(nn.DataParallel(model)) is head


@pytest.mark.parametrize(
    "name, path",
    [
        ("resnet18", "fc"),
        ("densenet121", "classifier"),
        ("mobilenet_v3_small", "classifier.3"),
        ("convnext_tiny", "classifier.2"),
        pytest.param("vit_b_16", "heads.head", marks=pytest.mark.slow),
    ],
)
def test_torchvision_classifier_found_by_identity(name: str, path: str) -> None:
    model = torchvision.models.get_model(name, weights=None)  # construct only: no forward
    assert get_classifier(model) is model.get_submodule(path)


def test_foreign_classifier_fallback_uses_output_width() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 3
            self.body = nn.Linear(4, 8)
            self.out = nn.Linear(8, 3)
            self.aux = nn.Linear(8, 5)  # registered last, but not the model's output

    odd = Odd()
    assert get_classifier(odd) is odd.out
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert get_classifier(plain) is plain[2]
    with pytest.raises(PatError, match="Conv2d"):
        get_classifier(nn.Conv2d(3, 3, 1))


def test_tv_models_take_num_classes_and_in_channels() -> None:
    model = create_model("tv:resnet18", num_classes=7, in_channels=1)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    rebuilt = create_model(**{"name": spec_of(model)["name"], **spec_of(model)["kwargs"]})
    assert shapes(rebuilt) == shapes(model)


@pytest.fixture
def fake_imagenet_weights(monkeypatch):
    """Pretend torchvision downloaded resnet18 weights: a fixed random 1000-class state."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: state)
    return state


def test_pretrained_head_is_replaced_at_the_same_path(fake_imagenet_weights) -> None:
    model = create_model("tv:resnet18", num_classes=10, pretrained=True)
    assert model.fc.out_features == 10
    assert torch.equal(model.layer4[1].conv2.weight, fake_imagenet_weights["layer4.1.conv2.weight"])
    spec = spec_of(model)
    assert "pretrained" not in json.dumps(spec)
    assert shapes(create_model(spec["name"], **spec["kwargs"])) == shapes(model)
    # 1000 classes: the pretrained head is kept.
    same = create_model("tv:resnet18", num_classes=1000, pretrained=True)
    assert torch.equal(same.fc.weight, fake_imagenet_weights["fc.weight"])


@pytest.mark.parametrize("in_channels", [1, 6])
def test_pretrained_first_conv_is_adapted(fake_imagenet_weights, in_channels: int) -> None:
    rgb = fake_imagenet_weights["conv1.weight"]
    model = create_model("tv:resnet18", in_channels=in_channels, pretrained=True)
    w = model.conv1.weight
    assert w.shape == (64, in_channels, 7, 7)
    # A constant-across-channels image x gives the response the RGB kernel gives to (x, x, x).
    torch.testing.assert_close(w.sum(dim=1), rgb.sum(dim=1))
    if in_channels > 3:  # RGB tiled, scaled by 3 / in_channels
        torch.testing.assert_close(w[:, 3], rgb[:, 0] * 3 / in_channels)


def test_pretrained_download_failure_is_a_one_line_pat_error(monkeypatch) -> None:
    def offline(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PatError, match=r"tv:resnet18.*could not be downloaded") as err:
        create_model("tv:resnet18", pretrained=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: create_model("foo"), r"unknown model 'foo'; choose one of: .*lenet-s.*tv:"),
        (lambda: create_model("tv:nope"), r"unknown model 'tv:nope'"),
        (
            lambda: create_model("resnet20", depth=3),
            r"'resnet20' does not take argument\(s\) depth",
        ),
        (lambda: create_model("wrn", depth=27), r"depth must be 6n\+4.*Got 27"),
        (lambda: create_model("wrn-16-4", dropout=1.0), r"dropout must be in \[0, 1\). Got 1.0"),
        (lambda: create_model("lenet-s", num_classes=0), r"num_classes .* Got 0"),
        (lambda: create_model("lenet-s", in_channels=True), r"in_channels .* Got True"),
        (lambda: create_model("lenet-s", pretrained=True), r"'lenet-s' has no pretrained weights"),
        (lambda: create_model("tv:resnet18", weights="DEFAULT"), r"pretrained=True, not weights="),
        (lambda: create_model("tv:resnet18", foo=1), r"'tv:resnet18' rejected its arguments"),
        (
            lambda: create_model("tv:resnet18", norm_layer=nn.BatchNorm2d),
            r"norm_layer must be a plain",
        ),
    ],
)
def test_bad_input_raises_pat_error(call, message: str) -> None:
    with pytest.raises(PatError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_register_model_adds_a_name() -> None:
    @register_model("test-mlp")
    def test_mlp(*, num_classes: int = 10, in_channels: int = 3, hidden: int = 8) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 32 * 32, hidden), nn.Linear(hidden, num_classes)
        )

    try:
        assert "test-mlp" in list_models()
        model = create_model("test-mlp", num_classes=4, hidden=5)
        assert spec_of(model)["kwargs"] == {"num_classes": 4, "in_channels": 3, "hidden": 5}
        assert get_classifier(model) is model[2]
        with pytest.raises(PatError, match="already registered"):
            register_model("test-mlp")(lambda **kw: nn.Linear(1, 1))
        with pytest.raises(PatError, match="tv:"):
            register_model("tv:mine")
    finally:
        models.MODELS.remove("test-mlp")


def test_kaiming_init_and_unit_batchnorm() -> None:
    model = create_model("resnet18")
    conv = model.layers[1][0].conv2  # 128 -> 128, 3x3: 147k weights, a tight estimate
    expected_std = math.sqrt(2 / (conv.out_channels * 9))  # fan-out mode, ReLU gain
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.03)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
