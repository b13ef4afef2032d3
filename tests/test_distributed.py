"""Children sharded across torchrun ranks (gloo on CPU) give the single-process result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from pat.config import DataConfig, SplitConfig, TuneConfig
from pat.engine.checkpoint import load_checkpoint
from pat.pipeline import split_to_directory
from pat.store import EnsembleDir
from pat.tuner import tune_directory


@pytest.mark.slow
def test_two_rank_torchrun_tune_matches_single_process(tmp_path, digits_parent, digits):
    single = split_to_directory(digits_parent, tmp_path / "single", SplitConfig(children=4)).path
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)

    torch.set_num_threads(1)
    tune_directory(str(single), digits, TuneConfig(epochs=1, max_lr=0.05, device="cpu",
                                                   data=DataConfig(batch_size=64)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pat", "tune", str(sharded), "--epochs", "1", "--max-lr", "0.05", "--dataset", "digits",
           "--batch-size", "64", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    manifest = EnsembleDir.load(sharded)
    assert [m["status"] for m in manifest.members] == ["tuned"] * 4  # rank 0 recorded rank 1's children
    for member in EnsembleDir.load(single).members:
        a = load_checkpoint(single / member["file"])["state_dict"]
        b = load_checkpoint(sharded / member["file"])["state_dict"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{member['name']} {key}")


def _torchrun(*args, nproc: int = 2, restarts: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(restarts), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


TRAIN = ["train", "--model", "lenet-s", "--dataset", "digits", "--epochs", 2, "--lr", 0.05,
         "--batch-size", 48, "--device", "cpu"]


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    """The same parent trained in one process and data-parallel on two ranks (digits' last
    batch splits unevenly: 1295 training images = 26 x 48 + 47). Two epochs: the all-reduce
    adds in another order, and by the third epoch this early, chaotic phase of training has
    grown those 1e-8 differences to 1e-2 (measured), as any reordering of the sums would."""
    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "pat", *map(str, TRAIN), "--out", root / "single.pt"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    done = _torchrun("-m", "pat", *TRAIN, "--out", root / "ddp.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def _assert_same_weights(a_path, b_path, atol=1e-5):
    a, b = load_checkpoint(a_path)["state_dict"], load_checkpoint(b_path)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow
def test_ddp_parent_equals_one_process_with_the_same_global_batch(one_and_two_ranks):
    root = one_and_two_ranks
    _assert_same_weights(root / "single.pt", root / "ddp.pt", atol=1e-4)
    one, two = load_checkpoint(root / "single.pt"), load_checkpoint(root / "ddp.pt")
    for a, b in zip(one["history"], two["history"], strict=True):  # train metrics over every rank's rows
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=1e-9)
    assert two["cost"]["samples"] == one["cost"]["samples"] and two["cost"]["steps"] == one["cost"]["steps"]
    assert two["cost"]["ranks"] == 2 and not (root / "ddp.pt.partial").exists()


KILL_RANK_1 = """
import os, sys
from pat.config import DataConfig, TrainConfig
from pat.engine.callbacks import Callback
from pat.parent import train_parent

out, kill_at = sys.argv[1], int(sys.argv[2])

class Kill(Callback):  # the first attempt's rank 1 dies after epoch `kill_at`
    def on_epoch_end(self, state):
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first and os.environ["RANK"] == "1" and state.epoch + 1 == kill_at:
            os._exit(1)

with open(out + ".epochs", "a") as log:
    log.write(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") + "\\n")
train_parent(TrainConfig(model="lenet-s", epochs=2, lr=0.05, device="cpu", data=DataConfig(batch_size=48)),
             out=out, callbacks=[Kill()])
"""


@pytest.mark.slow
def test_elastic_restart_after_a_killed_rank_resumes_the_parent_from_its_last_epoch(one_and_two_ranks, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_RANK_1)
    out = tmp_path / "parent.pt"
    done = _torchrun(script, out, 1, restarts=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "parent.pt.epochs").read_text().split() == ["0", "0", "1", "1"]  # restarted once
    ckpt = load_checkpoint(out)
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]
    # resumed from epoch 1's state: the same weights as the uninterrupted two-rank run
    uninterrupted = load_checkpoint(one_and_two_ranks / "ddp.pt")
    assert ckpt["config"]["epochs"] == uninterrupted["config"]["epochs"]
    _assert_same_weights(out, one_and_two_ranks / "ddp.pt", atol=1e-6)
