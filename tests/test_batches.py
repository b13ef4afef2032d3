"""pat.tune and the producers' in-memory API on batches someone else makes (a torch DataLoader)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pat
from pat.config import DataConfig, TuneConfig
from pat.data import BatchData
from pat.errors import PatError


@pytest.fixture(scope="module")
def loaders(digits):
    """digits as a plain PyTorch user would have it: normalised float tensors in DataLoaders."""
    def tensors(split):
        x, y = next(iter(digits.loader(split, batch_size=10_000, shuffle=False, augment=False)))
        return TensorDataset(x, y)

    train = DataLoader(tensors("train"), batch_size=64, shuffle=True)
    return train, DataLoader(tensors("val"), batch_size=256), DataLoader(tensors("test"), batch_size=256)


def tuned(loaders):
    train, val, test = loaders
    torch.manual_seed(0)
    parent = pat.create_model("lenet-s", in_channels=1)
    children = pat.split(parent, 3, method="anti-random", sparsity=0.5)
    pat.tune(children, train, TuneConfig(epochs=2, max_lr=0.05, device="cpu"), val=val, test=test)
    return children


def test_children_tune_on_a_dataloader_each_in_its_own_reproducible_order(loaders, digits):
    train, val, test = loaders
    data = BatchData(train, val, test)
    orders = [[y[:8].tolist() for _, y in data.loader("train", seed=s)][:2] for s in (5, 6, 5)]
    assert orders[0] == orders[2] and orders[0] != orders[1]  # seeded per member: distinct, repeatable
    state = torch.get_rng_state()
    list(data.loader("train", seed=5))
    assert torch.equal(state, torch.get_rng_state())  # the global stream outside is untouched
    a, b = tuned(loaders), tuned(loaders)
    for child, again in zip(a, b, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(child.parameters(), again.parameters(), strict=True))
        record = child.pat_child
        assert record.metrics["val_acc"] > 0.8 and record.metrics["test_acc"] > 0.8
        assert record.metrics["train_samples"] == len(digits.train)
        for name, p in child.named_parameters():  # pruned weights stayed exactly zero
            if name in record.masks:
                assert not p[~record.masks[name]].any()


def test_what_cannot_be_done_to_batches_is_refused_in_one_line(loaders, digits):
    train, val, _ = loaders
    child = pat.split(pat.create_model("lenet-s", in_channels=1), 2)[0]
    with pytest.raises(PatError, match="bagging draws a subset of samples per child"):
        pat.tune([child], train, TuneConfig(epochs=1, bagging=0.9, device="cpu"))
    with pytest.raises(PatError, match="have no length"):
        pat.tune([child], [b for b in train].__iter__(), TuneConfig(epochs=1, device="cpu"))
    with pytest.raises(PatError, match="val and test batches go with training batches"):
        pat.tune([child], digits, TuneConfig(epochs=1), val=val)
    with pytest.raises(PatError, match="SharpBalance scores every training sample by its index"):
        pat.sharpbalance_members(pat.SharpBalanceConfig(members=2, epochs=2, initial_epochs=1), data=BatchData(train))
    rgb = pat.create_model("lenet-s", in_channels=3)
    with pytest.raises(PatError, match=r"does not take 'batches' images of shape \(1, 32, 32\)"):
        pat.tune([rgb], train, TuneConfig(epochs=1, device="cpu"))


def test_a_pool_trains_on_dataloaders_with_its_classes_read_from_the_labels(loaders):
    train, val, test = loaders
    config = pat.PoolConfig(model="lenet-s", epochs=2, policies=("one-cycle",), lrs=(0.05,),
                            data=DataConfig(batch_size=64), device="cpu")
    [member] = pat.pool_members(config, data=BatchData(train, val, test))
    assert member.pat_member.metrics["val_acc"] > 0.3 and member(next(iter(test))[0][:2]).shape == (2, 10)
