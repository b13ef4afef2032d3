from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pat.engine.checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from pat.errors import PatError
from pat.models import create_model


class Payload:
    """A pickled object that would run a command when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_round_trip_rebuilds_architecture(tmp_path):
    model = create_model("lenet-s", num_classes=10, in_channels=1)
    save_model(tmp_path / "m.pt", model, metrics={"test_acc": 0.5}, config={"epochs": 3})
    loaded, ckpt = load_model(tmp_path / "m.pt")
    assert type(loaded) is type(model)
    for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b)
    assert ckpt["metrics"] == {"test_acc": 0.5} and ckpt["format_version"] == 1
    x = torch.randn(2, 1, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(x), loaded(x))


def test_pickled_objects_are_refused_and_not_executed(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "state_dict": {}, "x": Payload(marker)}, evil)
    with pytest.raises(PatError, match="cannot be loaded safely"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_non_checkpoints_are_named(tmp_path):
    with pytest.raises(PatError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(PatError, match=f"checkpoint '{tmp_path}' is a directory, not a checkpoint file."):
        load_checkpoint(tmp_path)
    fifo = tmp_path / "fifo.pt"  # there, but neither a file nor a folder (reading it would block)
    os.mkfifo(fifo)
    with pytest.raises(PatError, match=f"checkpoint '{fifo}' is not a regular file."):
        load_checkpoint(fifo)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(PatError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(PatError, match="no format_version"):
        load_checkpoint(plain)


def test_save_refuses_objects_and_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match="only tensors and plain containers"):
        save_checkpoint(tmp_path / "x.pt", {"model": torch.nn.Linear(2, 2)})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"v": torch.ones(1)})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(PatError, match="cannot write .*m.pt.*disk full"):  # one line, not a traceback
        save_checkpoint(path, {"v": torch.zeros(1)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_an_interrupt_just_after_the_temporary_file_is_created_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C can land between the temporary file's creation and the code that would remove it
    (seen once in the suite: a pool interrupted while writing its manifest left a .tmp behind)."""
    import os

    from pat.io import atomic_write

    real_open = os.open

    def open_then_interrupt(*args, **kwargs):
        real_open(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "m.json", lambda f: f.write(b"{}"))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
