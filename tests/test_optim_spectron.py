"""Spectron's building blocks and update rule, on small stand-in factor pairs."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from dlr.optim import Spectron, build_optimizer, find_factor_pairs, newton_schulz, power_iteration


class Factored(nn.Module):
    """Stand-in for LowRankLinear: y = B silu(A x)."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.A = nn.utils.skip_init(nn.Linear, d_in, rank, bias=False)
        self.B = nn.utils.skip_init(nn.Linear, rank, d_out, bias=False)
        with torch.no_grad():
            self.A.weight.copy_(torch.randn(rank, d_in) / d_in**0.5)
            self.B.weight.copy_(torch.randn(d_out, rank) / rank**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(nn.functional.silu(self.A(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.norm = nn.LayerNorm(24)
        self.up = Factored(24, 40, 6)
        self.down = Factored(40, 24, 6)
        self.head = nn.Linear(24, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        h = h + self.down(self.up(h))
        return self.head(h)


def toy_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (4, 12), generator=gen)
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))


SPECTRON = {"name": "spectron", "lr": 0.02, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_newton_schulz_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(g, steps=5)
    assert o.shape == g.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    # Muon's quintic coefficients converge to a band around 1, not to 1 exactly.
    assert s.min() > 0.6 and s.max() < 1.25, s
    # Same singular vectors as g: o is (close to) U V^T.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.flatten(), dim=0) > 0.98


def test_newton_schulz_batched_matches_single():
    g = torch.randn(3, 16, 40)
    batched = newton_schulz(g)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(g[i]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 200), (300, 16), (64, 64)])
def test_power_iteration_converges_to_spectral_norm(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    v = torch.randn(min(shape), generator=torch.Generator().manual_seed(3))
    v = v / v.norm()
    truth = torch.linalg.matrix_norm(w, ord=2)
    estimates = []
    # One step per call, warm-started, exactly as the optimizer runs it. The square matrix's two
    # largest singular values are 1% apart, so a start far from the top vector needs a few hundred.
    for _ in range(300):
        sigma, v = power_iteration(w, v, 1)
        estimates.append(sigma.item())
    assert estimates[-1] <= truth.item() * (1 + 1e-5)  # a lower bound...
    assert abs(estimates[-1] - truth.item()) / truth.item() < 1e-3  # ...that converges
    assert estimates[-1] >= estimates[0] - 1e-6


def test_optimizer_sigma_state_tracks_spectral_norm():
    model = Toy()
    opt = build_optimizer(SPECTRON | {"lr": 1e-4}, model, "lowrank")
    for _ in range(30):
        opt.zero_grad()
        toy_loss(model).backward()
        opt.step()
    for _, a, b in find_factor_pairs(model):
        for p in (a, b):
            truth = torch.linalg.matrix_norm(p.detach(), ord=2).item()
            assert abs(opt.state[p]["sigma"].item() - truth) / truth < 1e-2
            assert opt.state[p]["power_vec"].shape == (min(p.shape),)


def _one_step_delta(scale: float) -> tuple[float, float]:
    torch.manual_seed(0)
    layer = Factored(24, 40, 6)
    with torch.no_grad():
        layer.A.weight.mul_(scale)
        layer.B.weight.mul_(scale)
    grads = (torch.randn_like(layer.A.weight), torch.randn_like(layer.B.weight))
    layer.A.weight.grad, layer.B.weight.grad = grads
    before = (layer.A.weight.detach().clone(), layer.B.weight.detach().clone())
    opt = Spectron([{"params": [layer.A.weight, layer.B.weight], "spectron": True}], lr=0.1, weight_decay=0.0, power_init_iters=50)
    opt.step()
    step = (layer.A.weight.detach() - before[0]).norm().item()
    sigma_sum = sum(torch.linalg.matrix_norm(p, ord=2).item() for p in before)
    return step, sigma_sum


def test_effective_step_shrinks_as_factor_norms_grow():
    steps, sigmas = zip(*(_one_step_delta(s) for s in (0.1, 1.0, 10.0, 100.0)))
    assert all(later < earlier for earlier, later in zip(steps, steps[1:])), steps
    # The shrink is exactly lr / (sigma_A + sigma_B + 1): step * (sum + 1) is constant.
    products = [st * (sg + 1.0) for st, sg in zip(steps, sigmas)]
    assert max(products) / min(products) < 1.02, products


def test_update_of_product_is_bounded_by_lr():
    torch.manual_seed(3)
    for scale in (0.3, 3.0, 30.0):
        layer = Factored(40, 64, 8)
        with torch.no_grad():
            layer.A.weight.mul_(scale)
        w0 = (layer.B.weight @ layer.A.weight).detach()
        layer.A.weight.grad, layer.B.weight.grad = torch.randn_like(layer.A.weight), torch.randn_like(layer.B.weight)
        lr = 0.05
        Spectron([{"params": [layer.A.weight, layer.B.weight], "spectron": True}], lr=lr, power_init_iters=50).step()
        dw = torch.linalg.matrix_norm((layer.B.weight @ layer.A.weight).detach() - w0, ord=2).item()
        # 1.25: Newton-Schulz output singular values reach ~1.2, not exactly 1.
        assert dw <= 1.25 * lr, (scale, dw)


def test_no_dense_state_is_materialized():
    model = Toy()
    opt = build_optimizer(SPECTRON, model, "lowrank")
    toy_loss(model).backward()
    opt.step()
    for _, a, b in find_factor_pairs(model):
        dense = a.shape[1] * b.shape[0]
        for p in (a, b):
            for value in opt.state[p].values():
                if torch.is_tensor(value):
                    assert value.numel() <= p.numel() < dense


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    model = Toy()
    reference = copy.deepcopy(model)
    opt = build_optimizer(SPECTRON | {"betas": [0.8, 0.99], "eps": 1e-6}, model, "lowrank")
    factor_ids = {id(p) for _, a, b in find_factor_pairs(reference) for p in (a, b)}
    rest = [p for p in reference.parameters() if id(p) not in factor_ids]
    ref_opt = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=0.02, betas=(0.8, 0.99), eps=1e-6, foreach=False,
    )
    for step in range(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            toy_loss(m, seed=step).backward()
        # Give both models identical grads for the non-factor params (factors differ after step 0).
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            if id(q) not in factor_ids:
                q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if id(q) not in factor_ids:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_reads_group_lr_every_step():
    model = Toy()
    opt = build_optimizer(SPECTRON, model, "lowrank")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    toy_loss(model).backward()
    opt.step()
    sched.step()  # lr is now 0
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    toy_loss(model).backward()
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        toy_loss(model, seed=step).backward()
        opt.step()
        sched.step()


def _schedule(opt: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(SPECTRON, model, "dlr")
    sched = _schedule(opt)
    _train(model, opt, sched, range(3))

    # Checkpoint the way accelerate does: torch.save, then a weights_only load.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    factor_state = [s for s in ckpt["opt"]["state"].values() if "power_vec" in s]
    assert len(factor_state) == 4 and all("momentum_buffer" in s and "sigma" in s for s in factor_state)

    resumed = Toy()
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = build_optimizer(SPECTRON, resumed, "dlr")
    resumed_sched = _schedule(resumed_opt)
    resumed_opt.load_state_dict(ckpt["opt"])
    resumed_sched.load_state_dict(ckpt["sched"])

    _train(model, opt, sched, range(3, 7))
    _train(resumed, resumed_opt, resumed_sched, range(3, 7))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = resumed_opt.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def test_fresh_optimizers_are_identical_across_instances():
    """What keeps DDP ranks in sync: same weights + same grads -> same update, bit for bit."""
    torch.manual_seed(0)
    model = Toy()
    twin = copy.deepcopy(model)
    opts = [build_optimizer(SPECTRON, m, "lowrank") for m in (model, twin)]
    for m, o in zip((model, twin), opts):
        _train(m, o, _schedule(o), range(3))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
