from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import one_error_line, run

from pat.store import EnsembleDir


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, digits_parent) -> str:
    out = tmp_path_factory.mktemp("cli") / "children"
    assert run("split", "--parent", digits_parent, "--children", 4, "--anti-random", "--out", out).exit_code == 0
    result = run("tune", out, "--epochs", 1, "--max-lr", 0.05, "--batch-size", 64, "--dataset", "digits")
    assert result.exit_code == 0, result.output
    return str(out)


def test_split_writes_manifest_with_recipe_and_table(tmp_path, digits_parent):
    out = tmp_path / "kids"
    result = run("split", "--parent", digits_parent, "--children", 4, "--method", "cyclic",
                 "--sparsity", 0.25, "--seed", 7, "--out", out)
    assert result.exit_code == 0, result.output
    assert "child-3" in result.output and "kept_params" in result.output
    ens = EnsembleDir.load(out)
    assert [m["name"] for m in ens.members] == ["child-0", "child-1", "child-2", "child-3"]
    for i, m in enumerate(ens.members):
        assert m["status"] == "split" and m["recipe"]["seed"] == 7 and m["recipe"]["index"] == i
        assert m["recipe"]["method"] == "cyclic" and m["recipe"]["sparsity"] == pytest.approx(0.25)
        assert m["stats"]["sparsity"] == pytest.approx(0.25, abs=0.05)  # classifier/biases stay dense
        assert m["recipe"]["rescale"] is True  # the default at connection level
    assert ens.manifest["dataset"] == "digits" and ens.manifest["num_classes"] == 10
    plain = tmp_path / "plain"
    assert run("split", "--parent", digits_parent, "--children", 2, "--no-rescale", "--out", plain).exit_code == 0
    assert all(m["recipe"]["rescale"] is False for m in EnsembleDir.load(plain).members)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--sparsity", "1.5"], ["sparsity", "1.5"]),
        (["--method", "anti-random", "--sparsity", "0.3"], ["0.3", "cyclic"]),
        (["--children", "0"], ["children", "0"]),
        (["--method", "partition", "--children", "1"], ["partition", "1"]),
        (["--physical"], ["physical", "neuron"]),
        (["--level", "neuron", "--rescale"], ["rescale", "neuron"]),
    ],
)
def test_split_bad_input_writes_nothing(tmp_path, digits_parent, args, words):
    out = tmp_path / "kids"
    line = one_error_line(run("split", "--parent", digits_parent, *args, "--out", out))
    for word in words:
        assert word in line
    assert not out.exists()


PACK = ["--level", "neuron", "--method", "partition", "--physical", "--pack"]


def test_split_pack_writes_one_packed_file_that_eval_reads(tmp_path, digits_parent):
    out = tmp_path / "kids"
    result = run("split", "--parent", digits_parent, "--children", 2, *PACK, "--out", out)
    assert result.exit_code == 0, result.output
    assert "2 packed partition children" in result.output.replace("\n", " ")
    ens = EnsembleDir.load(out)
    assert [(m["name"], m["file"], m["packed"]) for m in ens.members] == [
        ("child-0", "packed.pt", {"index": 0, "of": 2}), ("child-1", "packed.pt", {"index": 1, "of": 2})]
    assert ens.manifest["config"]["split"]["pack"] is True and not list(out.glob("child-*.pt"))
    result = run("eval", out)
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "metrics.json").read_text())["all"]["members"]) == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "partition", "--pack"], ["pack", "level='connection'"]),
        (["--level", "neuron", "--method", "cyclic", "--sparsity", "0.5", "--physical", "--pack"],
         ["pack", "partition", "method='cyclic'"]),
        (["--level", "neuron", "--method", "partition", "--pack"], ["pack", "physical=False"]),
        ([*PACK, "--children", "3"], ["--pack with --children 3", "equal widths"]),
    ],
)
def test_split_pack_bad_input_writes_nothing(tmp_path, digits_parent, args, words):
    out = tmp_path / "kids"
    line = one_error_line(run("split", "--parent", digits_parent, "--children", 2, *args, "--out", out))
    for word in words:
        assert word in line, line
    assert not out.exists()


def test_split_refuses_missing_corrupt_parent_and_existing_children(tmp_path, digits_parent):
    assert "does not exist" in one_error_line(run("split", "--parent", tmp_path / "no.pt", "--out", tmp_path / "a"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert "not a readable checkpoint" in one_error_line(run("split", "--parent", bad, "--out", tmp_path / "b"))
    out = tmp_path / "kids"
    assert run("split", "--parent", digits_parent, "--children", 2, "--out", out).exit_code == 0
    before = (out / "child-0.pt").read_bytes()
    line = one_error_line(run("split", "--parent", digits_parent, "--children", 2, "--seed", 1, "--out", out))
    assert "already holds an ensemble" in line and "--force" in line
    assert (out / "child-0.pt").read_bytes() == before
    assert run("split", "--parent", digits_parent, "--children", 2, "--seed", 1, "--out", out, "--force").exit_code == 0
    assert (out / "child-0.pt").read_bytes() != before


def test_tune_reports_children_and_rerun_skips_them(tuned, monkeypatch):
    import pat.comparison as comparison
    from pat.comparison import evaluate_run, parent_check
    from pat.data import load_dataset

    ens = EnsembleDir.load(tuned)
    assert all(m["status"] == "tuned" for m in ens.members)
    passes = []
    collect = comparison.collect_probs
    monkeypatch.setattr(comparison, "collect_probs", lambda models, loader: passes.append(len(models)) or collect(models, loader))
    again = run("tune", tuned, "--epochs", 1, "--batch-size", 64, "--dataset", "digits")
    assert again.exit_code == 0 and "✓" not in again.output  # nothing tuned again
    assert "ensemble (4)" in again.output
    # the parent's test row and its check on validation share one pass over each split
    assert passes == [5, 5]
    monkeypatch.undo()
    rows, _ = evaluate_run(tuned, load_dataset("digits"), parent_path=ens.manifest["parent"]["file"])
    parent_line = next(line for line in again.output.splitlines() if "│ parent" in line)
    assert f"{rows[0]['accuracy']:.4f}" in parent_line
    # the run ends with the ensemble against its parent on validation, warning when worse
    check = parent_check(tuned, load_dataset("digits"))
    line = next(line for line in again.output.splitlines() if line.startswith("validation: ensemble of 4"))
    assert f"{check['ensemble']['accuracy']:.2%}" in line and f"{check['parent']['accuracy']:.2%}" in line
    assert ("warning: the ensemble is worse than its parent" in again.output) == check["worse"]


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--epochs", "0"], ["epochs", "0"]), (["--max-lr", "-1"], ["max_lr", "-1"]),
     (["--bagging", "1.5"], ["bagging", "1.5"])],
)
def test_tune_bad_input(tuned, args, words):
    line = one_error_line(run("tune", tuned, *args, "--dataset", "digits"))
    for word in words:
        assert word in line


def test_tune_missing_dir_and_invalid_manifest(tmp_path):
    assert "is not a directory" in one_error_line(run("tune", tmp_path / "none"))
    (tmp_path / "ensemble.json").write_text("{not json")
    assert "not valid JSON" in one_error_line(run("tune", tmp_path))


def test_eval_select_soup(tuned, tmp_path):
    result = run("eval", tuned, "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    metrics = json.loads((EnsembleDir.load(tuned).path / "metrics.json").read_text())
    assert len(metrics["all"]["members"]) == 4 and 0 <= metrics["all"]["ensemble"]["ece"] <= 1
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "accuracy_vs_size.png", "disagreement.png", "reliability.png", "risk_coverage.png"]

    result = run("select", tuned)  # its defaults: greedy, up to every member
    assert result.exit_code == 0, result.output
    selection = EnsembleDir.load(tuned).manifest["selection"]
    assert selection["method"] == "greedy" and 1 <= len(selection["selected"]) <= 4
    result = run("select", tuned, "--method", "top-k", "--size", 2)
    assert result.exit_code == 0, result.output
    selection = EnsembleDir.load(tuned).manifest["selection"]
    assert selection["method"] == "top-k" and len(selection["selected"]) == 2
    shown = run("eval", tuned)
    assert "top-k team (2)" in shown.output

    soup = tmp_path / "soup.pt"
    result = run("soup", tuned, "--out", soup)
    assert result.exit_code == 0 and soup.exists(), result.output
    assert "already exists" in one_error_line(run("soup", tuned, "--out", soup))
    import torch

    assert torch.load(soup, weights_only=True)["image_shape"] == EnsembleDir.load(tuned).manifest["image_shape"]


def test_dee_refuses_a_reference_of_other_data(tuned, tmp_path):
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(tuned, ref)
    manifest = json.loads((ref / "ensemble.json").read_text())
    manifest["data"] = {**(manifest.get("data") or {}), "dataset": "fashion-mnist"}
    manifest["dataset"] = "fashion-mnist"
    (ref / "ensemble.json").write_text(json.dumps(manifest))
    line = one_error_line(run("eval", tuned, "--dee", ref))
    assert "--dee" in line and "'fashion-mnist'" in line and "'digits'" in line


def test_ensemble_bad_input(tuned, tmp_path):
    manifest = (Path(tuned) / "ensemble.json").read_bytes()
    for method in ("top-k", "random", "greedy", "brute-force", "focal"):  # each selector calls it --size
        for size in (9, 0):
            line = one_error_line(run("select", tuned, "--method", method, "--size", size))
            assert f"--size on the command line) must be between 1 and the pool size 4. Got {size}." in line
    assert (Path(tuned) / "ensemble.json").read_bytes() == manifest
    assert "unknown selector 'best'" in one_error_line(run("select", tuned, "--method", "best"))
    line = one_error_line(run("select", tuned, "--method", "top-k"))
    assert "'top-k' needs a team size" in line and "--size" in line


def test_eval_refuses_dataset_with_other_class_count(tuned, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tuned, copy)
    manifest = json.loads((copy / "ensemble.json").read_text())
    manifest["num_classes"] = 3
    (copy / "ensemble.json").write_text(json.dumps(manifest))
    line = one_error_line(run("eval", copy))
    assert "10 classes" in line and "3" in line


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_soup_of_physical_children_is_refused(tmp_path, digits_parent, scope):
    out = tmp_path / "phys"
    result = run("split", "--parent", digits_parent, "--children", 2, "--method", "random", "--sparsity", 0.3,
                 "--level", "neuron", "--scope", scope, "--physical", "--out", out)
    assert result.exit_code == 0, result.output
    assert "different channels kept" in one_error_line(run("soup", out, "--out", tmp_path / "s.pt"))
    assert not (tmp_path / "s.pt").exists()


def test_tune_uses_the_dataset_the_children_were_made_for(tmp_path, digits_parent):
    out = tmp_path / "children"
    assert run("split", "--parent", digits_parent, "--children", 2, "--out", out).exit_code == 0
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["dataset"] == "digits" and manifest["data"]["dataset"] == "digits"
    # a manifest naming another dataset is what tune loads: never digits by default
    manifest["data"]["dataset"] = "no-such-dataset"
    (out / "ensemble.json").write_text(json.dumps(manifest))
    line = one_error_line(run("tune", out, "--epochs", 1))
    assert "no-such-dataset" in line
    manifest.pop("dataset"), manifest.pop("data")  # a manifest from before either was recorded
    (out / "ensemble.json").write_text(json.dumps(manifest))
    assert "records no dataset; pass --dataset" in one_error_line(run("tune", out, "--epochs", 1))


def test_tune_without_its_parent_file_reports_the_children_and_says_it_did_not_compare(tmp_path, digits_parent):
    import shutil

    parent = tmp_path / "parent.pt"
    shutil.copy(digits_parent, parent)
    out = tmp_path / "children"
    assert run("split", "--parent", parent, "--children", 2, "--out", out).exit_code == 0
    assert run("tune", out, "--epochs", 1, "--batch-size", 64).exit_code == 0
    parent.unlink()
    again = run("tune", out, "--epochs", 1, "--batch-size", 64)
    assert again.exit_code == 0, again.output
    assert "ensemble (2)" in again.output and "│ parent" not in again.output
    assert "ensemble vs parent on validation: not compared" in again.output


@pytest.mark.parametrize(("text", "words"), [
    ("parent: {epochs: -3}\n", ["bad.yaml.parent: epochs must be positive. Got -3."]),
    ("tune: {max_lr: 0}\n", ["bad.yaml.tune: max_lr must be positive. Got 0."]),
    ("nonsense: 1\n", ["bad.yaml has unknown keys ['nonsense']"]),
    (": : :\n", ["bad.yaml' is not valid YAML"]),
    # a value of the wrong kind: named, not a TypeError from a comparison or a schedule
    ("parent: {lr: abc}\n", ["bad.yaml.parent: lr must be a number. Got 'abc'."]),
    ("tune: {epochs: 1.5}\n", ["bad.yaml.tune: epochs must be an integer. Got 1.5."]),
    ("parent: {data: {batch_size: 12.5}}\n", ["bad.yaml.parent.data: batch_size must be an integer. Got 12.5."]),
    ("tune: {amp: 'yes'}\n", ["bad.yaml.tune: amp must be true, false or null. Got 'yes'."]),
])  # fmt: skip
def test_run_refuses_a_bad_config_naming_the_key_and_writes_nothing(tmp_path, monkeypatch, text, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    line = one_error_line(run("run", "bad.yaml"))
    for word in words:
        assert word in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


KEPT = {"epoch": 17, "val_loss": 0.55, "val_acc": 0.803, "last": {"epoch": 48, "val_loss": 2.3026, "val_acc": 0.1}}


@pytest.mark.parametrize("parent_acc, ens_acc, kept, words", [
    (0.10, 0.10, None, ["the parent is at chance on validation (10.00%)"]),
    (0.95, 0.90, None, ["warning: the ensemble is worse than its parent"]),
    (0.95, 0.97, None, []),
    (0.80, 0.85, KEPT, ["the parent collapsed: validation accuracy 10.00% at its last epoch (48) against "
                        "80.30% at epoch 17; epoch 17 was kept"]),
])  # fmt: skip
def test_validation_line_warns_when_the_ensemble_or_its_parent_fails(parent_acc, ens_acc, kept, words):
    from pat.cli.children import _validation_line
    from pat.cli.render import console

    check = {"parent": {"accuracy": parent_acc, "nll": 0.2}, "ensemble": {"accuracy": ens_acc, "nll": 0.2},
             "members": 6, "flips": {"lost": 9, "won": 2}, "nll_diff": {"mean": 0.0, "se": 0.0125},
             "worse": ens_acc < parent_acc,
             "parent_at_chance": parent_acc <= 0.15, "parent_restored": kept}
    with console.capture() as captured:
        _validation_line(check)
    text = captured.get()
    assert text.startswith("validation: ensemble of 6") and "+0.0000 ± 0.0125; images" in text
    assert all(w in text for w in words)
    assert ("warning" in text) == bool(words)


def test_demo_runs_each_seed_into_its_own_directory_and_summarizes_them(tmp_path, monkeypatch):
    """``pat demo --seeds 3``: seeds 0-2 of the same pair split (initialisation, split, tuning), the
    same data split, each in OUT/seed-K, then their mean ± SE and the ensemble paired against the others."""
    import pat.pipeline as pipeline
    from pat.pipeline import RunResult

    configs = []

    def fake_run(config, **kwargs):
        configs.append(config)
        s = config.parent.seed
        rows = [{"name": "parent", "accuracy": 0.8, "nll": 0.5, "nll_ts": 0.4, "ece": 0.1, "brier": 0.2},
                {"name": "ensemble (2)", "accuracy": 0.97 + s / 100, "nll": 0.1, "nll_ts": 0.1, "ece": 0.1, "brier": 0.1},
                {"name": "independent (48 ep)", "accuracy": 0.98, "nll": 0.1, "nll_ts": 0.2, "ece": 0.1, "brier": 0.1}]
        return RunResult(out=config.out, rows=rows, diversity={}, seconds=1.0)

    monkeypatch.setattr(pipeline, "run", fake_run)
    result = run("demo", "--out", tmp_path / "d", "--seeds", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [c.out for c in configs] == [str(tmp_path / "d" / f"seed-{s}") for s in range(3)]
    for s, c in enumerate(configs):
        assert (c.parent.seed, c.split.seed, c.tune.seed, c.parent.data.seed) == (s, s, s, 0)
        assert (c.split.children, c.split.method, c.split.physical, c.budget.epochs) == (2, "partition", True, 48)
    assert "3 seeds" in result.output
    assert "0.9800 ± 0.0058" in result.output  # the ensemble's accuracy: 0.97, 0.98, 0.99
    line = next(s for s in result.output.splitlines() if "− independent" in s)
    assert "accuracy +0.0000 ± 0.0058 (better on 1 of 3)" in line and "nll_ts -0.1000" in line
    assert one_error_line(run("demo", "--out", tmp_path / "e", "--seeds", 0)).count("--seeds") == 1
    assert not (tmp_path / "e").exists()
