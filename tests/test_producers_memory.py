"""The producers' in-memory API returns the members their directories hold, seed for seed."""

from __future__ import annotations

import pytest
import torch

import pat
from pat.config import DataConfig
from pat.engine.checkpoint import load_checkpoint
from pat.store import EnsembleDir

SYNTHETIC = DataConfig(dataset="synthetic", batch_size=32)


def configs(pretrained: str) -> dict[str, tuple]:
    return {
        "pool": (pat.PoolConfig(model="lenet-s", data=SYNTHETIC, epochs=1, policies=("multistep", "one-cycle"),
                                lrs=(0.05,), device="cpu"), pat.train_pool, pat.pool_members),
        "starsse": (pat.StarSSEConfig(pretrained=pretrained, data=SYNTHETIC, members=3, epochs=1, cycle_epochs=1,
                                      lr=0.02, device="cpu"), pat.train_starsse, pat.starsse_members),
        "sharpbalance": (pat.SharpBalanceConfig(model="lenet-s", data=SYNTHETIC, members=2, epochs=2,
                                                initial_epochs=1, lr=0.05, device="cpu"),
                         pat.train_sharpbalance, pat.sharpbalance_members),
    }


@pytest.mark.parametrize("producer", ["pool", "starsse", "sharpbalance"])
def test_in_memory_members_equal_the_directorys(tmp_path, tiny_data, pretrained, producer):
    config, to_directory, in_memory = configs(pretrained)[producer]
    members = in_memory(config, data=tiny_data)
    ens = EnsembleDir.load(to_directory(config, tmp_path / producer, data=tiny_data).path)
    assert [m.pat_member.name for m in members] == [r["name"] for r in ens.members]
    assert not list(tmp_path.glob("*.pt"))  # the in-memory run wrote nothing
    for model, record in zip(members, ens.members, strict=True):
        member = model.pat_member
        assert member.producer == producer and member.recipe == record["recipe"]
        assert member.parent == record["parent"] and member.cost["steps"] == record["cost"]["steps"]
        saved = load_checkpoint(ens.member_path(record))["state_dict"]
        assert all(torch.equal(v.cpu(), saved[k]) for k, v in model.state_dict().items()), record["name"]
        assert member.metrics == pytest.approx(record["metrics"], abs=1e-6)


def test_in_memory_star_members_each_start_from_member_one_not_from_each_other(tiny_data, pretrained):
    config = configs(pretrained)["starsse"][0]
    members = pat.starsse_members(config, data=tiny_data)
    assert [m.pat_member.parent for m in members] == ["pretrained", "member-1", "member-1"]
    assert len({id(m) for m in members}) == 3  # each its own module
    ensemble = pat.Ensemble(members)  # members are plain modules, ready for the ensemble tools
    x, _ = next(iter(tiny_data.loader("test", batch_size=4, device="cpu")))
    probs = ensemble.predict_proba(x)
    assert probs.shape == (4, 10) and torch.allclose(probs.sum(1), torch.ones(4))


@pytest.mark.parametrize("producer", ["pool", "starsse", "sharpbalance"])
@pytest.mark.parametrize("recompute", [True, False])
def test_every_producer_hands_over_batchnorm_members_with_statistics_of_the_plain_training_split(
        tmp_path, tiny_data, producer, recompute):
    """As pat's parent and children are: a member's BatchNorm statistics are those one pass over
    the unaugmented training split gives its final weights, and the pass is in its cost; with
    ``recompute_bn=False`` the running averages of training are kept and nothing is charged."""
    import copy
    import dataclasses

    from pat.engine.batchnorm import statistics_loader, with_fresh_statistics
    from pat.engine.checkpoint import save_model
    from pat.models import create_model

    torch.manual_seed(0)
    start = tmp_path / "resnet8.pt"
    save_model(start, create_model("resnet8", num_classes=10, in_channels=1))
    config, _, in_memory = configs(str(start))[producer]
    config = dataclasses.replace(config, recompute_bn=recompute,
                                 **({} if producer == "starsse" else {"model": "resnet8"}))
    members = in_memory(config, data=tiny_data)
    plain = statistics_loader(tiny_data, "cpu")
    for member in members:
        fresh = with_fresh_statistics(copy.deepcopy(member), plain)
        stats = [k for k in member.state_dict() if k.endswith(("running_mean", "running_var"))]
        same = all(torch.allclose(member.state_dict()[k], fresh.state_dict()[k], atol=1e-5) for k in stats)
        assert stats and same is recompute, member.pat_member.name
        assert member.pat_member.cost.get("bn_samples", 0) == (len(tiny_data.train) if recompute else 0)
