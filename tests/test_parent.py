from __future__ import annotations

import dataclasses

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


def test_a_batchnorm_model_is_saved_with_statistics_recomputed_and_the_pass_charged(digits, tmp_path):
    """``pat train`` ends a BatchNorm model with its statistics recomputed on the unaugmented
    training split (decision 73): what is saved is what its weights give, whatever the running
    averages had drifted to, and the forward pass is in its cost."""
    import torch
    from torch.optim.swa_utils import update_bn

    from pat.engine.batchnorm import statistics_loader
    from pat.engine.checkpoint import load_model

    class Drift(Callback):  # running means pushed off at the last step, as a high LR leaves them
        def on_fit_end(self, state):
            with torch.no_grad():
                for m in state.model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.add_(5.0)

    config = TrainConfig(model="resnet8", epochs=1, lr=0.05, data=DataConfig(batch_size=128))
    saved = {}
    for recompute in (True, False):
        out = tmp_path / f"{recompute}.pt"
        train_parent(dataclasses.replace(config, recompute_bn=recompute), data=digits,
                     callbacks=[Drift()], out=out)
        saved[recompute] = (load_model(out)[0], load_checkpoint(out))
    model, ckpt = saved[True]
    fresh = load_model(tmp_path / "True.pt")[0]
    update_bn(statistics_loader(digits, "cpu"), fresh)
    for a, b in zip(model.buffers(), fresh.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    kept, kept_ckpt = saved[False]
    assert not torch.allclose(next(b for n, b in kept.named_buffers() if n.endswith("running_mean")),
                              next(b for n, b in fresh.named_buffers() if n.endswith("running_mean")))
    assert ckpt["metrics"]["val_acc"] > kept_ckpt["metrics"]["val_acc"]  # judged on what it is
    forward = ckpt["cost"]["forward_flops_per_sample"]
    assert ckpt["cost"]["bn_samples"] == len(digits.train.y) and "bn_samples" not in kept_ckpt["cost"]
    assert ckpt["cost"]["flops"] - kept_ckpt["cost"]["flops"] == forward * len(digits.train.y)
