from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pat.engine.checkpoint import save_checkpoint, save_model
from pat.ensemble import Ensemble, EnsembleDir, cached_probs, collect_probs, combine
from pat.ensemble.predict import check_probs, choose_path
from pat.errors import PatError


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    )
    # non-trivial running statistics, so eval-mode BN really matters
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net


def _loader(n: int = 20, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_vmap_path_equals_loop_path_with_batchnorm() -> None:
    models = [_bn_net(s) for s in range(3)]
    loader = _loader()
    loop, y_loop = collect_probs(models, loader, path="loop")
    vm, y_vm = collect_probs(models, loader, path="vmap")
    assert loop.shape == (3, 20, 5)
    assert torch.equal(y_loop, y_vm) and torch.equal(y_loop, torch.cat([y for _, y in loader]))
    torch.testing.assert_close(vm, loop, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loop.sum(-1), torch.ones(3, 20))
    # the members really differ, so equality above is not vacuous
    assert (loop[0] - loop[1]).abs().max() > 1e-3


def test_collect_probs_restores_training_mode_and_uses_eval_statistics() -> None:
    models = [_bn_net(0), _bn_net(1)]
    models[1].eval()
    loader = _loader()
    probs, _ = collect_probs(models, loader, path="vmap")
    assert models[0].training and not models[1].training
    with torch.no_grad():
        expected = models[1](loader[0][0]).softmax(-1)
    torch.testing.assert_close(probs[1, :8], expected, atol=1e-6, rtol=1e-5)


def test_path_choice() -> None:
    same = [_bn_net(0), _bn_net(1)]
    other = [_bn_net(0), nn.Sequential(nn.Flatten(), nn.Linear(192, 5))]
    assert choose_path(same, torch.device("cpu")) == "loop"
    assert choose_path(same, torch.device("cuda")) == "vmap"
    assert choose_path(other, torch.device("cuda")) == "loop"
    with pytest.raises(PatError, match="path='vmap' needs members"):
        choose_path(other, torch.device("cpu"), "vmap")
    with pytest.raises(PatError, match="path must be one of"):
        choose_path(same, torch.device("cpu"), "fast")


def test_collect_probs_refuses_batches_without_labels() -> None:
    with pytest.raises(PatError, match=r"loader must yield \(x, y\) batches"):
        collect_probs([_bn_net(0)], [torch.randn(2, 3, 8, 8)])


def test_check_probs_names_mismatched_members() -> None:
    with pytest.raises(PatError, match="different class counts: member 0 has 3, member 1 has 4"):
        check_probs([torch.rand(5, 3), torch.rand(5, 4)])
    with pytest.raises(PatError, match="different numbers of samples"):
        check_probs([torch.rand(5, 3), torch.rand(6, 3)])
    with pytest.raises(PatError, match="labels must be"):
        check_probs(torch.rand(2, 5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(PatError, match=r"labels must be in \[0, 3\)"):
        check_probs(torch.rand(2, 5, 3), torch.full((5,), 3))


# -- combiners ----------------------------------------------------------------------------
def _probs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 30, 6, generator=g).mul(2).softmax(-1)


def test_combine_mean_and_weighted() -> None:
    probs = _probs()
    torch.testing.assert_close(combine(probs), probs.mean(0))
    w = torch.tensor([1.0, 3.0, 0.0, 0.0])
    torch.testing.assert_close(combine(probs, "weighted", w), 0.25 * probs[0] + 0.75 * probs[1])
    torch.testing.assert_close(combine(probs, "weighted", torch.ones(4)), probs.mean(0))
    with pytest.raises(PatError, match="weights must be finite, non-negative"):
        combine(probs, "weighted", [1.0, -1.0, 0.0, 0.0])
    with pytest.raises(PatError, match="one entry per member"):
        combine(probs, "weighted", [1.0, 1.0])
    with pytest.raises(PatError, match="got weights with method='mean'"):
        combine(probs, "mean", torch.ones(4))


def test_combine_vote_majority_and_tie_break() -> None:
    # three members, two classes; sample 0: 2 votes for class 1 although the mean favours 0
    p = torch.tensor([
        [[0.99, 0.01], [0.6, 0.4]],
        [[0.45, 0.55], [0.3, 0.7]],
        [[0.45, 0.55], [0.55, 0.45]],
    ])
    out = combine(p, "vote")
    assert out.argmax(-1).tolist() == [1, 0]
    torch.testing.assert_close(out.sum(-1), torch.ones(2))
    # tie (one vote each) is broken by the mean probability
    tie = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])
    assert combine(tie, "vote").argmax(-1).item() == 0
    tie_other = torch.tensor([[[0.55, 0.45]], [[0.1, 0.9]]])
    assert combine(tie_other, "vote").argmax(-1).item() == 1
    # close to the vote shares (within half a vote)
    votes = torch.tensor([[1 / 3, 2 / 3], [2 / 3, 1 / 3]])
    assert (out - votes).abs().max() <= 0.5 / 3.5 + 1e-6


# -- cache --------------------------------------------------------------------------------
def _ens_dir(tmp_path, m: int = 2) -> EnsembleDir:
    ens = EnsembleDir.create(tmp_path / "ens", arch=None, num_classes=5)
    for i in range(m):
        save_checkpoint(ens.path / f"m{i}.pt", {"kind": "model", "state_dict": {"w": torch.full((3,), float(i))}})
        ens.upsert_member({"name": f"m{i}", "file": f"m{i}.pt", "producer": "test", "status": "trained"})
    ens.save()
    return ens


def test_cache_reused_until_a_member_file_changes(tmp_path) -> None:
    ens = _ens_dir(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.full((2, 3, 5), 0.2) + len(calls) * 0.0, torch.tensor([0, 1, 2])

    p1, y1 = cached_probs(ens, "val", compute)
    assert (ens.path / "probs-val.pt").is_file()
    p2, y2 = cached_probs(EnsembleDir.load(ens.path), "val", compute)
    assert len(calls) == 1 and torch.equal(p1, p2) and torch.equal(y1, y2)
    # same size, same content: still a new file (atomic writes make a new inode)
    save_checkpoint(ens.path / "m1.pt", {"kind": "model", "state_dict": {"w": torch.full((3,), 1.0)}})
    cached_probs(ens, "val", compute)
    assert len(calls) == 2
    cached_probs(ens, "val", compute)
    assert len(calls) == 2
    # a different data key, or a touched file, also invalidates
    cached_probs(ens, "val", compute, key={"n": 3})
    assert len(calls) == 3
    st = os.stat(ens.path / "m0.pt")
    os.utime(ens.path / "m0.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached_probs(ens, "val", compute, key={"n": 3})
    assert len(calls) == 4


def test_cache_refuses_probabilities_of_the_wrong_member_count(tmp_path) -> None:
    ens = _ens_dir(tmp_path, m=2)
    with pytest.raises(PatError, match="probabilities of 3 members; the ensemble has 2"):
        cached_probs(ens, "test", lambda: (torch.full((3, 4, 5), 0.2), torch.zeros(4, dtype=torch.long)))


# -- Ensemble -----------------------------------------------------------------------------
def test_ensemble_predict_and_load(tmp_path) -> None:
    from pat.models import create_model

    torch.manual_seed(0)
    models = [create_model("resnet8", num_classes=3, in_channels=1) for _ in range(3)]
    ens_dir = EnsembleDir.create(tmp_path / "e", arch=None, num_classes=3)
    for i, m in enumerate(models):
        save_model(ens_dir.path / f"c{i}.pt", m)
        ens_dir.upsert_member({"name": f"c{i}", "file": f"c{i}.pt", "producer": "test", "status": "tuned"})
    ens_dir.record_selection("top-k", [2, 0], [0.25, 0.75])
    ens_dir.save()

    x = torch.randn(4, 1, 16, 16)
    expected = collect_probs(models, [(x, torch.zeros(4))], path="loop")[0]
    loaded = Ensemble.load(ens_dir.path)
    assert loaded.names == ["c0", "c1", "c2"] and len(loaded) == 3
    torch.testing.assert_close(loaded.member_probs(x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loaded(x), expected.mean(0), atol=1e-6, rtol=1e-5)

    chosen = Ensemble.load(ens_dir.path, selected_only=True)
    assert chosen.names == ["c2", "c0"] and chosen.combiner == "weighted"
    torch.testing.assert_close(chosen.predict_proba(x), 0.25 * expected[2] + 0.75 * expected[0],
                               atol=1e-6, rtol=1e-5)
    vm = Ensemble(models, path="vmap")
    torch.testing.assert_close(vm.member_probs(x), expected, atol=1e-5, rtol=1e-4)


def test_ensemble_load_without_selection_says_so(tmp_path) -> None:
    ens = _ens_dir(tmp_path)
    with pytest.raises(PatError, match="has no recorded selection"):
        Ensemble.load(ens.path, selected_only=True)
