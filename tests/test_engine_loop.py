from __future__ import annotations

import pytest
import torch
from torch import nn

from pat.engine.callbacks import Callback
from pat.engine.loop import evaluate, fit
from pat.engine.optim import create_optimizer
from pat.engine.schedules import create_schedule
from pat.errors import PatError
from tests.conftest import batches


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_fit_lowers_loss_and_reports_every_epoch(blobs):
    x, y = blobs
    model = mlp()
    data = batches(x, y)
    before = evaluate(model, data)["loss"]
    opt = create_optimizer(model, lr=0.05)
    state = fit(model, data, epochs=5, optimizer=opt, eval_data={"val": data})
    after = evaluate(model, data)["loss"]
    assert after < 0.5 * before
    assert [m["epoch"] for m in state.history] == [1, 2, 3, 4, 5]
    assert state.step == 5 * len(data)
    assert state.history[-1]["val_acc"] > 0.9


def test_callbacks_see_every_step_and_epoch(blobs):
    x, y = blobs
    seen = {"steps": 0, "epochs": 0, "start": 0, "end": 0}

    class Count(Callback):
        def on_fit_start(self, state): seen["start"] += 1
        def on_step_end(self, state): seen["steps"] += 1
        def on_epoch_end(self, state): seen["epochs"] += 1
        def on_fit_end(self, state): seen["end"] += 1

    data = batches(x, y)
    model = mlp()
    fit(model, data, epochs=3, optimizer=create_optimizer(model), callbacks=[Count()])
    assert seen == {"steps": 3 * len(data), "epochs": 3, "start": 1, "end": 1}


def test_scheduler_is_stepped_per_batch(blobs):
    x, y = blobs
    data = batches(x, y)
    model = mlp()
    opt = create_optimizer(model, lr=0.1)
    sched = create_schedule("parent", opt, total_steps=4 * len(data))
    lrs = []

    class Trace(Callback):
        def on_step_end(self, state): lrs.append(state.optimizer.param_groups[0]["lr"])

    fit(model, data, epochs=4, optimizer=opt, scheduler=sched, callbacks=[Trace()])
    assert len(lrs) == 12
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.001)


def test_resume_continues_from_last_finished_epoch(tmp_path, blobs):
    x, y = blobs
    data = batches(x, y)

    def run(epochs, stop_after=None):
        model = mlp()
        opt = create_optimizer(model, lr=0.05)
        sched = create_schedule("parent", opt, total_steps=epochs * len(data))

        class Stop(Callback):
            def on_epoch_end(self, state):
                if stop_after is not None and state.epoch + 1 == stop_after:
                    raise KeyboardInterrupt

        try:
            fit(model, data, epochs=epochs, optimizer=opt, scheduler=sched,
                resume_path=tmp_path / "state.partial", callbacks=[Stop()])
        except KeyboardInterrupt:
            return None
        return model

    straight = mlp()
    opt = create_optimizer(straight, lr=0.05)
    fit(straight, data, epochs=4, optimizer=opt,
        scheduler=create_schedule("parent", opt, total_steps=4 * len(data)))
    assert run(4, stop_after=2) is None  # interrupted after epoch 2; state saved for epoch 2
    resumed = run(4)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_bad_epochs_rejected(blobs):
    model = mlp()
    with pytest.raises(PatError, match="epochs must be positive. Got 0"):
        fit(model, batches(*blobs), epochs=0, optimizer=create_optimizer(model))
