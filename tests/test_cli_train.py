from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line
from click.testing import CliRunner

from pat.cli import cli
from pat.engine.checkpoint import load_checkpoint


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    return result


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("parent") / "parent.pt")
    result = run("train", "--model", "lenet-s", "--dataset", "digits", "--epochs", "1", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_checkpoint_with_metrics_and_config(parent):
    ckpt = load_checkpoint(parent)
    assert ckpt["arch"]["name"] == "lenet-s" and ckpt["arch"]["kwargs"]["in_channels"] == 1
    assert 0 <= ckpt["metrics"]["test_acc"] <= 1
    assert ckpt["config"]["epochs"] == 1 and len(ckpt["history"]) == 1


def test_info_shows_architecture_and_metrics(parent):
    result = run("info", parent)
    assert result.exit_code == 0, result.output
    assert "lenet-s" in result.output and "test_acc" in result.output


def test_existing_output_is_refused_without_force(parent):
    before = load_checkpoint(parent)["state_dict"]
    result = run("train", "--dataset", "digits", "--epochs", "1", "--out", parent)
    assert result.exit_code == 2
    assert "already exists" in result.output and "--force" in result.output
    after = load_checkpoint(parent)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("where", ["file", "procfs"])
def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path, where):
    """Not after the epochs, when the checkpoint cannot be saved (it was: 'cannot write x.partial')."""
    if where == "file":
        (tmp_path / "parent.pt").write_bytes(b"not a folder")
        out, folder = tmp_path / "parent.pt" / "sub" / "p.pt", "is a file, not a folder"
    else:  # a folder that takes no new file, even for root (chmod would not stop root)
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux's /proc")
        out, folder = Path("/proc/pat-test/p.pt"), "'/proc' takes no new file"
    line = one_error_line(run("train", "--dataset", "digits", "--epochs", "1", "--out", str(out)))
    assert line.startswith(f"Error: --out {str(out)!r} cannot be written") and folder in line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["parent.pt"] if where == "file" else [])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "lenet-xxl"], ["lenet-xxl", "lenet-s"]),
        (["--dataset", "imagenet-9"], ["imagenet-9", "digits"]),
        (["--epochs", "0"], ["epochs", "0"]),
        (["--batch-size", "-5"], ["batch_size", "-5"]),
        (["--dataset", "cifar10", "--data-dir", "{tmp}/empty"], ["cifar10", "--data-dir"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, monkeypatch, args, words):
    # no network here: make any download attempt fail fast instead of hanging
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "p.pt"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run("train", "--epochs", "1", *args, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    for word in words:
        assert word in error_lines[0]
    assert not out.exists() and not (tmp_path / "p.pt.partial").exists()


def test_corrupt_and_pickled_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    result = run("info", str(bad))
    assert result.exit_code == 2 and "not a readable checkpoint" in result.output
    missing = run("info", str(tmp_path / "nope.pt"))
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_help_lists_every_command_with_one_line():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("train", "info"):
        assert command in result.output


def test_pretrained_is_listed_in_train_help():
    result = run("train", "--help")
    assert result.exit_code == 0 and "--pretrained" in result.output and "ImageNet" in result.output


def test_pretrained_with_a_zoo_model_is_one_line_naming_both(tmp_path):
    out = tmp_path / "p.pt"
    result = run("train", "--model", "lenet-s", "--pretrained", "--dataset", "digits", "--out", str(out))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "--pretrained" in err[0] and "'lenet-s'" in err[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_pretrained_weights_that_cannot_be_fetched_are_one_line_and_write_nothing(tmp_path, monkeypatch):
    from urllib.error import URLError

    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):  # what torchvision raises without a network
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    out = tmp_path / "p.pt"
    result = run("train", "--model", "tv:resnet18", "--pretrained", "--dataset", "digits", "--epochs", "1",
                 "--out", str(out))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "tv:resnet18" in err[0] and "could not be downloaded" in err[0], result.stderr
    assert not list(tmp_path.iterdir())  # no checkpoint, no .partial


def test_pretrained_reaches_create_model_and_the_saved_config(tmp_path, monkeypatch):
    import pat.parent
    from pat.models import create_model

    seen = []

    def recording(name, *, pretrained=False, **kwargs):  # a LeNet-S stands in for a torchvision download
        seen.append((name, pretrained))
        return create_model("lenet-s", **kwargs)

    monkeypatch.setattr(pat.parent, "create_model", recording)
    out = tmp_path / "p.pt"
    result = run("train", "--model", "tv:resnet18", "--pretrained", "--dataset", "digits", "--epochs", "1",
                 "--out", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    assert seen == [("tv:resnet18", True)]
    assert "from ImageNet weights" in result.stdout.splitlines()[0]
    assert load_checkpoint(out)["config"]["pretrained"] is True
