"""Packed ensembles: one grouped network equals its disjoint physical children."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pat
from pat.errors import PatError
from pat.models import create_model
from pat.pack import PackedEnsemble, pack, unpack
from tests.model_helpers import randomized


def _children(name: str, m: int, in_channels: int = 1) -> tuple[list[nn.Module], torch.Tensor]:
    parent = randomized(create_model(name, num_classes=10, in_channels=in_channels))
    x = torch.randn(6, in_channels, 32, 32)
    kids = pat.split(parent, m, method="partition", level="neuron", physical=True, example_inputs=x[:1])
    return kids, x


@pytest.mark.parametrize(("name", "m"), [("lenet-s", 2), ("resnet8", 2), ("resnet8", 4)])
def test_packed_outputs_equal_children(name: str, m: int) -> None:
    kids, x = _children(name, m)
    packed = pack(kids, example_inputs=x)
    assert isinstance(packed, PackedEnsemble)
    packed.eval()
    for k in kids:
        k.eval()
    with torch.no_grad():
        out = packed(x)
        assert out.shape == (m, len(x), 10)
        torch.testing.assert_close(out, torch.stack([k(x) for k in kids]), atol=1e-5, rtol=1e-5)
    # the packed network holds exactly the children's parameters, no dense blocks between them
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for k in kids for p in k.parameters())


@pytest.mark.parametrize("name", ["lenet-s", "resnet8"])
def test_one_train_step_equals_children_one_by_one(name: str) -> None:
    kids, x = _children(name, 2)
    y = torch.randint(0, 10, (len(x),))
    packed = pack(kids, example_inputs=x)
    packed.train()
    opt = torch.optim.SGD(packed.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    logits = packed(x)  # (M, B, C): the loss is summed over children, each its own mean
    F.cross_entropy(logits.flatten(0, 1), y.repeat(2), reduction="sum").div(len(x)).backward()
    opt.step()
    for k in kids:
        k.train()
        o = torch.optim.SGD(k.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        F.cross_entropy(k(x), y).backward()
        o.step()
    for got, want in zip(unpack(packed), kids, strict=True):
        for (key, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=key)


def test_unpack_returns_independent_children() -> None:
    kids, x = _children("resnet8", 2)
    packed = pack(kids, example_inputs=x)
    first, second = unpack(packed)
    assert [first.pat_child.kept, second.pat_child.kept] == [k.pat_child.kept for k in kids]  # each its own record
    with torch.no_grad():
        next(first.parameters()).zero_()
    assert next(packed.parameters()).abs().sum() > 0
    assert not torch.equal(next(first.parameters()), next(second.parameters()))


def test_pack_refuses_connection_level_and_overlapping_children() -> None:
    parent = create_model("lenet-s", num_classes=10, in_channels=1)
    masked = pat.split(parent, 2, method="partition", level="connection")
    with pytest.raises(PatError, match=r"children\[0\] is not a physical"):
        pack(masked)
    kids, x = _children("lenet-s", 2)
    with pytest.raises(PatError, match=r"children\[1\] shares channels"):
        pack([kids[0], kids[0]], example_inputs=x)


class _Odd(nn.Module):
    def __init__(self, width: int = 5, concat: bool = False) -> None:
        super().__init__()
        self.concat = concat
        self.a = nn.Conv2d(1, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.c = nn.Conv2d(2 * width if concat else width, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.cat([h, torch.relu(self.b(h))], 1) if self.concat else torch.relu(self.b(h))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


def test_pack_refuses_unequal_widths_and_channel_mixing_forward() -> None:
    x = torch.randn(4, 1, 8, 8)
    odd = pat.split(_Odd(5), 2, method="partition", level="neuron", physical=True, example_inputs=x[:1])
    with pytest.raises(PatError, match="equal widths"):
        pack(odd, example_inputs=x)
    cat = pat.split(_Odd(4, concat=True), 2, method="partition", level="neuron", physical=True,
                    example_inputs=x[:1])
    with pytest.raises(PatError, match="before layer 'c'"):
        pack(cat, example_inputs=x)


def test_save_and_load_packed_gives_the_same_children(tmp_path) -> None:
    from pat.engine.checkpoint import load_checkpoint, load_model
    from pat.pack import load_packed, save_packed

    kids, x = _children("resnet8", 4)
    packed = pack(kids, example_inputs=x)
    names = [f"kid-{i}" for i in range(4)]
    save_packed(tmp_path / "packed.pt", packed, names, recipes=[k.pat_child.recipe for k in kids])
    ckpt = load_checkpoint(tmp_path / "packed.pt")  # weights_only: plain data only
    assert ckpt["kind"] == "packed" and ckpt["members"] == 4 and ckpt["names"] == names
    loaded = load_packed(tmp_path / "packed.pt")
    assert loaded.names == names and [r["index"] for r in loaded.recipes] == [0, 1, 2, 3]
    assert loaded.kept == [k.pat_child.kept for k in kids]
    loaded.eval()
    packed.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), packed(x), atol=0, rtol=0)
    for got, want in zip(unpack(loaded), kids, strict=True):  # each child its own channels again
        assert got.pat_child.kept == want.pat_child.kept
        for (key, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=key)
    with pytest.raises(PatError, match="holds 4 packed children, not one model"):
        load_model(tmp_path / "packed.pt")


def test_load_packed_refuses_weights_and_records_that_do_not_fit(tmp_path) -> None:
    from pat.engine.checkpoint import load_checkpoint, save_checkpoint
    from pat.pack import load_packed, save_packed

    kids, x = _children("lenet-s", 2)
    save_packed(tmp_path / "packed.pt", pack(kids, example_inputs=x), ["a", "b"],
                recipes=[k.pat_child.recipe for k in kids])
    ckpt = load_checkpoint(tmp_path / "packed.pt")
    ckpt.pop("format_version"), ckpt.pop("pat_version")
    state = dict(ckpt["state_dict"])
    state["network.fc.weight"] = state["network.fc.weight"][:, :, :-1]  # one input fewer per child
    save_checkpoint(tmp_path / "narrow.pt", {**ckpt, "state_dict": state})
    with pytest.raises(PatError, match=r"narrow.pt'.*weights do not fit 2 packed children of 'lenet-s'") as e:
        load_packed(tmp_path / "narrow.pt")
    assert "\n" not in str(e.value)
    save_checkpoint(tmp_path / "names.pt", {**ckpt, "names": ["a"]})
    with pytest.raises(PatError, match="Got members=2 and 1 names, 2 kept records"):
        load_packed(tmp_path / "names.pt")
    save_checkpoint(tmp_path / "child.pt", {**ckpt, "kind": "child"})
    with pytest.raises(PatError, match="is not a packed checkpoint"):
        load_packed(tmp_path / "child.pt")
