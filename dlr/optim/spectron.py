"""Spectron: spectral renormalization with orthogonalization for native low-rank training.

Janson, Oyallon, Belilovsky, "Stabilizing Native Low-Rank LLM Pretraining" (arXiv 2602.12429).
For every factorized layer W = B A (A: [rank, d_in], B: [d_out, rank]) one step is

    M_A <- beta M_A + (1 - beta) grad_A            (same for B)
    O_A  = NewtonSchulz(M_A)                       (approximately U V^T: unit spectral norm)
    sigma_A ~ ||A||_2 by one warm-started power-iteration step   (same for B)
    rho  = lr / (sigma_A + sigma_B + 1)
    A <- A (1 - lr wd) - rho O_A,   B <- B (1 - lr wd) - rho O_B

so that ||d(BA)||_2 <= rho ||O_B|| ||A|| + rho ||B|| ||O_A|| + rho^2 ||O_B|| ||O_A||
                    <= rho (sigma_A + sigma_B + 1) = lr      (for rho <= 1, exact orthogonalization)

The factors themselves are the parameters: nothing of size [d_out, d_in] is ever built.
Every other trainable tensor (embeddings, lm_head, norms) is stepped by AdamW in the same
`step()`, so one LR scheduler and one `state_dict()` cover the whole model.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from dlr.config.choices import NS_DTYPES

# Quintic Newton-Schulz coefficients popularised by Muon (Jordan et al., 2024). They trade
# exact convergence for speed: after ~5 steps every singular value of a full-rank input
# lands in roughly [0.7, 1.2] instead of exactly 1, which is all a step direction needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

_TINY = 1e-12


def newton_schulz(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of g = U S V^T (batched over leading dims).

    Returned in `dtype`; the caller casts back. Works on the short side (Gram matrix of
    size min(rows, cols)^2), which for a rank-r factor is r x r: this is what keeps the
    cost of a step proportional to the factor sizes, not to d_out x d_in.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    # The Frobenius norm bounds the spectral norm, so this puts every singular value in
    # (0, 1], inside the region where the iteration pushes them towards 1.
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transposed else x


def power_iteration(w: Tensor, v: Tensor, iters: int = 1) -> tuple[Tensor, Tensor]:
    """Estimate ||w||_2, warm-started from the unit vector `v`; returns (sigma, new v).

    Batched over leading dims. `v` lives on the short side of `w` (length
    min(rows, cols)), so the state it needs is rank-sized for a factor. sigma is a lower
    bound that tightens every call; keeping `v` between optimizer steps makes one matvec
    pair per step enough because the weights move little from one step to the next.
    Computed in fp32, without host syncs.
    """
    x = w.float()
    if x.shape[-2] > x.shape[-1]:
        x = x.mT  # [..., short, long]: v is a left singular vector estimate
    v = v.float()
    sigma = v.new_zeros(v.shape[:-1])
    for _ in range(iters):
        right = (x.mT @ v.unsqueeze(-1)).squeeze(-1)
        right = right / right.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        left = (x @ right.unsqueeze(-1)).squeeze(-1)
        sigma = left.norm(dim=-1)
        # A zero matrix would turn v into zeros forever; keep the old direction instead.
        v = torch.where((sigma > _TINY).unsqueeze(-1), left / sigma.clamp_min(_TINY).unsqueeze(-1), v)
    return sigma, v


def _short_first(t: Tensor) -> Tensor:
    return t.mT if t.shape[-2] > t.shape[-1] else t


class Spectron(torch.optim.Optimizer):
    """Spectron for factor pairs plus AdamW for everything else, in one optimizer.

    `params` is a list of param groups. A group with ``spectron=True`` holds factor pairs
    in order ``[A_1, B_1, A_2, B_2, ...]`` (pairs are recovered from that order, so a
    state dict loads back into an optimizer built the same way, as torch requires anyway).
    Other groups are AdamW groups (``betas``, ``eps``, ``weight_decay``). Use
    `dlr.optim.build_optimizer` (or `spectron_param_groups`) to build the groups from a model.

    Per-parameter state: factors keep ``momentum_buffer``, ``power_vec`` (the
    power-iteration vector) and ``sigma`` (last spectral-norm estimate, handy for logging);
    AdamW params keep ``exp_avg`` and ``exp_avg_sq``; both keep ``step``. All tensors are
    in the parameter's dtype so that `load_state_dict` (which casts to it) restores them
    bit for bit. The update is deterministic, so DDP ranks that see the same averaged
    gradients stay identical. Not for FSDP/ZeRO-sharded factors: Newton-Schulz and the
    power iteration need whole matrices.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        momentum: float = 0.9,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        power_init_iters: int = 10,
        ns_dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr={lr!r} must be > 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
        if int(ns_steps) != ns_steps or ns_steps < 1:
            raise ValueError(f"ns_steps={ns_steps!r} must be an integer >= 1")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype={ns_dtype!r} is not valid; accepted: {', '.join(NS_DTYPES)}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            ns_steps=int(ns_steps),
            weight_decay=weight_decay,
            betas=tuple(betas),
            eps=eps,
            power_init_iters=int(power_init_iters),
            ns_dtype=ns_dtype,
            seed=int(seed),
            spectron=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["spectron"]:
                if len(group["params"]) % 2:
                    raise ValueError("a spectron group must hold factor pairs [A_1, B_1, A_2, B_2, ...]")
                for a, b in zip(group["params"][0::2], group["params"][1::2]):
                    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                        raise ValueError(
                            f"factor pair shapes {tuple(a.shape)}, {tuple(b.shape)} are not A [rank, d_in], B [d_out, rank]"
                        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if group["spectron"]:
                self._spectron_group(group, index)
            else:
                self._adamw_group(group)
        return loss

    def _factor_state(self, p: Tensor, group: dict[str, Any], seed: int) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Seeded on the CPU from the parameter's position, so every DDP rank and every
            # device starts from the same vector and the updates agree bit for bit.
            gen = torch.Generator(device="cpu").manual_seed(seed)
            v = torch.randn(min(p.shape), generator=gen, dtype=torch.float32)
            v = (v / v.norm()).to(p.device)
            # A random start underestimates sigma on the first step; a few extra iterations,
            # once, keep that first step from being larger than intended.
            sigma, v = power_iteration(p, v, max(1, group["power_init_iters"]))
            state["power_vec"] = v.to(p.dtype)
            state["sigma"] = sigma.to(p.dtype)
        return state

    def _spectron_group(self, group: dict[str, Any], group_index: int) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        params = group["params"]
        active: list[Tensor] = []  # factors to step, pair by pair: [A_i, B_i, A_j, B_j, ...]
        for pair_index in range(len(params) // 2):
            pair = params[2 * pair_index : 2 * pair_index + 2]
            if all(p.grad is None for p in pair):
                continue
            for offset, p in enumerate(pair):
                seed = group["seed"] + 1_000_003 * group_index + 2 * pair_index + offset
                state = self._factor_state(p, group, seed)
                state["step"] += 1
                if p.grad is None:
                    state["momentum_buffer"].mul_(beta)  # unused factor: momentum decays as for a zero grad
                elif p.grad.is_sparse:
                    raise RuntimeError("Spectron does not support sparse gradients")
                else:
                    state["momentum_buffer"].lerp_(p.grad, 1.0 - beta)
                active.append(p)
        if not active:
            return

        # Same-shaped factors (e.g. every q/k/v/o A of every layer) are processed as one
        # batch: a handful of batched matmuls instead of thousands of small kernel launches,
        # which would bound the step on a GPU. The stacks are transient copies of
        # the factors and their momenta, never anything of size d_out x d_in.
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(active):
            buckets.setdefault((min(p.shape), max(p.shape), p.device, p.dtype), []).append(i)
        device = active[0].device
        sigmas = torch.zeros(len(active), device=device, dtype=torch.float32)
        orth: dict[tuple, Tensor] = {}
        for key, idx in buckets.items():
            states = [self.state[active[i]] for i in idx]
            # Norm of the weights *before* this step: rho bounds the step taken from them.
            sigma, v = power_iteration(
                torch.stack([_short_first(active[i]) for i in idx]), torch.stack([s["power_vec"] for s in states]), 1
            )
            torch._foreach_copy_([s["power_vec"] for s in states], list(v.to(active[idx[0]].dtype).unbind(0)))
            torch._foreach_copy_([s["sigma"] for s in states], list(sigma.unbind(0)))
            sigmas[torch.tensor(idx, device=device)] = sigma.to(device)
            ns_dtype = torch.bfloat16 if group["ns_dtype"] == "bfloat16" and key[2].type == "cuda" else torch.float32
            momenta = torch.stack([_short_first(s["momentum_buffer"]) for s in states])
            orth[key] = newton_schulz(momenta, group["ns_steps"], dtype=ns_dtype)

        rho = (lr / (sigmas[0::2] + sigmas[1::2] + 1.0)).repeat_interleave(2)  # per factor, no host sync
        deltas: list[Tensor] = [active[0]] * len(active)
        for key, idx in buckets.items():
            scaled = orth[key] * rho[torch.tensor(idx, device=device)].to(orth[key]).view(-1, 1, 1)
            for j, i in enumerate(idx):
                p = active[i]
                deltas[i] = (scaled[j].mT if p.shape[0] > p.shape[1] else scaled[j]).to(p.dtype)
        if wd != 0:
            torch._foreach_mul_(active, 1.0 - lr * wd)
        torch._foreach_sub_(active, deltas)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        # Same arithmetic as torch.optim.AdamW's single-tensor path (tested against it),
        # so "spectron" and "adamw" runs treat embeddings and norms identically.
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("Spectron (AdamW part) does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1.0 - lr * wd)
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            step_size = lr / (1.0 - beta1**step)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
