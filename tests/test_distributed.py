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
