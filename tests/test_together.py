"""Tuning all children in one grouped network (``together``) is an execution choice: it must
give what tuning them one by one gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pat
from pat.config import DataConfig, SplitConfig, TuneConfig
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint
from pat.errors import PatError
from pat.pipeline import split_to_directory
from pat.store import EnsembleDir
from pat.tuner import tune, tune_directory
from tests.cli_helpers import one_error_line, run

# one-cycle with momentum and weight decay, each child on its own bagged half
CONFIG = TuneConfig(epochs=2, max_lr=0.02, bagging=0.5, device="cpu", data=DataConfig(batch_size=64))


def _together(config: TuneConfig, value: bool | str = True) -> TuneConfig:
    return TuneConfig(**{**config.__dict__, "together": value})


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _both(children, data, config):
    one_by_one, together = copy.deepcopy(children), copy.deepcopy(children)
    tune(one_by_one, data, config)
    tune(together, data, _together(config))
    return one_by_one, together


def test_together_equals_one_by_one_for_masked_children(digits):
    torch.manual_seed(0)
    children = pat.split(pat.create_model("lenet-s", in_channels=1), 3, method="anti-random", sparsity=0.5)
    one_by_one, together = _both(children, digits, CONFIG)
    for a, b in zip(one_by_one, together, strict=True):
        assert _max_diff(a, b) < 1e-5
        assert _max_diff(a, children[0]) > 1e-2  # it did train
        assert a.pat_child.metrics == pytest.approx(b.pat_child.metrics, abs=1e-6)
        assert b.pat_child.cost["steps"] == a.pat_child.cost["steps"] and b.pat_child.cost["flops"] == a.pat_child.cost["flops"]
        assert b.pat_child.cost["together"] == 3
        masks = b.pat_child.masks
        assert all(not b.state_dict()[k][~m].any() for k, m in masks.items())  # pruned weights still zero
    # the children saw different bagged batches: their tuned weights are not the same update
    assert _max_diff(together[0], together[1]) > 1e-2


def test_together_equals_one_by_one_for_physical_children_with_batchnorm(digits):
    """BN networks amplify float rounding step by step (a 1e-7 nudge grows ~3x a step), so a
    short run is compared: three steps per child (bagging 0.1 of ~1.4k samples, batch 64)."""
    torch.manual_seed(0)
    children = pat.split(pat.create_model("resnet8", in_channels=1), 2, level="neuron", method="partition",
                         physical=True)
    config = TuneConfig(**{**CONFIG.__dict__, "epochs": 1, "bagging": 0.1})
    one_by_one, together = _both(children, digits, config)
    for a, b in zip(one_by_one, together, strict=True):
        params = dict(b.named_parameters())
        assert max(float((p - params[k]).detach().abs().max()) for k, p in a.named_parameters()) < 1e-3
        assert _max_diff(a, children[0]) > 1e-2
        # the statistics are recomputed for the tuned weights, so they carry those weights'
        # rounding differences amplified through the layers (about 1 % here)
        sa, sb = a.state_dict(), b.state_dict()
        bn = [k for k in sa if k.endswith(("running_mean", "running_var"))]
        assert bn and all(float((sa[k] - sb[k]).norm() / sa[k].norm()) < 2e-2 for k in bn)
        x = next(iter(digits.loader("test", batch_size=256)))[0]
        with torch.no_grad():
            assert float((a.eval()(x).softmax(-1) - b.eval()(x).softmax(-1)).abs().max()) < 1e-2


class _Concat(nn.Module):
    """A forward that concatenates channels: its children cannot be grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.cat([h, torch.relu(self.b(h))], 1)
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


def test_together_refuses_what_it_cannot_do_and_auto_falls_back(digits):
    x = torch.zeros(1, 1, 8, 8)
    children = pat.split(_Concat(), 2, method="random", sparsity=0.5, example_inputs=x)
    with pytest.raises(PatError, match="together: the model mixes the children's channels before layer 'c'"):
        tune(copy.deepcopy(children), digits, _together(CONFIG))
    fallback, one_by_one = copy.deepcopy(children), copy.deepcopy(children)
    tune(fallback, digits, _together(CONFIG, "auto"))
    tune(one_by_one, digits, CONFIG)
    assert all(_max_diff(a, b) == 0 and "together" not in b.pat_child.cost
               for a, b in zip(one_by_one, fallback, strict=True))
    with pytest.raises(PatError, match="plain 'sgd' step only; step 'sam'"):
        tune(copy.deepcopy(children), digits, TuneConfig(**{**_together(CONFIG).__dict__, "step": "sam"}))
    mixed = [pat.create_model("lenet-s", in_channels=1), pat.create_model("lenet-m", in_channels=1)]
    with pytest.raises(PatError, match="one architecture"):
        tune(mixed, digits, _together(CONFIG))
    with pytest.raises(PatError, match="together must be"):
        TuneConfig(together="yes")


def test_auto_tunes_either_way_with_the_same_result(digits):
    torch.manual_seed(0)
    children = pat.split(pat.create_model("lenet-s", in_channels=1), 2, method="anti-random", sparsity=0.5)
    auto, one_by_one = copy.deepcopy(children), copy.deepcopy(children)
    tune(auto, digits, _together(CONFIG, "auto"))
    tune(one_by_one, digits, CONFIG)
    assert all(_max_diff(a, b) < 1e-5 for a, b in zip(one_by_one, auto, strict=True))


@pytest.fixture
def two_dirs(tmp_path, digits_parent):
    config = SplitConfig(children=3, method="anti-random", sparsity=0.5)
    return [str(split_to_directory(digits_parent, tmp_path / name, config).path) for name in ("a", "b")]


def test_directory_together_equals_one_by_one_and_resumes_at_epoch_boundaries(two_dirs, digits, tmp_path):
    sequential, together = two_dirs
    tune_directory(sequential, digits, CONFIG)

    class StopAfterFirstEpoch(Callback):
        def on_epoch_end(self, state):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_directory(together, digits, _together(CONFIG), callbacks=lambda name: [StopAfterFirstEpoch()])
    ens = EnsembleDir.load(together)
    assert [m["status"] for m in ens.members] == ["split"] * 3  # nothing finished, nothing claimed
    partial = ens.path / ".work" / "together-child-0+child-1+child-2.partial.pt"  # the runner's job name
    assert load_checkpoint(partial)["epoch"] == 1
    done = []
    tune_directory(together, digits, _together(CONFIG), on_done=lambda r: done.append(r["name"]))
    assert done == ["child-0", "child-1", "child-2"] and not partial.exists()
    a, b = EnsembleDir.load(sequential), EnsembleDir.load(together)
    for ra, rb in zip(a.members, b.members, strict=True):
        assert rb["status"] == "tuned" and rb["metrics"] == pytest.approx(ra["metrics"], abs=1e-5)
        wa = load_checkpoint(a.member_path(ra))["state_dict"]
        wb = load_checkpoint(b.member_path(rb))["state_dict"]
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4  # float rounding


def test_cli_tune_together_and_its_refusals(two_dirs):
    path = two_dirs[0]
    before = {p.name: p.read_bytes() for p in sorted(EnsembleDir.load(path).path.iterdir()) if p.is_file()}
    assert "conflicts with --auto-together" in one_error_line(
        run("tune", path, "--together", "--auto-together", "--epochs", 1, "--device", "cpu"))
    assert "step 'sam'" in one_error_line(
        run("tune", path, "--together", "--step", "sam", "--epochs", 1, "--device", "cpu"))
    after = {p.name: p.read_bytes() for p in sorted(EnsembleDir.load(path).path.iterdir()) if p.is_file()}
    assert after == before and not (EnsembleDir.load(path).path / ".work").exists()  # nothing written
    result = run("tune", path, "--together", "--epochs", 1, "--max-lr", 0.02, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [m["status"] for m in EnsembleDir.load(path).members] == ["tuned"] * 3
