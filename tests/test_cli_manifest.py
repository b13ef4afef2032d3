"""The ensemble directory is the source of truth for its data; datasets carry training recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import one_error_line, run

import pat.data
from pat.engine.checkpoint import load_checkpoint
from pat.errors import PatError

READERS = [["eval"], ["calibrate"], ["select", "--method", "top-k", "--size", "1"],
           ["soup", "--out", "{tmp}/soup.pt"], ["tune", "--epochs", "1"]]



class Stop(PatError):
    pass


@pytest.fixture
def loads(monkeypatch):
    """Record every load_dataset call, then let it through (or stop the command: ``stop=True``)."""
    calls, real = [], pat.data.load_dataset

    def spy(name, **kwargs):
        calls.append({"dataset": name, **kwargs})
        if spy.stop:
            raise Stop("stopped by the test")
        return real(name, **kwargs)

    spy.stop = False
    monkeypatch.setattr(pat.data, "load_dataset", spy)
    return spy, calls


@pytest.fixture(scope="module")
def children(tmp_path_factory, digits_parent) -> str:
    out = tmp_path_factory.mktemp("manifest") / "children"
    assert run("split", "--parent", digits_parent, "--children", 2, "--out", out).exit_code == 0
    return str(out)


def _copy(children, tmp_path, **changes):
    """A copy of the children whose manifest has ``changes`` (value None: key removed)."""
    copy = tmp_path / "copy"
    shutil.copytree(children, copy)
    manifest = json.loads((copy / "ensemble.json").read_text())
    for key, value in changes.items():
        manifest.pop(key) if value is None else manifest.__setitem__(key, value)
    (copy / "ensemble.json").write_text(json.dumps(manifest))
    return copy


def _args(command, tmp_path):
    return [a.replace("{tmp}", str(tmp_path)) for a in command]


def test_split_records_the_parents_data_and_image_shape(children, digits_parent):
    manifest = json.loads((Path(children) / "ensemble.json").read_text())
    assert manifest["data"] == {"dataset": "digits", "data_dir": "./data", "val_fraction": 0.1, "seed": 0}
    assert manifest["image_shape"] == [1, 32, 32] == load_checkpoint(digits_parent)["image_shape"]


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
def test_recorded_data_is_used_when_none_is_given(children, tmp_path, loads, command):
    spy, calls = loads
    spy.stop = True
    data = {"dataset": "digits", "data_dir": str(tmp_path / "elsewhere"), "val_fraction": 0.25, "seed": 7}
    copy = _copy(children, tmp_path, data=data)
    assert "stopped by the test" in one_error_line(run(command[0], copy, *_args(command[1:], tmp_path)))
    assert calls[0] == {"dataset": "digits", "data_dir": data["data_dir"], "val_fraction": 0.25, "seed": 7}


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
@pytest.mark.parametrize(("option", "value", "recorded"), [
    ("--dataset", "mnist", "'digits'"), ("--val-fraction", "0.3", "0.1"), ("--data-seed", "5", "0")])
def test_a_conflicting_option_is_refused_by_name(children, tmp_path, loads, command, option, value, recorded):
    _, calls = loads
    line = one_error_line(run(command[0], children, *_args(command[1:], tmp_path), option, value))
    assert option in line and value in line and recorded in line and "--override-data" in line
    assert not calls  # refused before any data is loaded


def test_override_data_uses_the_given_values_but_never_a_wrong_shape(children, tmp_path, loads):
    spy, calls = loads
    spy.stop = True
    one_error_line(run("eval", children, "--data-seed", 5, "--val-fraction", 0.2, "--override-data"))
    assert calls[-1]["seed"] == 5 and calls[-1]["val_fraction"] == 0.2
    spy.stop = False
    # synthetic images have 3 channels; the members take 1: no flag makes that work
    line = one_error_line(run("eval", children, "--dataset", "synthetic", "--override-data"))
    assert "--dataset 'synthetic'" in line and "3-channel" in line and "1-channel" in line
    copy = _copy(children, tmp_path, num_classes=3)
    line = one_error_line(run("tune", copy, "--epochs", 1))
    assert "10 classes" in line and "predict 3" in line
    assert all(m["status"] == "split" for m in json.loads((copy / "ensemble.json").read_text())["members"])


def test_old_manifest_without_the_new_keys_still_works(children, tmp_path, loads):
    spy, calls = loads
    copy = _copy(children, tmp_path, data=None, image_shape=None)
    result = run("eval", copy)
    assert result.exit_code == 0, result.output
    assert calls[-1] == {"dataset": "digits", "data_dir": "./data", "val_fraction": 0.1, "seed": 0}
    # nothing recorded to conflict with: a given value is taken
    spy.stop = True
    one_error_line(run("eval", copy, "--val-fraction", 0.2))
    assert calls[-1]["val_fraction"] == 0.2
    spy.stop = False
    # the channel count of such a manifest comes from the architecture spec
    line = one_error_line(run("eval", copy, "--dataset", "synthetic", "--override-data"))
    assert "3-channel" in line and "1-channel" in line


def test_tune_takes_recorded_data_and_the_recipe_batch_size(children, tmp_path):
    copy = _copy(children, tmp_path, data={"dataset": "digits", "data_dir": "./data", "val_fraction": 0.2,
                                           "seed": 3})
    result = run("tune", copy, "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert "on digits (data seed 3, val fraction 0.2): batch 32 (digits recipe)" in result.output
    tuned = json.loads((copy / "ensemble.json").read_text())["members"]
    assert all(m["status"] == "tuned" for m in tuned)
    assert {m["tune"]["data"]["seed"] for m in tuned} == {3}
    assert {m["tune"]["data"]["batch_size"] for m in tuned} == {32}


def _pool_dir(tmp_path, data):
    """An ensemble directory a ``pat pool`` run started (no member finished yet)."""
    out = tmp_path / "pool"
    out.mkdir()
    manifest = {"format_version": 1, "arch": None, "num_classes": 10, "members": [], "selection": None,
                "config": {"producer": "pool", "pool": {"data": data}}}  # as written before the data record
    (out / "ensemble.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture
def pool_configs(monkeypatch):
    import pat.producers.lr_pool as lr_pool

    seen = []

    def train_pool(config, out, **kwargs):
        seen.append(config)
        raise Stop("stopped by the test")

    monkeypatch.setattr(lr_pool, "train_pool", train_pool)
    return seen


def test_producer_rerun_takes_the_recorded_data_and_refuses_a_conflict(tmp_path, pool_configs):
    out = _pool_dir(tmp_path, {"dataset": "synthetic", "data_dir": "./data", "val_fraction": 0.2,
                               "batch_size": 16, "seed": 4})
    one_error_line(run("pool", "--out", out))
    d = pool_configs[-1].data
    assert (d.dataset, d.val_fraction, d.seed, d.batch_size) == ("synthetic", 0.2, 4, 16)
    line = one_error_line(run("pool", "--out", out, "--dataset", "digits"))
    assert "--dataset 'digits' conflicts with 'synthetic'" in line and "--force" in line
    assert len(pool_configs) == 1  # refused before the producer started
    one_error_line(run("pool", "--out", out, "--dataset", "digits", "--force"))
    d = pool_configs[-1].data
    assert (d.dataset, d.val_fraction, d.seed, d.batch_size) == ("digits", 0.1, 0, 128)


def test_train_uses_the_datasets_recipe_shows_it_and_saves_it(tmp_path):
    recipe = pat.data.dataset_recipe("digits")
    assert (recipe.batch_size, recipe.lr, recipe.epochs) == (32, 0.03, 10)
    out = tmp_path / "p.pt"
    result = run("train", "--epochs", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert "batch 32 (digits recipe), lr 0.03 (digits recipe), epochs 1 (given)" in result.output
    config = load_checkpoint(out)["config"]
    assert (config["data"]["batch_size"], config["lr"], config["epochs"]) == (32, 0.03, 1)


@pytest.mark.parametrize(("args", "header", "saved"), [
    (["--batch-size", 64, "--lr", 0.01, "--epochs", 2], "batch 64 (given), lr 0.01 (given), epochs 2 (given)",
     (64, 0.01, 2)),
    (["--optimizer", "adam"], "lr 0.001 (adam default), epochs 10 (digits recipe)", (32, 0.001, 10)),
    (["--dataset", "synthetic"], "batch 128 (default), lr 0.1 (default), epochs 10 (default)", (128, 0.1, 10)),
])  # fmt: skip
def test_explicit_options_win_over_the_recipe(tmp_path, monkeypatch, args, header, saved):
    import pat.parent

    seen = []

    def train_parent(config, **kwargs):
        seen.append(config)
        raise Stop("stopped by the test")

    monkeypatch.setattr(pat.parent, "train_parent", train_parent)
    result = run("train", *args, "--out", tmp_path / "p.pt")
    one_error_line(result)
    assert header in result.output
    config = seen[0]
    assert (config.data.batch_size, config.lr, config.epochs) == saved
