"""The factorized projection with an optional Duplicated Latent Residual (DLR).

    z = act(A x),  y = B z + s * Expand_K(z),  s = alpha / sqrt(K),  K = ceil(d_out / r)

Expand_K copies latent coordinate index[o] into output o. It is linear in z, so
Expand_K(z) = R z with R a fixed one-hot [d_out, r] matrix, and we compute the residual
through the effective up weight B + s R: no [tokens, d_out] expansion is ever built, and
the gradient w.r.t. B is unchanged. Folding writes B + s R into B for good.

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

    @property
    def has_residual(self) -> bool:
        return self.dlr_index is not None

    def effective_B(self) -> torch.Tensor:
        if self.dlr_index is None:
            return self.B
        # Out of place, so autograd sees B + s R and B's gradient is exactly dL/dB_eff;
        # each row o gets s added at column index[o]: one scatter kernel, no sort. The
        # scale column is filled on B's device (a fill kernel): turning the Python float
        # into a tensor on the host would be a blocking host-to-device copy every call.
        src = torch.full((self.out_features, 1), self.dlr_scale, dtype=self.B.dtype, device=self.B.device)
        return self.B.scatter_add(1, self.dlr_index.unsqueeze(1), src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.A)
        if self.activation == "silu":
            z = F.silu(z)
        return F.linear(z, self.effective_B())

    @torch.no_grad()
    def fold_(self) -> bool:
        """B <- B + s R; the layer is then a plain low-rank layer. False if nothing to fold."""
        if self.dlr_index is None:
            return False
        self.B.copy_(self.effective_B())
        del self._buffers["dlr_index"]
        self.dlr_index = None
        self.dlr_scale = 0.0
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
