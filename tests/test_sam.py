from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pat.data import DeviceLoader, IndexedBatches
from pat.engine.loop import fit
from pat.engine.sam import MixedSAMStep, SAMStep, sam_perturbation
from pat.engine.steps import create_step, sgd_step
from pat.errors import PatError

NULL = contextlib.nullcontext


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def grads(model: nn.Module, params: dict, x, y) -> dict:
    names = list(params)
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))


def hand_sam(model, x, y, rho, lr, adaptive=False) -> dict:
    """The two-pass SAM update written out: w - lr * grad L(w + e)."""
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    g = grads(model, w, x, y)
    t = {n: (w[n].detach().abs() if adaptive else torch.ones_like(w[n])) for n in w}
    norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in w))
    moved = {n: (w[n].detach() + rho * t[n] ** 2 * g[n] / norm).requires_grad_() for n in w}
    g2 = grads(model, moved, x, y)
    return {n: w[n].detach() - lr * g2[n] for n in w}


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_hand_computed_two_pass_update(adaptive):
    model, (x, y) = tiny(), data()
    expected = hand_sam(model, x, y, rho=0.3, lr=0.1, adaptive=adaptive)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, logits = SAMStep(rho=0.3, adaptive=adaptive)(model, x, y, opt, F.cross_entropy, NULL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)
    # reported loss / logits are those at the unperturbed start point
    assert logits.shape == (12, 3) and not loss.requires_grad
    before = tiny()
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(F.cross_entropy(before(x), y)), rel=1e-6)


def test_sam_differs_from_sgd_and_rho_matters():
    x, y = data()
    finals = []
    for rule in (sgd_step, create_step("sam", rho=0.05), create_step("sam", rho=0.5)):
        model = tiny()
        rule(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, NULL)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(finals[0], finals[1]) and not torch.allclose(finals[1], finals[2])


def test_perturbation_has_radius_rho_and_zero_grad_gives_zero():
    p = torch.nn.Parameter(torch.randn(5, 4))
    q = torch.nn.Parameter(torch.randn(3))
    p.grad, q.grad = torch.randn(5, 4), torch.randn(3)
    e = sam_perturbation([p, q], 0.7)
    norm = torch.sqrt(sum((t**2).sum() for t in e))
    assert float(norm) == pytest.approx(0.7, rel=1e-5)
    p.grad.zero_(), q.grad.zero_()
    assert all(torch.count_nonzero(t) == 0 for t in sam_perturbation([p, q], 0.7))


def test_zero_weights_stay_exactly_zero_after_restore():
    model, (x, y) = tiny(), data()
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step must leave w untouched
    before = copy.deepcopy(model.state_dict())
    SAMStep(rho=0.5)(model, x, y, opt, F.cross_entropy, NULL)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_masked_weights_are_not_perturbed():
    """With masks, e is made from the kept entries' gradient only: hand-computed SAM with g ⊙ mask."""
    model, (x, y) = tiny(), data()
    mask = torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        model[0].weight.mul_(mask)
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    g = grads(model, w, x, y)
    g["0.weight"] = g["0.weight"] * mask
    norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
    moved = {n: (w[n].detach() + 0.3 * g[n] / norm).requires_grad_() for n in w}
    assert torch.count_nonzero(moved["0.weight"].detach()[~mask]) == 0
    expected = {n: w[n].detach() - 0.1 * t for n, t in grads(model, moved, x, y).items()}
    step = create_step("sam", rho=0.3, masks={"0.weight": mask})
    step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, NULL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def batch_of(x, y, idx: torch.Tensor, num_classes: int = 3) -> IndexedBatches:
    """IndexedBatches over one given batch of the samples ``idx``."""
    return IndexedBatches([(x[idx], y[idx] + num_classes * idx)], num_classes)


def test_mixed_step_equals_weighted_sam_plus_sgd_gradient():
    x, y = data(n=20)
    idx = torch.tensor([3, 7, 0, 11, 19, 4, 8, 15])
    sam_mask = torch.zeros(20, dtype=torch.bool)
    sam_mask[[3, 0, 19, 8]] = True  # 4 of the batch's 8 samples
    batches = batch_of(x, y, idx)
    (xb, yb), = list(batches)
    assert torch.equal(yb, y[idx]) and torch.equal(batches.indices, idx)
    model = tiny()
    m = sam_mask[idx]
    # expected: w - lr * (|S|/B grad_S(w+e) + |R|/B grad_R(w)), e from grad_S(w)
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    gs = grads(model, w, xb[m], yb[m])
    norm = torch.sqrt(sum((g**2).sum() for g in gs.values()))
    moved = {n: (w[n].detach() + 0.2 * gs[n] / norm).requires_grad_() for n in w}
    g_sam, g_rest = grads(model, moved, xb[m], yb[m]), grads(model, w, xb[~m], yb[~m])
    expected = {n: w[n].detach() - 0.1 * (0.5 * g_sam[n] + 0.5 * g_rest[n]) for n in w}

    step = create_step("sharpbalance-mixed", rho=0.2, sam_mask=sam_mask, batches=batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, logits = step(model, xb, yb, opt, F.cross_entropy, NULL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        start = tiny()(xb)
    torch.testing.assert_close(logits, start, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(float(F.cross_entropy(start, yb)), rel=1e-5)


@pytest.mark.parametrize("which", ["all", "none"])
def test_mixed_step_reduces_to_sam_or_sgd(which):
    x, y = data(n=10)
    idx = torch.arange(10)
    mask = torch.full((10,), which == "all")
    ref, mixed = tiny(), tiny()
    rule = SAMStep(0.3) if which == "all" else sgd_step
    rule(ref, x, y, torch.optim.SGD(ref.parameters(), lr=0.1), F.cross_entropy, NULL)
    batches = batch_of(x, y, idx)
    for xb, yb in batches:
        MixedSAMStep(0.3, mask, batches)(mixed, xb, yb, torch.optim.SGD(mixed.parameters(), lr=0.1),
                                         F.cross_entropy, NULL)
    for a, b in zip(ref.parameters(), mixed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_indexed_batches_follow_shuffled_loader_and_fit_trains_with_sam():
    g = torch.Generator().manual_seed(0)
    n = 40
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 3
    code = labels + 3 * torch.arange(n)
    loader = DeviceLoader(images, code, mean=(0.5,), std=(0.25,), batch_size=16, shuffle=True, seed=3)
    batches = IndexedBatches(loader, 3)
    seen = []
    for xb, yb in batches:
        idx = batches.indices
        assert torch.equal(yb, labels[idx])
        torch.testing.assert_close(xb, (images[idx].float() / 255 - 0.5) / 0.25)
        seen.append(idx)
    assert sorted(torch.cat(seen).tolist()) == list(range(n))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    mask = torch.arange(n) % 2 == 0
    state = fit(model, batches, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                step=MixedSAMStep(0.1, mask, batches))
    assert len(state.history) == 2 and state.step == 2 * len(loader)


def test_bad_options_raise_pat_error():
    with pytest.raises(PatError, match="rho must be positive. Got 0"):
        create_step("sam", rho=0)
    with pytest.raises(PatError, match="sam_mask"):
        MixedSAMStep(0.1, torch.zeros(3), IndexedBatches([], 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sam_and_mixed_steps_on_cuda_match_cpu():
    x, y = data(n=16)
    cpu, gpu = tiny(), tiny().cuda()
    SAMStep(0.2)(cpu, x, y, torch.optim.SGD(cpu.parameters(), lr=0.1), F.cross_entropy, NULL)
    SAMStep(0.2)(gpu, x.cuda(), y.cuda(), torch.optim.SGD(gpu.parameters(), lr=0.1), F.cross_entropy, NULL)
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)
    mask = (torch.arange(16) % 3 == 0).cuda()
    batches = batch_of(x.cuda(), y.cuda(), torch.arange(16).cuda())
    for xb, yb in batches:
        loss, logits = MixedSAMStep(0.2, mask, batches)(
            gpu, xb, yb, torch.optim.SGD(gpu.parameters(), lr=0.1), F.cross_entropy,
            lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        assert torch.isfinite(loss) and logits.shape == (16, 3)
