"""The factorized projection with an optional Duplicated Latent Residual (DLR).

    z = act(A x),  y = B z + s * Expand_K(z),  s = alpha / sqrt(K),  K = ceil(d_out / r)

Expand_K copies latent coordinate index[o] into output o. It is linear in z, so
Expand_K(z) = R z with R a fixed one-hot [d_out, r] matrix, and we compute the residual
through the effective up weight B + s R: no [tokens, d_out] expansion is ever built, and
the gradient w.r.t. B is unchanged. Folding writes B + s R into B for good.

How B + s R is built depends on what is cheap where (docs/benchmarks.md, "Training step"):
- bf16 autocast, eager: an out-of-place scatter, then autocast's cast, which low-rank pays
  anyway; the cast copy is what F.linear keeps for backward, so no memory is added, and
  autograd stays in C++ (small models on a GPU are bound by per-op host overhead).
- no autocast (fp32), eager: the same weight through `_RebuiltResidualUp`, which keeps B rather
  than a copy of B + s R for backward and rebuilds it there (the copy is B-sized per layer).
- torch.compile: a pointwise `where` over an index comparison, which inductor can fuse with
  the cast.

This file is copied into saved model directories (HF remote code): torch only.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_PROJECTIONS = PROJECTIONS[:4]
MLP_PROJECTIONS = PROJECTIONS[4:]
METHODS = ("full", "lowrank", "dlr")
ACTIVATIONS = ("silu", "identity")
EXPAND_MODES = ("uniform", "random_reuse")
SCOPES = ("all", "attn", "mlp")


def expansion_factor(d_out: int, rank: int) -> int:
    return math.ceil(d_out / rank)


def expand_index(d_out: int, rank: int, mode: str, seed: int, name: str) -> torch.Tensor:
    """Latent coordinate feeding each output: contiguous duplication, truncated to d_out.

    `random_reuse` keeps each latent's multiplicity but shuffles which outputs it feeds,
    with a generator seeded from (seed, layer name) so every process and every reload
    agrees. Always built on the CPU: it must exist even when the weights are on `meta`.
    """
    index = torch.arange(d_out, device="cpu") // expansion_factor(d_out, rank)
    if mode == "random_reuse":
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        index = index[torch.randperm(d_out, generator=gen, device="cpu")]
    return index


def cola_init_std(d_in: int, d_out: int, rank: int) -> float:
    """CoLA: A, B ~ N(0, std) so that B A has entries of std (d_in + d_out)^-1/2."""
    return rank**-0.25 * (d_in + d_out) ** -0.25


class _RebuiltResidualUp(torch.autograd.Function):
    """y = z (B + s R)^T keeping z and B, not an fp32 B + s R, for backward.

    Without autocast, F.linear(z, B.scatter_add(...)) would keep the new B-sized weight
    alive until backward in every layer; here backward rebuilds it. dL/dB = dL/d(B + s R).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, B: torch.Tensor, index_col: torch.Tensor, scale_col: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, B, index_col, scale_col)
        return F.linear(z, B.scatter_add(1, index_col, scale_col))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        z, B, index_col, scale_col = ctx.saved_tensors
        grad_z = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_y @ B.scatter_add(1, index_col, scale_col)
        if ctx.needs_input_grad[1]:
            grad_B = grad_y.reshape(-1, grad_y.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
        return grad_z, grad_B, None, None


class LowRankLinear(nn.Module):
    """y = B act(A x) (+ s * Expand_K(act(A x)) while the DLR residual is unfolded)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        activation: str = "silu",
        dlr_scale: float = 0.0,
        dlr_index: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.activation = activation
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.dlr_scale = float(dlr_scale)
        if dlr_index is not None:
            # Persistent: a random_reuse index must travel with the weights it was trained with.
            # On B's device: a model built under `with torch.device("cuda")` must not keep a
            # CPU index (expand_index builds it on the CPU so that `meta` builds still have it).
            self.register_buffer("dlr_index", dlr_index.to(device=self.B.device, dtype=torch.long), persistent=True)
        else:
            self.dlr_index = None
        self._dlr_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def has_residual(self) -> bool:
        return self.dlr_index is not None

    def effective_B(self) -> torch.Tensor:
        if self.dlr_index is None:
            return self.B
        # Out of place, so autograd sees B + s R and B's gradient is exactly dL/dB_eff;
        # each row o gets s added at column index[o]: one scatter kernel, no sort.
        return self.B.scatter_add(1, *self._scatter_operands())

    def _scatter_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index column, scale column) for B.scatter_add, cached for B's device and dtype.

        The scale column must live on B's device: a Python float turned into a tensor on the
        host would be a blocking host-to-device copy per call. Caching it saves a fill kernel
        and two ops of host overhead per projection. The cache follows the index object, so a
        load with assign=True or a device move (both replace the buffer) rebuilds it.
        """
        B, index, cache = self.B, self.dlr_index, self._dlr_cache
        if cache is None or cache[0] is not index or cache[2].dtype != B.dtype or cache[2].device != B.device:
            scale = torch.full((self.out_features, 1), self.dlr_scale, dtype=B.dtype, device=B.device)
            cache = self._dlr_cache = (index, index.unsqueeze(1), scale)
        return cache[1], cache[2]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """z = act(A x), the rank-r code that B (and the residual) map back up."""
        z = F.linear(x, self.A)
        return F.silu(z) if self.activation == "silu" else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.latent(x)
        if self.dlr_index is None:
            return F.linear(z, self.B)
        if torch.compiler.is_compiling():
            cols = torch.arange(self.rank, device=self.B.device)
            weight = torch.where(cols == self.dlr_index.unsqueeze(1), self.B + self.dlr_scale, self.B)
        elif torch.is_autocast_enabled(z.device.type):
            weight = self.effective_B()
        else:
            return _RebuiltResidualUp.apply(z, self.B, *self._scatter_operands())
        return F.linear(z, weight)

    @torch.no_grad()
    def fold_(self) -> bool:
        """B <- B + s R; the layer is then a plain low-rank layer. False if nothing to fold."""
        if self.dlr_index is None:
            return False
        self.B.copy_(self.effective_B())
        del self._buffers["dlr_index"]
        self.dlr_index = None
        self.dlr_scale = 0.0
        self._dlr_cache = None
        return True

    def extra_repr(self) -> str:
        extra = f", dlr_scale={self.dlr_scale:.4g}" if self.has_residual else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, act={self.activation}{extra}"


def residual_projections(scope: str) -> tuple[str, ...]:
    return {"all": PROJECTIONS, "attn": ATTN_PROJECTIONS, "mlp": MLP_PROJECTIONS}[scope]


def factorize_projections(model: nn.Module, config) -> int:
    """Replace the seven dense projections of every decoder layer; returns how many.

    The dense nn.Linear modules are swapped before any weight initialisation runs, and a
    config with dlr_folded=True gets no residual: its layout is that of a lowrank model.
    """
    if config.dlr_method == "full":
        return 0
    with_residual = config.dlr_method == "dlr" and not config.dlr_folded
    residual_names = residual_projections(config.dlr_scope) if with_residual else ()
    count = 0
    for layer_idx, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for proj in PROJECTIONS:
                dense = getattr(parent, proj, None)
                if dense is None:
                    continue
                d_in, d_out = dense.in_features, dense.out_features
                index, scale = None, 0.0
                if proj in residual_names:
                    index = expand_index(d_out, config.dlr_rank, config.dlr_expand, config.dlr_seed, f"{layer_idx}.{proj}")
                    scale = config.dlr_alpha / math.sqrt(expansion_factor(d_out, config.dlr_rank))
                setattr(parent, proj, LowRankLinear(d_in, d_out, config.dlr_rank, config.dlr_activation, scale, index))
                count += 1
    return count
