"""CollapseGuard: a parent whose last epoch collapsed is handed over at its best epoch instead."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from cli_helpers import run

from pat.config import DataConfig, TrainConfig
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint
from pat.engine.guard import collapsed
from pat.parent import resume_path_for, train_parent

CONFIG = TrainConfig(model="lenet-s", epochs=4, lr=0.05, data=DataConfig(batch_size=64))


class Sabotage(Callback):
    """Zero every weight before epoch ``at``: the network then predicts one class for good."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_start(self, state):
        if state.epoch == self.at:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.zero_()


class Snapshots(Callback):
    """The weights at the end of every epoch, by epoch number (1-based)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, state):
        self.states[state.epoch + 1] = {k: v.clone() for k, v in state.model.state_dict().items()}


class StopAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state):
        if state.epoch == self.epoch:
            raise KeyboardInterrupt


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("last", "best", "classes", "expected"), [
    ({"val_loss": 2.30, "val_acc": 0.10}, {"val_acc": 0.80}, 10, True),  # fell to chance
    ({"val_loss": 0.60, "val_acc": 0.78}, {"val_acc": 0.81}, 10, False),  # a constant LR's noise
    ({"val_loss": 1.40, "val_acc": 0.50}, {"val_acc": 0.80}, 10, False),  # a bad epoch, not a collapse
    ({"val_loss": 1.90, "val_acc": 0.40}, {"val_acc": 0.90}, 10, True),  # gave back more than half
    ({"val_loss": math.nan, "val_acc": 0.75}, {"val_acc": 0.80}, 10, True),  # diverged
    ({"val_loss": 0.69, "val_acc": 0.60}, {"val_acc": 0.95}, 2, True),  # two classes: 0.5 is chance
])
def test_collapse_is_losing_more_than_half_the_gain_over_chance(last, best, classes, expected):
    assert collapsed(last, best, classes) is expected


def test_a_collapsed_parent_is_saved_at_its_best_epoch(digits, tmp_path):
    out, snaps = tmp_path / "parent.pt", Snapshots()
    result = train_parent(CONFIG, data=digits, out=out, callbacks=[Sabotage(2), snaps])
    val = [h["val_acc"] for h in result.history]
    assert max(val[:2]) > 0.5 and max(val[2:]) < 0.25  # learnt, then collapsed for good
    best = min((1, 2), key=lambda e: result.history[e - 1]["val_loss"])
    assert result.restored["epoch"] == best and result.restored["last"]["epoch"] == 4
    assert same(result.model.state_dict(), snaps.states[best])
    assert result.metrics["val_acc"] == pytest.approx(result.restored["val_acc"])  # the metrics are the kept epoch's
    saved = load_checkpoint(out)
    assert saved["restored"]["epoch"] == best and len(saved["history"]) == 4  # the history stays whole
    assert same(saved["state_dict"], snaps.states[best])
    info = run("info", out)
    assert info.exit_code == 0 and f"{best} of 4" in info.output
    # what `pat run` and `pat tune` warn with: the ensemble's check reads the parent's record
    from pat.comparison import parent_check
    from pat.config import SplitConfig
    from pat.splitting import split_to_directory

    split_to_directory(out, tmp_path / "children", SplitConfig(children=2))
    assert parent_check(tmp_path / "children", digits)["parent_restored"] == saved["restored"]


def test_a_run_that_did_not_collapse_ends_at_its_last_epoch(digits, tmp_path):
    snaps = Snapshots()
    result = train_parent(CONFIG, data=digits, out=tmp_path / "parent.pt", callbacks=[snaps])
    assert result.restored is None and "restored" not in load_checkpoint(tmp_path / "parent.pt")
    assert same(result.model.state_dict(), snaps.states[4])


class StaleStatistics(Callback):
    """After the last step, BatchNorm running statistics that no longer fit the weights (as a
    high constant LR leaves them): eval mode then scores near chance, the weights are fine."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, state):
        if state.step == self.steps:
            with torch.no_grad():
                for m in state.model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.add_(5.0)


# saved with the statistics it trained with (not recomputed at the end, decision 73): what a
# parent from elsewhere, or from before that decision, brings
BN_CONFIG = TrainConfig(model="resnet8", epochs=3, lr=0.05, data=DataConfig(batch_size=64), recompute_bn=False)


def test_stale_batchnorm_statistics_are_not_taken_for_a_collapse(digits, tmp_path):
    """A BatchNorm model whose last epoch looks collapsed only through its running statistics
    is judged again with them recomputed (on a copy) and keeps its last epoch, untouched."""
    snaps = Snapshots()
    steps = 3 * math.ceil(len(digits.train.y) / 64)
    result = train_parent(BN_CONFIG, data=digits, callbacks=[StaleStatistics(steps), snaps])
    val = [h["val_acc"] for h in result.history]
    assert max(val[:2]) > 0.3 and val[2] < 0.2  # it looks collapsed in eval mode ...
    assert result.restored is None  # ... but was not
    assert same(result.model.state_dict(), snaps.states[3])  # the last epoch, statistics as they were


def test_a_batchnorm_parent_is_compared_with_its_statistics_recomputed(digits, tmp_path):
    """The ensemble-vs-parent check and the run's parent and one-model rows judge a BatchNorm
    model by its weights: statistics recomputed on the unaugmented training split (as each
    child's are), not the averages it was saved with. The file keeps what it was saved with."""
    from torch.optim.swa_utils import update_bn

    from pat.comparison import evaluate_run, parent_check
    from pat.config import SplitConfig, TuneConfig
    from pat.engine.checkpoint import load_model
    from pat.ensemble.metrics import classification_metrics
    from pat.ensemble.predict import collect_probs
    from pat.splitting import split_to_directory
    from pat.tuner import tune_directory

    parent = tmp_path / "parent.pt"
    steps = 3 * math.ceil(len(digits.train.y) / 64)
    train_parent(BN_CONFIG, data=digits, callbacks=[StaleStatistics(steps)], out=parent)
    saved = load_checkpoint(parent)
    kids = tmp_path / "children"
    split_to_directory(parent, kids, SplitConfig(children=2))
    tune_directory(str(kids), digits, TuneConfig(epochs=1, max_lr=0.05, data=DataConfig(batch_size=128)))

    def scored(model, split):
        probs, labels = collect_probs([model], digits.loader(split, batch_size=512))
        return classification_metrics(probs[0], labels)

    stale = load_model(parent)[0]
    fresh = load_model(parent)[0]
    update_bn(digits.loader("train", batch_size=256, augment=False, shuffle=False), fresh)
    assert scored(stale, "val")["accuracy"] < 0.2 < 0.5 < scored(fresh, "val")["accuracy"]
    check = parent_check(kids, digits)
    assert check["parent"]["accuracy"] == pytest.approx(scored(fresh, "val")["accuracy"])
    assert check["parent"]["nll"] == pytest.approx(scored(fresh, "val")["nll"], rel=1e-4)
    assert not check["parent_at_chance"]
    # the one model of the budget is held to the same treatment (decision 72): here the same file
    rows, _ = evaluate_run(kids, digits, parent_path=parent, device="cpu", baseline=("one model", parent))
    assert rows[0]["name"] == "parent" and rows[-1]["name"] == "one model"
    for row in (rows[0], rows[-1]):
        assert row["nll"] == pytest.approx(scored(fresh, "test")["nll"], rel=1e-4)
    assert same(load_checkpoint(parent)["state_dict"], saved["state_dict"])  # the file is left as saved


def test_a_batchnorm_model_that_really_collapsed_is_still_restored(digits):
    snaps = Snapshots()
    result = train_parent(BN_CONFIG, data=digits, callbacks=[Sabotage(2), snaps])
    assert max(h["val_acc"] for h in result.history[:2]) > 0.3
    assert result.restored is not None and result.restored["last"]["epoch"] == 3
    assert same(result.model.state_dict(), snaps.states[result.restored["epoch"]])


@pytest.mark.parametrize("stop", [1, 2])  # at the best epoch (the guard has not seen it yet), after the collapse
def test_a_resumed_run_keeps_the_same_epoch_as_an_uninterrupted_one(digits, tmp_path, stop):
    straight = train_parent(CONFIG, data=digits, callbacks=[Sabotage(2)])
    out = tmp_path / "parent.pt"
    with pytest.raises(KeyboardInterrupt):
        train_parent(CONFIG, data=digits, out=out, callbacks=[Sabotage(2), StopAt(stop)])
    assert "CollapseGuard" in load_checkpoint(resume_path_for(out))["callbacks"]
    resumed = train_parent(CONFIG, data=digits, out=out, callbacks=[Sabotage(2)])
    assert resumed.restored == straight.restored and resumed.restored is not None
    assert same(resumed.model.state_dict(), straight.model.state_dict())


def test_without_a_validation_split_there_is_nothing_to_guard(tmp_path):
    from pat.data import load_dataset

    data = load_dataset("digits", val_fraction=0.0)
    result = train_parent(CONFIG, data=data, callbacks=[Sabotage(2)])
    assert result.restored is None  # the last epoch stands: no validation to choose another by


def test_a_child_whose_tuning_collapsed_keeps_its_best_epoch(digits, digits_parent, tmp_path):
    """The same guard watches each child's tuning: a child that fell to chance is handed back its
    best epoch (masked weights still zero), the others end at their last, and pat run / pat tune
    warn through the validation check."""
    from pat.children import load_child
    from pat.cli.children import _validation_line
    from pat.cli.render import console
    from pat.comparison import parent_check
    from pat.config import SplitConfig, TuneConfig
    from pat.records import masks_of
    from pat.splitting import split_to_directory
    from pat.tuner import tune_directory

    kids = tmp_path / "children"
    split_to_directory(digits_parent, kids, SplitConfig(children=2))
    snaps = Snapshots()
    config = TuneConfig(epochs=2, max_lr=0.05, data=DataConfig(batch_size=128))
    tune_directory(str(kids), digits, config,
                   callbacks=lambda name: [Sabotage(1), snaps] if name == "child-0" else [])
    check = parent_check(kids, digits)
    assert set(check["children_restored"]) == {"child-0"}
    restored = check["children_restored"]["child-0"]
    assert restored["epoch"] == 1 and restored["last"]["epoch"] == 2 and restored["last"]["val_acc"] < 0.25
    child = load_child(kids / "child-0.pt")
    assert same(child.state_dict(), snaps.states[1])
    masks, params = masks_of(child), dict(child.named_parameters())
    assert masks and all(int(params[n][~m].count_nonzero()) == 0 for n, m in masks.items())
    assert "restored" not in load_checkpoint(kids / "child-1.pt")["metrics"]
    with console.capture() as captured:
        _validation_line(check)
    assert "warning: child-0 collapsed" in captured.get() and "child-1" not in captured.get()


def test_a_child_whose_tuning_diverged_from_the_start_gets_back_the_child_as_split(digits, digits_parent,
                                                                                    tmp_path):
    """A child at chance from its first tuned epoch on (a peak LR too high for it diverges
    this way: LeNet-S on digits, one child in six at seed 1 of `pat demo`'s config) is handed
    back the state it started from, not the least bad of its collapsed epochs."""
    from pat.children import load_child
    from pat.comparison import parent_check
    from pat.config import SplitConfig, TuneConfig
    from pat.engine.guard import describe_restored
    from pat.records import masks_of
    from pat.splitting import split_to_directory
    from pat.tuner import tune_directory

    kids = tmp_path / "children"
    split_to_directory(digits_parent, kids, SplitConfig(children=2))
    as_split = load_child(kids / "child-0.pt").state_dict()
    config = TuneConfig(epochs=2, max_lr=0.05, data=DataConfig(batch_size=128))
    tune_directory(str(kids), digits, config, callbacks=lambda name: [Sabotage(0)] if name == "child-0" else [])
    check = parent_check(kids, digits)
    restored = check["children_restored"]["child-0"]
    assert restored["epoch"] == 0 and restored["val_acc"] > 0.3 and restored["last"]["val_acc"] < 0.2
    child = load_child(kids / "child-0.pt")
    assert same(child.state_dict(), as_split)  # LeNet-S: no BatchNorm statistics to recompute
    masks, params = masks_of(child), dict(child.named_parameters())
    assert masks and all(int(params[n][~m].count_nonzero()) == 0 for n, m in masks.items())
    assert "starting state (epoch 0) was kept" in describe_restored(restored, "child-0")
    assert "restored" not in load_checkpoint(kids / "child-1.pt")["metrics"]


class SabotageMember(Callback):
    """Zero child ``member``'s weights inside a grouped (together) network before epoch ``at``."""

    def __init__(self, at: int, member: int) -> None:
        self.at, self.member = at, member
        self.states: dict[int, dict[str, torch.Tensor]] = {}  # each epoch's end, the member's weights

    def on_epoch_start(self, state):
        from pat.pack import child_state

        if state.epoch == self.at:
            with torch.no_grad():
                for v in child_state(state.model.packed, self.member).values():
                    if v.is_floating_point():
                        v.zero_()

    def on_epoch_end(self, state):
        from pat.pack import child_state

        self.states[state.epoch + 1] = {k: v.clone() for k, v in child_state(state.model.packed, self.member).items()}


def test_children_tuned_together_each_keep_their_best_epoch(digits, digits_parent, tmp_path):
    """Tuned together, each child has its own guard on its own validation metrics: the child
    that fell to chance is handed back its best epoch, masked; its sibling ends at its last."""
    from pat.children import load_child
    from pat.comparison import parent_check
    from pat.config import SplitConfig, TuneConfig
    from pat.records import masks_of
    from pat.splitting import split_to_directory
    from pat.tuner import tune_directory

    kids, untouched = tmp_path / "children", tmp_path / "untouched"
    for out in (kids, untouched):
        split_to_directory(digits_parent, out, SplitConfig(children=2))
    sabotage = SabotageMember(1, member=0)
    config = TuneConfig(epochs=2, max_lr=0.05, together=True, data=DataConfig(batch_size=128))
    tune_directory(str(kids), digits, config, callbacks=lambda name: [sabotage])
    tune_directory(str(untouched), digits, config)
    assert "together" in load_checkpoint(kids / "child-0.pt")["cost"]  # one grouped fit, not a fallback
    check = parent_check(kids, digits)
    assert set(check["children_restored"]) == {"child-0"}
    restored = check["children_restored"]["child-0"]
    assert restored["epoch"] == 1 and restored["last"]["epoch"] == 2 and restored["last"]["val_acc"] < 0.25
    child = load_child(kids / "child-0.pt")
    assert same(child.state_dict(), sabotage.states[1])
    masks, params = masks_of(child), dict(child.named_parameters())
    assert masks and all(int(params[n][~m].count_nonzero()) == 0 for n, m in masks.items())
    # the sibling ends where it would have without the collapse beside it
    assert "restored" not in load_checkpoint(kids / "child-1.pt")["metrics"]
    assert same(load_child(kids / "child-1.pt").state_dict(), load_child(untouched / "child-1.pt").state_dict())
    assert not same(child.state_dict(), load_child(untouched / "child-0.pt").state_dict())


def test_children_tuned_together_whose_one_diverged_from_the_start_gets_back_the_child_as_split(
        digits, digits_parent, tmp_path):
    """Together as one by one: a child at chance from its first epoch is handed back its state
    as split (epoch 0), masked, and its sibling ends where it ends without the sabotage."""
    from pat.children import load_child
    from pat.comparison import parent_check
    from pat.config import SplitConfig, TuneConfig
    from pat.records import masks_of
    from pat.splitting import split_to_directory
    from pat.tuner import tune_directory

    kids, untouched = tmp_path / "children", tmp_path / "untouched"
    for out in (kids, untouched):
        split_to_directory(digits_parent, out, SplitConfig(children=2))
    as_split = load_child(kids / "child-0.pt").state_dict()
    config = TuneConfig(epochs=2, max_lr=0.05, together=True, data=DataConfig(batch_size=128))
    tune_directory(str(kids), digits, config, callbacks=lambda name: [SabotageMember(0, member=0)])
    tune_directory(str(untouched), digits, config)
    assert "together" in load_checkpoint(kids / "child-0.pt")["cost"]  # one grouped fit, not a fallback
    restored = parent_check(kids, digits)["children_restored"]
    assert set(restored) == {"child-0"}
    assert restored["child-0"]["epoch"] == 0 and restored["child-0"]["last"]["val_acc"] < 0.25
    child = load_child(kids / "child-0.pt")
    assert same(child.state_dict(), as_split)
    masks, params = masks_of(child), dict(child.named_parameters())
    assert masks and all(int(params[n][~m].count_nonzero()) == 0 for n, m in masks.items())
    assert same(load_child(kids / "child-1.pt").state_dict(), load_child(untouched / "child-1.pt").state_dict())


class History(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_epoch_end(self, state):
        self.rows.append(dict(state.metrics))


@pytest.mark.slow
def test_children_tuned_together_are_rechecked_with_fresh_batchnorm_statistics(digits):
    """Stale running statistics in the grouped network make every child look collapsed; the
    children's shared recheck clears them and each keeps its last epoch."""
    import pat
    from pat.config import TuneConfig
    from pat.tuner import tune

    parent = train_parent(dataclasses.replace(BN_CONFIG, epochs=6), data=digits).model
    children = pat.split(parent, 2, method="random", sparsity=0.2)
    steps = 3 * math.ceil(len(digits.train.y) / 64)
    history = History()
    config = TuneConfig(epochs=3, max_lr=0.01, together=True, data=DataConfig(batch_size=64))
    tune(children, digits, config, callbacks=lambda i: [StaleStatistics(steps), history])
    for i, child in enumerate(children):
        val = [row[f"val_acc/{i}"] for row in history.rows]
        assert max(val[:2]) > 0.5 and val[2] < 0.2  # looked collapsed in eval mode
        assert "restored" not in child.pat_child.metrics and "together" in child.pat_child.cost
