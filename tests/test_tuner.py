from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pat.children import load_child, split
from pat.config import DataConfig, SplitConfig, TuneConfig
from pat.data.core import bagging_indices
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint
from pat.engine.schedules import one_cycle_lr
from pat.errors import PatError
from pat.models import create_model
from pat.pipeline import split_to_directory
from pat.store import EnsembleDir
from pat.tuner import tune, tune_directory

FAST = TuneConfig(epochs=1, max_lr=0.05, data=DataConfig(batch_size=64))


@pytest.fixture
def children_dir(tmp_path, digits_parent):
    return str(split_to_directory(digits_parent, tmp_path / "children", SplitConfig(children=3)).path)


class LRTrace(Callback):
    """The LR each optimizer step used: the initial one, then the one set after each step."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_fit_start(self, state):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def on_step_end(self, state):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def on_fit_end(self, state):
        self.lrs.pop()  # set after the last step, never used


def test_one_cycle_trace_equals_formula_during_tuning(digits):
    torch.manual_seed(0)
    child = split(create_model("lenet-s", in_channels=1), 2)[0]
    trace = LRTrace()
    config = TuneConfig(epochs=5, max_lr=0.1, data=DataConfig(batch_size=64))
    tune([child], digits, config, callbacks=lambda i: [trace])
    total = len(trace.lrs)
    assert total == 5 * len(digits.loader("train", batch_size=64))
    assert trace.lrs == pytest.approx([one_cycle_lr(i, total, 0.1) for i in range(total)], rel=1e-6)
    assert trace.lrs[0] == pytest.approx(0.1 / 100)  # warm-up starts at max_lr / 100
    assert max(trace.lrs) == pytest.approx(0.1, rel=1e-3)
    assert abs(trace.lrs.index(max(trace.lrs)) - 0.1 * total) <= 1.5  # peak at 10% of the steps
    assert trace.lrs[-1] == pytest.approx(1e-7, rel=1e-2)  # annealed to ~1e-7


def test_pruned_weights_stay_exactly_zero_after_tuning(digits):
    torch.manual_seed(0)
    children = split(create_model("lenet-s", in_channels=1), 2, method="anti-random", sparsity=0.5)
    tune(children, digits, TuneConfig(epochs=2, max_lr=0.1, weight_decay=5e-4, data=DataConfig(batch_size=64)))
    for child in children:
        params = dict(child.named_parameters())
        assert child.pat_child.masks
        for name, mask in child.pat_child.masks.items():
            assert torch.count_nonzero(params[name][~mask]) == 0, name
            assert torch.count_nonzero(params[name][mask]) > 0.9 * mask.sum()


def test_bagging_gives_each_child_its_subset(digits):
    torch.manual_seed(0)
    children = split(create_model("lenet-s", in_channels=1), 2)
    tune(children, digits, TuneConfig(epochs=1, bagging=0.9, data=DataConfig(batch_size=64)))
    n = len(digits.train.y)
    assert [c.pat_child.metrics["train_samples"] for c in children] == [round(0.9 * n)] * 2


def test_directory_tuning_saves_each_child_and_resume_skips_finished(children_dir, digits):
    finished = []
    tune_directory(children_dir, digits, FAST, on_done=lambda r: finished.append(r["name"]))
    assert finished == ["child-0", "child-1", "child-2"]
    ens = EnsembleDir.load(children_dir)
    assert [m["status"] for m in ens.members] == ["tuned"] * 3
    assert all("test_acc" in m["metrics"] for m in ens.members)
    stamps = [ens.member_path(m).stat().st_mtime_ns for m in ens.members]
    again = []
    tune_directory(children_dir, digits, FAST, on_done=lambda r: again.append(r["name"]))
    assert again == []
    assert stamps == [ens.member_path(m).stat().st_mtime_ns for m in ens.members]
    child = load_child(ens.member_path("child-0"))  # masks still consistent with the weights
    assert load_checkpoint(ens.member_path("child-0"))["status"] == "tuned" and child.pat_child.masks


def test_interrupted_child_restarts_and_finished_children_are_kept(children_dir, digits):
    class Interrupt(Callback):
        def on_step_end(self, state):
            raise KeyboardInterrupt

    callbacks = lambda name: [Interrupt()] if name == "child-1" else []  # noqa: E731
    split_weights = load_checkpoint(f"{children_dir}/child-1.pt")["state_dict"]
    with pytest.raises(KeyboardInterrupt):
        tune_directory(children_dir, digits, FAST, callbacks=callbacks)
    ens = EnsembleDir.load(children_dir)
    assert [m["status"] for m in ens.members] == ["tuned", "split", "split"]
    after = load_checkpoint(f"{children_dir}/child-1.pt")["state_dict"]
    assert all(torch.equal(split_weights[k], after[k]) for k in after)  # untouched by the interrupted run
    done = []
    tune_directory(children_dir, digits, FAST, on_done=lambda r: done.append(r["name"]))
    assert done == ["child-1", "child-2"]


def test_child_interrupted_after_an_epoch_resumes_from_it_and_ends_as_if_never_stopped(tmp_path, digits_parent,
                                                                                     digits):
    config = TuneConfig(epochs=2, max_lr=0.05, data=DataConfig(batch_size=64))
    whole, cut = (str(split_to_directory(digits_parent, tmp_path / n, SplitConfig(children=2)).path)
                  for n in ("whole", "cut"))
    tune_directory(whole, digits, config)

    class StopAfterFirstEpoch(Callback):
        def on_epoch_end(self, state):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_directory(cut, digits, config, callbacks=lambda n: [StopAfterFirstEpoch()] if n == "child-1" else [])
    assert load_checkpoint(f"{cut}/.work/child-1.partial.pt")["epoch"] == 1
    starts = []

    class FirstStep(Callback):
        def on_fit_start(self, state):
            starts.append(state.step)

    tune_directory(cut, digits, config, callbacks=lambda n: [FirstStep()])
    steps_per_epoch = load_checkpoint(f"{whole}/child-1.pt")["cost"]["steps"] // 2
    assert starts == [steps_per_epoch]  # child-1 alone, from its second epoch
    for name in ("child-0", "child-1"):
        a, b = load_checkpoint(f"{whole}/{name}.pt"), load_checkpoint(f"{cut}/{name}.pt")
        assert max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]) < 1e-6
        assert a["cost"]["steps"] == b["cost"]["steps"] and a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
    assert not Path(cut, ".work").exists()


def test_child_whose_weights_break_its_mask_is_refused(children_dir, digits):
    path = f"{children_dir}/child-0.pt"
    ckpt = load_checkpoint(path)
    name = next(iter(ckpt["masks"]))
    ckpt["state_dict"][name][~ckpt["masks"][name]] = 1.0
    torch.save(ckpt, path)
    with pytest.raises(PatError, match="child-0.*sha256"):  # the manifest's record of the file
        tune_directory(children_dir, digits, FAST)
    manifest = Path(children_dir) / "ensemble.json"
    old = json.loads(manifest.read_text())
    for m in old["members"]:  # as written before pat recorded sizes and hashes
        m.pop("size"), m.pop("sha256")
    manifest.write_text(json.dumps(old))
    with pytest.raises(PatError, match=name.replace(".", r"\.")):  # then the masks still catch it
        tune_directory(children_dir, digits, FAST)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be positive. Got 0."),
        ({"max_lr": -0.1}, "max_lr must be positive. Got -0.1."),
        ({"lr": 0.0}, "lr must be positive. Got 0.0."),
        ({"bagging": 1.5}, r"bagging must be in \(0, 1\]. Got 1.5."),
        ({"bagging": 0.0}, r"bagging must be in \(0, 1\]. Got 0.0."),
        ({"schedule": "step"}, "schedule must be 'one-cycle' or 'constant'. Got 'step'."),
    ],
)
def test_bad_tune_config(kwargs, message):
    with pytest.raises(PatError, match=message):
        TuneConfig(**kwargs)


def test_tune_refuses_what_is_not_models_data_or_a_config_in_one_line(digits):
    kids = split(create_model("lenet-s", num_classes=10, in_channels=1), 2)
    before = [{k: v.clone() for k, v in kid.state_dict().items()} for kid in kids]
    with pytest.raises(PatError, match=r"children must be a list of models .* `pat tune DIR`. Got 'children/'."):
        tune("children/", digits, FAST)
    with pytest.raises(PatError, match="children must be a list of models"):
        tune(["child-0.pt"], digits, FAST)
    with pytest.raises(PatError, match=r"data must be a pat Dataset .* Got str; pat.load_dataset\('digits'\)"):
        tune(kids, "digits", FAST)
    with pytest.raises(PatError, match="data must be a pat Dataset or training batches of \\(x, y\\). Got int."):
        tune(kids, 3, FAST)
    with pytest.raises(PatError, match="config must be a pat.TuneConfig. Got dict."):
        tune(kids, digits, {"epochs": 1})
    for kid, state in zip(kids, before, strict=True):  # refused before any step
        assert all(torch.equal(v, state[k]) for k, v in kid.state_dict().items())


def test_missing_directory_and_bad_manifest(tmp_path, digits, children_dir):
    with pytest.raises(PatError, match="is not a directory"):
        tune_directory(str(tmp_path / "nope"), digits, FAST)
    broken = tmp_path / "broken"
    shutil.copytree(children_dir, broken)
    (broken / "ensemble.json").write_text('{"format_version": 1, "members": "x"}')
    with pytest.raises(PatError, match="'members' must be a list"):
        tune_directory(str(broken), digits, FAST)


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_batchnorm_statistics_are_the_tuned_childs_own(digits, recompute, together):
    """After tuning, a child's running statistics are recomputed for the weights it ended with
    (one pass over its bagged, unaugmented data), not the momentum mix the run left."""
    torch.manual_seed(0)
    parent = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    parent[1].running_mean.fill_(5.0)  # the parent's statistics, wrong for any child
    children = split(parent, 2, sparsity=0.5)
    config = TuneConfig(epochs=1, max_lr=0.05, bagging=0.5, recompute_bn=recompute, together=together,
                        data=DataConfig(batch_size=64))
    tune(children, digits, config)
    for i, child in enumerate(children):
        mean = child[1].running_mean
        if not recompute:
            assert "bn_samples" not in child.pat_child.cost
            assert not torch.allclose(mean, torch.full((8,), 5.0), atol=0.1)  # as the run's momentum left it
            continue
        # the tuned conv's output means over the child's own unaugmented training batches, averaged
        indices = bagging_indices(len(digits.train), 0.5, seed=config.seed, member=i)
        with torch.no_grad():
            means = [child[0](x).mean(dim=(0, 2, 3)) for x, _ in
                     digits.loader("train", batch_size=64, augment=False, shuffle=False, indices=indices)]
        assert torch.allclose(mean, torch.stack(means).mean(0), atol=1e-4)
        assert child.pat_child.cost["bn_samples"] == len(indices)
        assert "together" in child.pat_child.cost if together else "together" not in child.pat_child.cost


def test_unset_peak_lr_is_a_share_of_the_parents_lr(children_dir, digits):
    # digits_parent trained at lr 0.05: the children peak at 0.2 x 0.05 unless told otherwise
    trace = LRTrace()
    config = TuneConfig(epochs=1, data=DataConfig(batch_size=64))
    tune_directory(children_dir, digits, config, callbacks=lambda name: [trace] if name == "child-0" else [])
    assert max(trace.lrs) == pytest.approx(0.01, rel=2e-2)  # 21 steps: the peak falls between two
    records = EnsembleDir.load(children_dir).members
    assert [r["tune"]["max_lr"] for r in records] == [pytest.approx(0.01)] * len(records)
    # an explicit peak wins; without a known parent the share applies to pat's default parent LR
    assert tune_max_lr(TuneConfig(max_lr=0.3)) == 0.3
    assert tune_max_lr(TuneConfig(), parent_lr=None) == pytest.approx(0.2 * 0.1)
    assert tune_max_lr(TuneConfig(max_lr_share=0.5), parent_lr=1e-3) == pytest.approx(5e-4)


def tune_max_lr(config, parent_lr=None):
    from pat.tuner import resolve_max_lr

    return resolve_max_lr(config, parent_lr).max_lr
