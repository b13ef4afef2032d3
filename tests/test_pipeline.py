from __future__ import annotations

import json

import pytest
import yaml

from pat.config import RunConfig, from_dict, to_dict
from pat.errors import PatError
from pat.pipeline import demo_config, resolve_budget, run


@pytest.mark.slow
def test_demo_ensemble_beats_its_parent_on_digits_test_split(tmp_path, digits):
    """One seed of the demo: more accurate than its parent, and no worse in NLL than chance explains.

    On test, image by image as on validation (decision 69). At the demo's LR 0.03 (decision 75)
    the ensemble's test NLL was below its parent's on each of seeds 0-4 (0.016-0.027 against
    0.057-0.320, one thread), but at 0.05 one seed was level, so the assertion keeps to what one
    seed carries: not worse beyond chance.
    """
    from pat.comparison import load_compared
    from pat.ensemble.ensemble import Ensemble
    from pat.ensemble.metrics import sample_nll
    from pat.ensemble.predict import collect_probs

    out = tmp_path / "demo"
    result = run(demo_config(str(out)))
    parent, ensemble, independent = result.rows[0], result.rows[-2], result.rows[-1]
    assert parent["name"] == "parent" and ensemble["name"] == "ensemble (2)"
    assert [r["name"] for r in result.rows[1:-2]] == ["child-0", "child-1"]
    assert independent["name"] == "independent (48 ep)"
    assert ensemble["accuracy"] > parent["accuracy"]
    members = Ensemble.load(out / "children", device="cpu", calibrated=False).members
    probs, labels = collect_probs([load_compared(out / "parent.pt", digits, "cpu")[0], *members],
                                  digits.loader("test", batch_size=512))
    diff = sample_nll(probs[1:].mean(0), labels) - sample_nll(probs[0], labels)
    assert float(diff.mean()) == pytest.approx(ensemble["nll"] - parent["nll"], abs=1e-5)
    assert float(diff.mean()) <= 1.96 * float(diff.std()) / len(diff) ** 0.5
    assert not result.validation["worse"]  # and on validation too, where the run checks it
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["test"][-2]["accuracy"] == ensemble["accuracy"]
    # the resolved config is saved with the outputs and reads back to the same run
    config = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    assert from_dict(RunConfig, config) == resolve_budget(demo_config(str(tmp_path / "demo")), digits)[0]


def test_output_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = to_dict(demo_config(str(out)))
    other["parent"]["epochs"] = 99
    (out / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(PatError, match="holds a run with a different config"):
        run(demo_config(str(out)))
    assert yaml.safe_load((out / "config.yaml").read_text())["parent"]["epochs"] == 99


def test_output_holding_other_files_or_unwritable_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    """A folder of other things would get a run's files mixed in: refused unless forced."""
    import pat.pipeline as pipeline

    loads = []

    def load_dataset(name, **kwargs):
        loads.append(name)
        raise PatError("stopped by the test after the checks")

    monkeypatch.setattr(pipeline, "load_dataset", load_dataset)
    out = tmp_path / "kids"
    out.mkdir()
    (out / "ensemble.json").write_text("{}")
    (out / "child-0.pt").write_bytes(b"a child")
    with pytest.raises(PatError, match=r"^out '.*kids' holds other files \(child-0\.pt, ensemble\.json\) and no run; "
                                       r".*--force"):
        run(demo_config(str(out)))
    assert loads == [] and sorted(p.name for p in out.iterdir()) == ["child-0.pt", "ensemble.json"]
    with pytest.raises(PatError, match="stopped by the test"):  # --force writes beside them
        run(demo_config(str(out)), force=True)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".gitignore").write_text("*\n")
    with pytest.raises(PatError, match="stopped by the test"):  # hidden files do not count
        run(demo_config(str(hidden)))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PatError, match=r"^out '.*file/run' cannot be written: '.*file' is a file, not a folder\.$"):
        run(demo_config(str(tmp_path / "file" / "run")))
    assert len(loads) == 2
