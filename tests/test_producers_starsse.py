from __future__ import annotations

import pytest
import torch
from cli_helpers import one_error_line, run
from click.testing import CliRunner

from pat.cli import PatGroup
from pat.cli.producers import starsse
from pat.config import DataConfig
from pat.data import load_dataset
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint
from pat.errors import PatError
from pat.producers.starsse import StarSSEConfig, load_pretrained, train_starsse
from pat.store import EnsembleDir


class StartCapture(Callback):
    def __init__(self, store: dict, name: str) -> None:
        self.store, self.name = store, name

    def on_fit_start(self, state) -> None:
        self.store[self.name] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def config(pretrained: str, **kw) -> StarSSEConfig:
    base = dict(pretrained=pretrained, data=DataConfig(dataset="synthetic", batch_size=32), members=3,
                epochs=1, cycle_epochs=1, lr=0.02, device="cpu")
    return StarSSEConfig(**{**base, **kw})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sse", [False, True])
def test_members_start_from_member_one_or_previous(tmp_path, tiny_data, pretrained, sse):
    starts: dict = {}
    out = tmp_path / "star"
    train_starsse(config(pretrained, sse=sse), out, data=tiny_data,
                  callbacks=lambda name: [StartCapture(starts, name)])
    ens = EnsembleDir.load(out)
    assert [m["name"] for m in ens.members] == ["member-1", "member-2", "member-3"]
    final = {m["name"]: load_checkpoint(ens.member_path(m))["state_dict"] for m in ens.members}
    # member 1 starts from the pretrained body with a new 10-way head
    pre = load_checkpoint(pretrained)["state_dict"]
    body = {k: v for k, v in pre.items() if not k.startswith("fc.")}
    assert all(torch.equal(starts["member-1"][k], v) for k, v in body.items())
    assert starts["member-1"]["fc.weight"].shape == (10, 128)
    assert same(starts["member-2"], final["member-1"])
    expected = final["member-2"] if sse else final["member-1"]
    assert same(starts["member-3"], expected)
    assert not same(final["member-2"], final["member-3"])
    recipes = {m["name"]: m["recipe"] for m in ens.members}
    assert recipes["member-3"]["start"] == ("member-2" if sse else "member-1")
    assert recipes["member-2"]["peak_lr"] == pytest.approx(0.04)
    # the cycle starts at lr * mult: first epoch's LR is below the peak but cosine from 0.04
    hist = load_checkpoint(ens.member_path("member-2"))["history"]
    assert 0 <= hist[-1]["lr"] < 0.04


def test_rerun_keeps_finished_members(tmp_path, tiny_data, pretrained):
    out = tmp_path / "star"
    cfg = config(pretrained, members=2)
    train_starsse(cfg, out, data=tiny_data)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    seen = []
    train_starsse(cfg, out, data=tiny_data, on_member=lambda r, skipped: seen.append(skipped))
    assert seen == [True, True]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}


def test_pretrained_that_does_not_match_model_is_refused(tiny_data, pretrained, tmp_path):
    with pytest.raises(PatError, match="'lenet-s' model, not --model 'resnet20'"):
        load_pretrained(config(pretrained, model="resnet20"), tiny_data)
    rgb = load_dataset("synthetic", train_size=32, test_size=16, in_channels=3)
    with pytest.raises(PatError, match="1-channel"):
        load_pretrained(config(pretrained), rgb)
    with pytest.raises(PatError, match="does not exist"):
        load_pretrained(config(str(tmp_path / "missing.pt")), tiny_data)
    assert not (tmp_path / "star").exists()


@pytest.mark.parametrize(("kw", "word"), [(dict(members=0), "members"), (dict(cycle_epochs=0), "cycle_epochs"),
                                          (dict(cycle_lr_mult=-2.0), "cycle_lr_mult")])
def test_bad_config(kw, word, pretrained):
    with pytest.raises(PatError, match=word):
        config(pretrained, **kw)
    with pytest.raises(PatError, match="pretrained"):
        StarSSEConfig(pretrained="")


@pytest.mark.slow
def test_cli_starsse(tmp_path, pretrained):
    group = PatGroup()
    group.add_command(starsse)
    out = tmp_path / "star"
    result = CliRunner().invoke(group, ["starsse", "--pretrained", pretrained, "--dataset", "digits",
                                        "--members", "2", "--epochs", "1", "--cycle-epochs", "1",
                                        "--device", "cpu", "--out", str(out), "--sse"])
    assert result.exit_code == 0, result.output
    assert len(EnsembleDir.load(out)) == 2 and "member-2" in result.output
    # its members are finished, not children: pat tune says so, naming the producer
    before = {f.name: f.read_bytes() for f in out.glob("*.pt")}
    line = one_error_line(run("tune", out, "--epochs", "1"))
    assert "`pat starsse`" in line and "'member-1' and 1 more" in line and "not children of `pat split`" in line
    assert {f.name: f.read_bytes() for f in out.glob("*.pt")} == before
    bad = CliRunner().invoke(group, ["starsse", "--pretrained", pretrained, "--model", "wrn",
                                     "--dataset", "synthetic", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "not --model 'wrn'" in bad.output
