from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pat.ensemble import average_state_dicts, greedy_soup, recalibrate_bn, uniform_soup
from pat.errors import PatError


def _net(seed: int, hidden: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_weighted_average_of_state_dicts() -> None:
    a, b = _net(0).state_dict(), _net(1).state_dict()
    b["1.num_batches_tracked"].fill_(7)
    before = {k: v.clone() for k, v in a.items()}
    avg = average_state_dicts([a, b], weights=[3, 1])
    for key in ("0.weight", "3.bias", "1.running_var"):
        torch.testing.assert_close(avg[key], 0.75 * a[key] + 0.25 * b[key])
    assert avg["1.num_batches_tracked"] == a["1.num_batches_tracked"]
    assert avg["1.num_batches_tracked"].dtype == torch.long
    assert all(torch.equal(a[k], before[k]) for k in a)  # pure
    uniform = average_state_dicts([a, b])
    torch.testing.assert_close(uniform["0.weight"], (a["0.weight"] + b["0.weight"]) / 2)


def test_masked_members_average_their_zeros() -> None:
    w = torch.randn(4, 4)
    m1 = torch.rand(4, 4) < 0.5
    avg = average_state_dicts([{"w": w * m1}, {"w": w * ~m1}])
    torch.testing.assert_close(avg["w"], w / 2)


def test_soup_refuses_members_of_different_shapes() -> None:
    with pytest.raises(PatError, match=r"members 0 and 1 have different shapes: 0\.weight \(6, 8\) vs \(5, 8\)"):
        average_state_dicts([_net(0).state_dict(), _net(1, hidden=5).state_dict()])
    with pytest.raises(PatError, match="different parameters"):
        average_state_dicts([_net(0).state_dict(), nn.Linear(8, 3).state_dict()])
    with pytest.raises(PatError, match="weights must have one entry per member"):
        average_state_dicts([_net(0).state_dict()] * 2, weights=[1, 2, 3])


def test_uniform_soup_of_identical_members_is_the_member() -> None:
    member = _net(0).eval()
    soup = uniform_soup([member, copy.deepcopy(member), copy.deepcopy(member)]).eval()
    assert soup is not member
    for key, value in member.state_dict().items():
        torch.testing.assert_close(soup.state_dict()[key], value)
    x = torch.randn(5, 8)
    torch.testing.assert_close(soup(x), member(x))


def test_recalibrate_bn_takes_batches_with_labels() -> None:
    model = _net(0)
    x = torch.randn(64, 8) * 3 + 1
    loader = [(x[i:i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    model.eval()
    recalibrate_bn(model, loader)
    assert not model.training  # mode restored
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean(0), atol=1e-5, rtol=1e-4)
    # momentum=None: the running variance is the plain mean of the batch variances
    batch_var = torch.stack([h[i:i + 16].var(0) for i in range(0, 64, 16)]).mean(0)
    torch.testing.assert_close(model[1].running_var, batch_var, atol=1e-4, rtol=1e-3)


def _blob_task():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 8, generator=g)
    return centers, [(x[i:i + 30], y[i:i + 30]) for i in range(0, 90, 30)]


def _linear(weight: torch.Tensor) -> nn.Module:
    layer = nn.Linear(8, 3)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


def test_greedy_soup_keeps_only_ingredients_that_do_not_hurt() -> None:
    centers, loader = _blob_task()
    good = _linear(centers)  # scores the class centres: a good classifier
    bad = _linear(-10 * centers)  # outweighs two good members in any soup it joins
    soup, ingredients = greedy_soup([bad, good, copy.deepcopy(good)], loader, None)
    assert ingredients[0] == 1 and 0 not in ingredients and sorted(ingredients) == [1, 2]
    torch.testing.assert_close(soup.weight, centers)
    _, by_nll = greedy_soup([bad, good], loader, None, metric="nll")
    assert by_nll == [1]
