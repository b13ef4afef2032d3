"""A packed ensemble directory: one packed file that several member records share."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import one_error_line, run

import pat.pack
from pat.config import DataConfig, SplitConfig, TuneConfig
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint
from pat.ensemble.ensemble import Ensemble
from pat.ensemble.report import directory_logits
from pat.errors import PatError
from pat.pipeline import split_to_directory
from pat.store import EnsembleDir
from pat.tuner import tune_directory

SPLIT = dict(children=2, method="partition", sparsity=None, level="neuron", physical=True, seed=3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, digits_parent):
    """The same two children written packed and unpacked."""
    root = tmp_path_factory.mktemp("packed")
    packed = split_to_directory(digits_parent, root / "packed", SplitConfig(**SPLIT, pack=True)).path
    plain = split_to_directory(digits_parent, root / "plain", SplitConfig(**SPLIT)).path
    return packed, plain


def _copy(src, tmp_path, edit=None):
    """A copy of ``src`` whose manifest ``edit(manifest)`` changed."""
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "ensemble.json").read_text())
    if edit is not None:
        edit(manifest)
    (dst / "ensemble.json").write_text(json.dumps(manifest))
    return dst


def test_packed_directory_holds_one_file_that_every_record_points_at(dirs):
    packed, plain = dirs
    ens, ref = EnsembleDir.load(packed), EnsembleDir.load(plain)
    assert (packed / "packed.pt").is_file() and not list(packed.glob("child-*"))
    assert [m["packed"] for m in ens.members] == [{"index": 0, "of": 2}, {"index": 1, "of": 2}]
    assert {m["file"] for m in ens.members} == {"packed.pt"}
    assert len({m["sha256"] for m in ens.members}) == 1
    # the records say what the unpacked ones say, file and stamps aside
    drop = ("file", "packed", "size", "sha256")
    assert [{k: v for k, v in m.items() if k not in drop} for m in ens.members] == \
        [{k: v for k, v in m.items() if k not in drop} for m in ref.members]


def test_packed_directory_predicts_what_the_unpacked_one_does(dirs, digits, monkeypatch):
    packed, plain = dirs
    calls = []
    real = pat.pack.load_packed
    monkeypatch.setattr(pat.pack, "load_packed", lambda *a, **k: calls.append(a) or real(*a, **k))
    got, labels = directory_logits(EnsembleDir.load(packed), digits, "test", device="cpu")
    assert len(calls) == 1  # one packed file, read once for both members
    want, same = directory_logits(EnsembleDir.load(plain), digits, "test", device="cpu")
    assert got.shape == (2, len(digits.test.y), 10) and torch.equal(labels, same)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1), atol=1e-5, rtol=0)
    children = Ensemble.load(packed).members
    assert children[0].pat_child.kept != children[1].pat_child.kept and children[1].pat_child.recipe["index"] == 1


@pytest.mark.parametrize("command", [["eval"], ["calibrate"], ["select", "--method", "top-k", "--size", 1]])
def test_eval_calibrate_select_agree_on_packed_and_unpacked(dirs, tmp_path, command):
    packed, plain = (_copy(d, tmp_path / n) for d, n in zip(dirs, ("p", "u"), strict=True))
    for d in (packed, plain):
        result = run(command[0], d, *command[1:], "--device", "cpu")
        assert result.exit_code == 0, result.output
    p, u = (EnsembleDir.load(d).manifest for d in (packed, plain))
    if command[0] == "eval":
        p, u = (json.loads((d / "metrics.json").read_text())["all"] for d in (packed, plain))
        assert p["ensemble"]["nll"] == pytest.approx(u["ensemble"]["nll"], abs=1e-5)
        assert [m["accuracy"] for m in p["members"]] == [m["accuracy"] for m in u["members"]]
    elif command[0] == "calibrate":
        assert p["calibration"]["members"] == pytest.approx(u["calibration"]["members"], abs=1e-4)
    else:
        assert p["selection"]["selected"] == u["selection"]["selected"]


def test_selected_only_loads_the_team_from_the_packed_file(dirs, tmp_path):
    packed = _copy(dirs[0], tmp_path, lambda m: m.__setitem__(
        "selection", {"method": "top-k", "selected": ["child-1"], "weights": [1.0]}))
    team = Ensemble.load(packed, selected_only=True)
    assert team.names == ["child-1"] and team.members[0].pat_child.recipe["index"] == 1


def _drop_last(m):
    m["members"].pop()


def _say_one(m):
    m["members"].pop()
    m["members"][0]["packed"]["of"] = 1


def _swap_names(m):
    a, b = m["members"]
    a["name"], b["name"] = b["name"], a["name"]


def _bad_index(m):
    m["members"][1]["packed"] = {"index": 2, "of": 2}


def _plain_share(m):
    for member in m["members"]:
        member.pop("packed")


@pytest.mark.parametrize(("edit", "words"), [
    (_drop_last, ["'packed.pt'", "listed by 1 members", "of [2]"]),
    (_say_one, ["'packed.pt'", "holds 2 children", "lists 1"]),
    (_swap_names, ["'packed.pt'", "holds 2 children ['child-0', 'child-1']", "['child-1', 'child-0']"]),
    (_bad_index, ["'child-1'", "'packed'", "0 <= i < n"]),
    (_plain_share, ["'child-0' and 'child-1' share file 'packed.pt'", "not a packed file"]),
])
def test_manifest_that_does_not_match_the_packed_file_is_refused(dirs, tmp_path, edit, words):
    copy = _copy(dirs[0], tmp_path, edit)
    with pytest.raises(PatError) as e:
        EnsembleDir.load(copy)
    for word in words:
        assert word in str(e.value)
    line = one_error_line(run("eval", copy))
    assert "packed.pt" in line or "'child-1'" in line


def test_a_truncated_packed_file_is_named_by_its_stamp(dirs, tmp_path):
    copy = _copy(dirs[0], tmp_path)
    data = (copy / "packed.pt").read_bytes()
    (copy / "packed.pt").write_bytes(data[: len(data) // 2])
    line = one_error_line(run("eval", copy))
    assert "'child-0' file 'packed.pt'" in line and "truncated or replaced" in line


TUNE = TuneConfig(epochs=2, max_lr=0.02, bagging=0.5, device="cpu", data=DataConfig(batch_size=64))


def test_tuning_a_packed_directory_equals_tuning_its_children_one_by_one(dirs, digits, tmp_path):
    packed, plain = (_copy(d, tmp_path / n) for d, n in zip(dirs, ("p", "u"), strict=True))
    tune_directory(str(plain), digits, TUNE)

    class StopAfterFirstEpoch(Callback):
        def on_epoch_end(self, state):
            raise KeyboardInterrupt

    before = (packed / "packed.pt").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        tune_directory(str(packed), digits, TUNE, callbacks=lambda name: [StopAfterFirstEpoch()])
    assert (packed / "packed.pt").read_bytes() == before  # the file is replaced only when all finish
    partial = packed / ".work" / "packed-packed.partial.pt"  # the runner names the job after its file
    assert load_checkpoint(partial)["epoch"] == 1
    done = []
    tune_directory(str(packed), digits, TUNE, on_done=lambda r: done.append(r["name"]))
    assert done == ["child-0", "child-1"] and not partial.exists()
    p, u = EnsembleDir.load(packed), EnsembleDir.load(plain)
    assert {m["file"] for m in p.members} == {"packed.pt"} and not list(packed.glob("child-*"))
    assert len({m["sha256"] for m in p.members}) == 1
    for rp, ru in zip(p.members, u.members, strict=True):
        assert rp["status"] == "tuned" and rp["metrics"] == pytest.approx(ru["metrics"], abs=1e-5)
        assert rp["cost"]["steps"] == ru["cost"]["steps"] and rp["cost"]["together"] == 2
    got, want = Ensemble.load(packed).members, Ensemble.load(plain).members
    for a, b, record in zip(got, want, u.members, strict=True):
        assert a.pat_child.kept == load_checkpoint(u.member_path(record))["kept"]
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=key)
    assert load_checkpoint(packed / "packed.pt")["status"] == "tuned"
    done.clear()
    tune_directory(str(packed), digits, TUNE, on_done=lambda r: done.append(r["name"]))
    assert done == []  # finished: nothing is tuned again


def test_a_manifest_write_lost_after_the_packed_file_is_reconciled(dirs, digits, tmp_path):
    packed = _copy(dirs[0], tmp_path)
    manifest = (packed / "ensemble.json").read_text()
    tune_directory(str(packed), digits, TuneConfig(epochs=1, max_lr=0.02, device="cpu"))
    tuned = EnsembleDir.load(packed).members
    (packed / "ensemble.json").write_text(manifest)  # as if killed before the manifest write
    done = []
    ens = tune_directory(str(packed), digits, TuneConfig(epochs=1, max_lr=0.02, device="cpu"),
                         on_done=lambda r: done.append(r["name"]))
    assert done == [] and [m["metrics"] for m in ens.members] == [m["metrics"] for m in tuned]
    assert [m["sha256"] for m in ens.members] == [m["sha256"] for m in tuned]


def test_cli_tunes_a_packed_directory_and_refuses_sam_with_nothing_written(dirs, tmp_path):
    packed = _copy(dirs[0], tmp_path)
    before = {p.name: p.read_bytes() for p in sorted(packed.iterdir()) if p.is_file()}
    line = one_error_line(run("tune", packed, "--step", "sam", "--epochs", 1, "--device", "cpu"))
    assert "--step 'sam'" in line and "'packed.pt'" in line and "tune together" in line
    assert {p.name: p.read_bytes() for p in sorted(packed.iterdir()) if p.is_file()} == before
    result = run("tune", packed, "--epochs", 1, "--max-lr", 0.02, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [m["status"] for m in EnsembleDir.load(packed).members] == ["tuned"] * 2
    assert run("eval", packed, "--device", "cpu").exit_code == 0
