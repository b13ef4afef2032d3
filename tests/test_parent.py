from __future__ import annotations

import pytest

from pat.config import DataConfig, TrainConfig
from pat.engine.callbacks import Callback
from pat.engine.checkpoint import load_checkpoint
from pat.parent import resume_path_for, train_parent

# Digits is ~1.3k images: batch 64 gives 21 steps an epoch (see docs/decisions.md)
CONFIG = TrainConfig(model="lenet-s", epochs=10, lr=0.05, data=DataConfig(dataset="digits", batch_size=64))


@pytest.mark.slow
def test_lenet_s_digits_parent_reaches_90_percent_in_10_epochs(digits, tmp_path):
    result = train_parent(CONFIG, data=digits, out=tmp_path / "parent.pt")
    assert result.metrics["test_acc"] >= 0.90
    assert len(result.history) == 10
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    saved = load_checkpoint(tmp_path / "parent.pt")
    assert saved["metrics"] == result.metrics and saved["dataset"] == "digits"


def test_interrupted_training_resumes_from_last_finished_epoch(digits, tmp_path):
    config = TrainConfig(model="lenet-s", epochs=3, lr=0.05, data=DataConfig(batch_size=256))
    out = tmp_path / "parent.pt"

    class StopAfterTwo(Callback):
        def on_epoch_end(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_parent(config, data=digits, out=out, callbacks=[StopAfterTwo()])
    partial = resume_path_for(out)
    assert not out.exists() and load_checkpoint(partial)["epoch"] == 2

    epochs_run = []

    class Count(Callback):
        def on_epoch_start(self, state):
            epochs_run.append(state.epoch)

    result = train_parent(config, data=digits, out=out, callbacks=[Count()])
    assert epochs_run == [2]  # only the third epoch was trained again
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert out.exists() and not partial.exists()
