from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from pat.cli import PatGroup
from pat.cli.producers import pool
from pat.config import DataConfig
from pat.data import load_dataset
from pat.engine.checkpoint import load_checkpoint, load_model
from pat.errors import PatError
from pat.producers.lr_pool import PAPER_GRID, PoolConfig, pool_jobs, train_pool
from pat.store import EnsembleDir


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("synthetic", train_size=96, test_size=32, in_channels=1, seed=0)


def config(**kw) -> PoolConfig:
    base = dict(model="lenet-s", data=DataConfig(dataset="synthetic", batch_size=32), epochs=1,
                policies=("multistep", "onecycle"), lrs=(0.05,), device="cpu")
    return PoolConfig(**{**base, **kw})


def test_default_grid_is_the_papers_sixteen_members():
    jobs = pool_jobs(PoolConfig())
    assert len(jobs) == 16 and len({name for name, _, _ in jobs}) == 16
    assert {(p, lr) for _, p, lr in jobs} == {(p, lr) for p, lrs in PAPER_GRID.items() for lr in lrs}
    assert ("one-cycle-lr0.4", "one-cycle", 0.4) in jobs


def test_pool_writes_one_member_per_pair_and_resumes(tmp_path, tiny_data):
    out = tmp_path / "pool"
    trained = []
    ens = train_pool(config(), out, data=tiny_data, on_member=lambda r, skipped: trained.append((r["name"], skipped)))
    assert trained == [("multistep-lr0.05", False), ("one-cycle-lr0.05", False)]
    ens = EnsembleDir.load(out)
    assert [m["name"] for m in ens.members] == ["multistep-lr0.05", "one-cycle-lr0.05"]
    for m in ens.members:
        assert m["producer"] == "pool" and m["status"] == "trained"
        assert m["recipe"]["lr"] == 0.05 and m["recipe"]["policy"] in ("multistep", "one-cycle")
        assert 0 <= m["metrics"]["test_acc"] <= 1
        model, ckpt = load_model(ens.member_path(m))
        assert ckpt["kind"] == "member" and ckpt["history"][0]["lr"] > 0
    # different policies give different weights
    a, b = (load_checkpoint(ens.member_path(m))["state_dict"] for m in ens.members)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    # resume: delete one member, rerun; the other is skipped and left untouched
    keep = ens.member_path("multistep-lr0.05")
    stamp = keep.stat().st_mtime_ns
    ens.member_path("one-cycle-lr0.05").unlink()
    trained.clear()
    train_pool(config(), out, data=tiny_data, on_member=lambda r, skipped: trained.append((r["name"], skipped)))
    assert trained == [("multistep-lr0.05", True), ("one-cycle-lr0.05", False)]
    assert keep.stat().st_mtime_ns == stamp
    assert len(EnsembleDir.load(out)) == 2

    # other settings in the same directory: refused unless forced
    with pytest.raises(PatError, match="--force"):
        train_pool(config(lrs=(0.01,)), out, data=tiny_data)
    train_pool(config(lrs=(0.01,), policies=("multistep",)), out, data=tiny_data, force=True)
    assert [m["name"] for m in EnsembleDir.load(out).members] == ["multistep-lr0.01"]
    assert not keep.exists()


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        (dict(policies=("multistep", "zigzag")), ["zigzag", "composite"]),
        (dict(policies=()), ["policies"]),
        (dict(lrs=()), ["lrs", "empty"]),
        (dict(lrs=(0.1, -1.0)), ["lrs", "-1.0"]),
        (dict(lrs=None, policies=("cosine",)), ["cosine", "--lrs"]),
        (dict(epochs=0), ["epochs", "0"]),
    ],
)
def test_bad_config_names_argument_and_value(kw, words):
    with pytest.raises(PatError) as err:
        config(**kw)
    for word in words:
        assert word in str(err.value)


def cli():
    group = PatGroup()
    group.add_command(pool)
    return group


@pytest.mark.slow
def test_cli_pool_writes_members_and_plot(tmp_path):
    out, png = tmp_path / "pool", tmp_path / "lr.png"
    args = ["pool", "--dataset", "synthetic", "--epochs", "1", "--policies", "warmup-cosine,composite",
            "--lrs", "0.02", "--device", "cpu", "--out", str(out), "--plot-policies", str(png)]
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000
    assert [m["name"] for m in EnsembleDir.load(out).members] == ["warmup-cosine-lr0.02", "composite-lr0.02"]
    assert "composite-lr0.02" in result.output


@pytest.mark.parametrize(("args", "word"), [(["--policies", "nope"], "nope"), (["--lrs", ","], "lrs"),
                                            (["--lrs", "a,b"], "--lrs")])
def test_cli_bad_input_is_one_error_line(tmp_path, args, word):
    result = CliRunner().invoke(cli(), ["pool", "--dataset", "synthetic", "--epochs", "1",
                                        "--out", str(tmp_path / "p"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and word in errors[0]
    assert not (tmp_path / "p").exists()


def test_pool_directory_records_its_dataset_for_eval(tmp_path):
    from click.testing import CliRunner

    from pat.cli import cli

    out = tmp_path / "pool"
    runner = CliRunner()
    made = runner.invoke(cli, ["pool", "--model", "lenet-s", "--dataset", "digits", "--epochs", "1",
                               "--policies", "one-cycle", "--lrs", "0.1,0.05", "--batch-size", "256",
                               "--out", str(out)])
    assert made.exit_code == 0, made.output
    chosen = runner.invoke(cli, ["select", str(out), "--method", "focal", "--size", "2"])  # no --dataset
    assert chosen.exit_code == 0, chosen.output
    shown = runner.invoke(cli, ["eval", str(out)])
    assert shown.exit_code == 0 and "focal team (2)" in shown.output, shown.output
