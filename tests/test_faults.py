"""Bad input and faults (issue 13): manifests pointing outside their directory, requests that
cannot fit, member files changed behind pat's back, interrupts, two writers, a full disk."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line, run

import pat
from pat.children import iter_split, split
from pat.engine.checkpoint import load_model
from pat.lock import LOCK_FILE
from pat.store import MANIFEST, EnsembleDir

ENV = {**os.environ, "PYTHONPATH": str(Path(pat.__file__).resolve().parents[1])}
FAST_TUNE = ("--epochs", 1, "--max-lr", 0.05, "--batch-size", 64, "--device", "cpu")



def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*.tmp")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def kids(tmp_path_factory, digits_parent) -> Path:
    """Two split (untuned) children of the digits parent; tests work on copies."""
    out = tmp_path_factory.mktemp("faults") / "kids"
    result = run("split", "--parent", digits_parent, "--children", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def ens_dir(tmp_path, kids) -> Path:
    d = tmp_path / "ens"
    shutil.copytree(kids, d)
    return d


def edit_manifest(d: Path, change) -> None:
    m = json.loads((d / MANIFEST).read_text())
    change(m)
    (d / MANIFEST).write_text(json.dumps(m))


# -- 1. member files outside the directory --------------------------------------------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_member_file_outside_the_directory_is_refused_by_every_command(tmp_path, ens_dir, kind):
    outside = tmp_path / "x.pt"
    shutil.copy(ens_dir / "child-1.pt", outside)  # same bytes: its recorded sha256 still matches
    outside_before = sha256(outside)
    name = {"dotdot": "../x.pt", "absolute": str(outside), "symlink": "link.pt"}[kind]
    if kind == "symlink":
        (ens_dir / "link.pt").symlink_to(outside)

    def point_outside(m):
        m["members"][1]["file"] = name

    edit_manifest(ens_dir, point_outside)
    soup = tmp_path / "soup.pt"
    for args in (["eval", ens_dir], ["select", ens_dir, "--size", 2], ["calibrate", ens_dir],
                 ["soup", ens_dir, "--out", soup], ["tune", ens_dir, *FAST_TUNE]):
        line = one_error_line(run(*args))
        assert "child-1" in line and name in line, (args, line)
        assert ("symlink" if kind == "symlink" else "inside the directory") in line
    assert not soup.exists()
    assert sha256(outside) == outside_before  # not tuned, not overwritten
    assert json.loads((ens_dir / MANIFEST).read_text())["members"][0]["status"] == "split"  # tune did nothing


def test_intact_copy_with_a_parent_elsewhere_still_evaluates(ens_dir):
    parent = EnsembleDir.load(ens_dir).manifest["parent"]["file"]
    assert not Path(parent).resolve().is_relative_to(ens_dir.resolve())  # the parent may live anywhere
    result = run("eval", ens_dir)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_forced_producer_never_deletes_a_file_outside_its_directory(tmp_path):
    out, victim = tmp_path / "pool", tmp_path / "victim.pt"
    out.mkdir()
    victim.write_bytes(b"keep me")
    (out / MANIFEST).write_text(json.dumps({"format_version": 1, "config": {}, "members": [
        {"name": "m", "file": "../victim.pt", "status": "trained"}]}))
    result = run("pool", "--policies", "one-cycle", "--lrs", 0.05, "--epochs", 1, "--batch-size", 64,
                 "--device", "cpu", "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"keep me"
    assert [m["name"] for m in EnsembleDir.load(out).members] == ["one-cycle-lr0.05"]


# -- 2. requests that cannot fit --------------------------------------------------------------
def test_split_that_cannot_fit_is_refused_before_any_work(tmp_path, digits_parent, monkeypatch):
    import pat.children

    def no_masks(*args, **kwargs):
        raise AssertionError("masks were drawn before the refusal")

    monkeypatch.setattr(pat.children, "generate_masks", no_masks)
    out = tmp_path / "kids"
    line = one_error_line(run("split", "--parent", digits_parent, "--children", 1_000_000, "--out", out))
    assert "--children 1000000" in line and "cannot fit" in line
    assert "TB of disk" in line and "free" in line and "of memory" in line and "available" in line
    assert not out.exists()


def test_split_refusal_weighs_free_disk_and_available_memory(tmp_path, digits_parent, monkeypatch):
    import pat.engine.resources as resources

    child = 4 * 252_490 * 1.2  # a LeNet-S child's checkpoint: float32 weights plus masks
    monkeypatch.setattr(resources, "free_disk", lambda path: int(3 * child))
    line = one_error_line(run("split", "--parent", digits_parent, "--children", 4, "--out", tmp_path / "a"))
    assert "--children 4" in line and f"{3 * child / 1e6:.1f} MB free" in line
    assert run("split", "--parent", digits_parent, "--children", 2, "--out", tmp_path / "b").exit_code == 0
    monkeypatch.setattr(resources, "available_memory", lambda: 1_000_000)
    line = one_error_line(run("split", "--parent", digits_parent, "--children", 2, "--out", tmp_path / "c"))
    assert "1.0 MB available" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_iter_split_holds_one_child_at_a_time_and_matches_split(digits_parent):
    parent = load_model(digits_parent)[0]
    refs = []
    for child in iter_split(parent, 4, method="random", sparsity=0.3, seed=3):
        refs.append(weakref.ref(child))
        del child
        gc.collect()
        assert all(r() is None for r in refs[:-1])  # every earlier child is gone
    assert len(refs) == 4
    eager = split(parent, 4, method="random", sparsity=0.3, seed=3)
    lazy = list(iter_split(parent, 4, method="random", sparsity=0.3, seed=3))
    for a, b in zip(eager, lazy, strict=True):
        assert a.pat_child.recipe == b.pat_child.recipe
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# -- 3. member file integrity -------------------------------------------------------------------
def test_manifest_records_each_member_files_size_and_sha256(ens_dir):
    for m in EnsembleDir.load(ens_dir).members:
        file = ens_dir / m["file"]
        assert m["size"] == file.stat().st_size and m["sha256"] == sha256(file)
    before = sha256(ens_dir / "child-0.pt")
    assert run("tune", ens_dir, *FAST_TUNE).exit_code == 0
    for m in EnsembleDir.load(ens_dir).members:  # tuning rewrote the files: new records
        file = ens_dir / m["file"]
        assert m["status"] == "tuned" and m["sha256"] == sha256(file) and m["size"] == file.stat().st_size
    assert sha256(ens_dir / "child-0.pt") != before


@pytest.mark.parametrize("damage", ["truncate", "replace"])
def test_member_changed_behind_pats_back_is_named(ens_dir, damage):
    target = ens_dir / "child-1.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:  # another child's file: same size, a valid checkpoint, other weights
        shutil.copy(ens_dir / "child-0.pt", target)
    for args in (["eval", ens_dir], ["tune", ens_dir, *FAST_TUNE], ["select", ens_dir, "--size", 2]):
        line = one_error_line(run(*args))
        assert "child-1" in line and "truncated or replaced" in line
        assert ("bytes" if damage == "truncate" else "sha256") in line


def test_manifest_without_sizes_and_hashes_still_loads(ens_dir):
    def old_style(m):
        for member in m["members"]:
            del member["size"], member["sha256"]

    edit_manifest(ens_dir, old_style)
    assert run("eval", ens_dir).exit_code == 0


def test_tuned_file_not_yet_in_the_manifest_is_taken_not_refused(tmp_path, ens_dir, kids):
    """What an interrupt between the tuned child's write and the manifest's leaves behind."""
    tuned = tmp_path / "tuned"
    shutil.copytree(kids, tuned)
    assert run("tune", tuned, *FAST_TUNE).exit_code == 0
    shutil.copy(tuned / "child-0.pt", ens_dir / "child-0.pt")  # the same child, tuned
    assert EnsembleDir.load(ens_dir).members[0]["status"] == "split"  # loads: it is that child's tuning
    result = run("tune", ens_dir, *FAST_TUNE)
    assert result.exit_code == 0, result.output
    assert sha256(ens_dir / "child-0.pt") == sha256(tuned / "child-0.pt")  # recorded, not tuned again
    assert EnsembleDir.load(ens_dir).members[0]["sha256"] == sha256(tuned / "child-0.pt")
    # another child's tuned file is no such thing
    fresh = tmp_path / "fresh"
    shutil.copytree(kids, fresh)
    shutil.copy(tuned / "child-1.pt", fresh / "child-0.pt")
    assert "child-0" in one_error_line(run("eval", fresh))


# -- 5. one writer per directory ------------------------------------------------------------------
def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    code = ("import sys, time; from pat.lock import acquire; "
            "acquire(sys.argv[1], command='pat tune elsewhere'); print('held', flush=True); "
            "time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_readers_go_on(ens_dir, digits_parent):
    before = snapshot(ens_dir)
    holder = hold_lock(ens_dir, 120)
    try:
        for args in (["tune", ens_dir, *FAST_TUNE], ["select", ens_dir, "--size", 2], ["calibrate", ens_dir],
                     ["split", "--parent", digits_parent, "--children", 2, "--force", "--out", ens_dir],
                     ["pool", "--policies", "one-cycle", "--lrs", 0.05, "--epochs", 1, "--force", "--out", ens_dir]):
            line = one_error_line(run(*args))
            assert f"pid {holder.pid}" in line and socket.gethostname() in line, line
            assert "pat tune elsewhere" in line and "since" in line and "--wait" in line
        after = snapshot(ens_dir)
        assert {k: v for k, v in after.items() if k != LOCK_FILE} == before  # no writer touched a thing
        assert run("eval", ens_dir).exit_code == 0  # readers take no lock
    finally:
        holder.kill()  # SIGKILL: no clean-up at all, yet the kernel drops its flock
        holder.wait()
    assert (ens_dir / LOCK_FILE).exists()  # the dead holder's file is still there ...
    result = run("select", ens_dir, "--size", 2)  # ... and locks nothing
    assert result.exit_code == 0, result.output
    assert not (ens_dir / LOCK_FILE).exists()  # a holder that finishes removes it


def test_wait_queues_behind_the_holder(ens_dir):
    holder = hold_lock(ens_dir, 2)
    start = time.monotonic()
    result = run("select", ens_dir, "--size", 2, "--wait")
    assert result.exit_code == 0, result.output
    assert holder.poll() is not None  # select ran only once the holder had gone
    assert time.monotonic() - start > 1
    holder.wait()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc (it takes no new file, even from root)")
def test_a_directory_that_cannot_be_written_is_one_line(tmp_path, ens_dir, monkeypatch):
    """A producer's --out or eval's --plot where no folder can be made, and a reader given a
    folder that is no ensemble."""
    line = one_error_line(run("pool", "--policies", "one-cycle", "--lrs", 0.05, "--epochs", 1, "--out", "/proc/pat-x"))
    assert line.startswith("Error: --out '/proc/pat-x' cannot be written (")
    monkeypatch.setattr(pat.data, "load_dataset", None)  # refused before the data (and the members) load
    line = one_error_line(run("eval", ens_dir, "--plot", "/proc/pat-x"))
    assert line.startswith("Error: --plot '/proc/pat-x' cannot be written: '/proc' takes no new file (")
    monkeypatch.undo()
    for args in (["calibrate", "/proc"], ["select", "/proc", "--size", 1], ["tune", "/proc", *FAST_TUNE]):
        assert "'/proc' has no ensemble.json" in one_error_line(run(*args))  # not the lock file's error
    (tmp_path / "plain").mkdir()
    assert "has no ensemble.json" in one_error_line(run("calibrate", tmp_path / "plain"))
    assert list((tmp_path / "plain").iterdir()) == []  # no lock file left in a folder that is no ensemble


# -- 6. a full disk -------------------------------------------------------------------------------
FULL_DISK = [
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
]


def fill_disk(monkeypatch, error: BaseException) -> None:
    def save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # something reaches the file before the disk fills
        raise error

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", FULL_DISK, ids=["torch", "enospc"])
def test_full_disk_during_tune_and_forced_split_changes_nothing(ens_dir, digits_parent, monkeypatch, error):
    before = snapshot(ens_dir)
    fill_disk(monkeypatch, error)
    line = one_error_line(run("tune", ens_dir, *FAST_TUNE))
    assert "no space left" in line and "child-0" in line  # its resume state, written after epoch 1
    line = one_error_line(run("split", "--parent", digits_parent, "--children", 3, "--seed", 9, "--force",
                              "--out", ens_dir))
    assert "no space left" in line
    monkeypatch.undo()
    assert snapshot(ens_dir) == before  # every old byte, and no temporary or staging file
    assert EnsembleDir.load(ens_dir).members[0]["status"] == "split"


@pytest.mark.parametrize("error", FULL_DISK, ids=["torch", "enospc"])
def test_full_disk_during_train_keeps_the_old_checkpoint(tmp_path, digits_parent, monkeypatch, error):
    out = tmp_path / "parent.pt"
    shutil.copy(digits_parent, out)
    before = snapshot(tmp_path)
    fill_disk(monkeypatch, error)
    line = one_error_line(run("train", "--epochs", 1, "--batch-size", 64, "--device", "cpu", "--out", out,
                              "--force"))
    assert "no space left" in line and "parent.pt" in line
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


# -- 4. SIGINT ---------------------------------------------------------------------------------------
def start(*args) -> subprocess.Popen:
    """``pat ARGS`` in a process that takes Ctrl-C, even if this one was started ignoring it."""
    return subprocess.Popen([sys.executable, "-m", "pat", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> str:
    """Send SIGINT once ``ready()`` holds; returns stderr. The run must not have finished by then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "never got ready"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    return err


def statuses(d: Path) -> list[str]:
    try:
        return [m["status"] for m in json.loads((d / MANIFEST).read_text())["members"]]
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_sigint_during_split_leaves_no_partial_ensemble_and_rerun_completes(tmp_path, digits_parent):
    out = tmp_path / "kids"
    proc = start("split", "--parent", digits_parent, "--children", 60, "--out", out)
    interrupt_when(proc, lambda: any(out.rglob("child-*.pt")))
    assert not (out / MANIFEST).exists()  # nothing claims to be an ensemble
    assert temp_files(out) == [] and not (out / ".split").exists() and not (out / LOCK_FILE).exists()
    assert "ensemble.json" in one_error_line(run("eval", out))
    result = run("split", "--parent", digits_parent, "--children", 60, "--out", out)
    assert result.exit_code == 0, result.output
    ens = EnsembleDir.load(out)
    assert len(ens) == 60 and temp_files(out) == []
    # an interrupted --force split leaves the ensemble it was replacing as it was
    before = snapshot(out)
    proc = start("split", "--parent", digits_parent, "--children", 60, "--seed", 1, "--force", "--out", out)
    interrupt_when(proc, lambda: any((out / ".split").glob("child-*.pt")))
    assert snapshot(out) == before


@pytest.mark.slow
def test_sigint_during_tune_keeps_finished_children_and_rerun_continues(ens_dir):
    proc = start("tune", ens_dir, "--epochs", 4, "--max-lr", 0.05, "--batch-size", 64, "--device", "cpu")
    # while it runs, a second tune of the same directory is refused, naming the first
    deadline = time.monotonic() + 120
    while not (ens_dir / LOCK_FILE).exists() or not (ens_dir / LOCK_FILE).read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    assert f"pid {proc.pid}" in one_error_line(run("tune", ens_dir, *FAST_TUNE))
    interrupt_when(proc, lambda: statuses(ens_dir)[:1] == ["tuned"])
    assert statuses(ens_dir) == ["tuned", "split"] and temp_files(ens_dir) == []
    first = sha256(ens_dir / "child-0.pt")
    result = run("tune", ens_dir, *FAST_TUNE)
    assert result.exit_code == 0, result.output
    assert statuses(ens_dir) == ["tuned", "tuned"] and temp_files(ens_dir) == []
    assert sha256(ens_dir / "child-0.pt") == first  # the finished child was not tuned again


@pytest.mark.slow
def test_sigint_during_pool_keeps_finished_members_and_rerun_continues(tmp_path):
    out = tmp_path / "pool"
    args = ("pool", "--policies", "one-cycle", "--lrs", "0.1,0.05", "--epochs", 3, "--batch-size", 64,
            "--device", "cpu", "--out", out)
    proc = start(*args)
    interrupt_when(proc, lambda: (out / "one-cycle-lr0.1.pt").exists())
    assert temp_files(out) == []
    first = sha256(out / "one-cycle-lr0.1.pt")
    # the signal may land before the manifest lists the member whose file is there: a valid
    # manifest that lists at most that one, and the rerun finds the file
    assert [m["name"] for m in EnsembleDir.load(out).members] in ([], ["one-cycle-lr0.1"])
    result = run(*args)
    assert result.exit_code == 0, result.output
    ens = EnsembleDir.load(out)
    assert [m["name"] for m in ens.members] == ["one-cycle-lr0.1", "one-cycle-lr0.05"]
    assert sha256(out / "one-cycle-lr0.1.pt") == first and temp_files(out) == []
    assert "finished earlier, skipped" in result.output
