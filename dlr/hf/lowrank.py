"""The factorized projection y = c (B + s R) act(A x) + b, and the swap of LLaMA's projections.

R is the fixed one-hot [d_out, r] matrix of Expand_K (output o reads latent index[o]), s =
alpha / sqrt(K) (or alpha), K = ceil(d_out / r), c an optional latent scale, b an optional
bias. The residual goes through the up weight, with no [tokens, d_out] expansion, unless an engine
replaced B (engine_forward). Folding writes c (B + s R) into B. Shipped (remote code): torch only.
"""
from __future__ import annotations

import hashlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESIDUAL_PROJECTIONS = {"all": PROJECTIONS, "attn": PROJECTIONS[:4], "mlp": PROJECTIONS[4:]}


def expansion_factor(d_out: int, rank: int) -> int:
    return math.ceil(d_out / rank)


def reference_seed(seed: int, name: str) -> int:
    """The generator seed of the authors' reference layer for (run seed, module name)."""
    return (int(seed) ^ int.from_bytes(hashlib.md5(name.encode()).digest()[:8], "little")) % (2**63 - 1)


def expand_index(d_out: int, rank: int, mode: str, seed: int, name: str) -> torch.Tensor:
    """Latent feeding each output (on the CPU, so `meta` builds have it). uniform: o // K;
    random_reuse: drawn with replacement as the reference (name "model.layers.0.self_attn.q_proj");
    permuted: the uniform index shuffled (name "0.q_proj")."""
    if mode == "random_reuse":
        gen = torch.Generator(device="cpu").manual_seed(reference_seed(seed, name))
        return torch.randint(0, rank, (d_out,), generator=gen, device="cpu", dtype=torch.long)
    index = torch.arange(d_out, device="cpu") // expansion_factor(d_out, rank)
    if mode == "permuted":
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        index = index[torch.randperm(d_out, generator=gen, device="cpu")]
    return index


def cola_init_std(d_in: int, d_out: int, rank: int) -> float:
    """CoLA: A, B ~ N(0, std) so that B A has entries of std (d_in + d_out)^-1/2."""
    return rank**-0.25 * (d_in + d_out) ** -0.25


class LowRankLinear(nn.Module):
    """y = c (B + s R) act(A x) + b with the factors A = nn.Linear(d_in, r), B = nn.Linear(r, d_out,
    bias=b). dlr_index (s = dlr_scale) adds the residual; the reference's knobs:
    trainable_alpha_divisor (s = Parameter dlr_alpha / divisor), latent_scale (fixed c),
    trainable_latent (c = tanh(latent_scale_raw)), bias (b)."""

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str = "silu",
                 dlr_scale: float = 0.0, dlr_index: torch.Tensor | None = None, *,
                 trainable_alpha_divisor: float | None = None, latent_scale: float | None = None,
                 trainable_latent: bool = False, bias: bool = False) -> None:
        super().__init__()
        if trainable_latent and latent_scale is not None:
            raise ValueError("latent_scale (fixed) and trainable_latent exclude each other")
        self.in_features, self.out_features, self.rank, self.activation = in_features, out_features, rank, activation
        # Standard linear modules, so a serving engine swaps in its own (GEMM kernels, quantization,
        # tensor-parallel styles); skip_init draws nothing from the RNG (CoLA's init does, A then B).
        device = torch.get_default_device()
        self.A = nn.utils.skip_init(nn.Linear, in_features, rank, bias=False, device=device)
        self.B = nn.utils.skip_init(nn.Linear, rank, out_features, bias=bias, device=device)
        # Read by the model's _init_weights (HF visits A, then B, then this module).
        self.A.dlr_init_std = self.B.dlr_init_std = cola_init_std(in_features, out_features, rank)
        if bias:
            nn.init.zeros_(self.B.bias)
        self.dlr_scale, self.alpha_divisor, self.dlr_index = float(dlr_scale), None, None
        if dlr_index is not None:  # persistent: it travels with the weights; on the buffers' device
            del self.dlr_index  # (vLLM builds parameters on meta but loads buffers in place)
            self.register_buffer("dlr_index", dlr_index.to(device=torch.get_default_device(), dtype=torch.long))
        if trainable_alpha_divisor is not None and dlr_index is not None:
            self.alpha_divisor = float(trainable_alpha_divisor)  # dlr_alpha of shape [1]: FSDP2 refuses 0-d
            self.dlr_alpha = nn.Parameter(torch.full((1,), self.dlr_scale * self.alpha_divisor, device=device))
        self.latent_scale = None if latent_scale is None else float(latent_scale)
        if trainable_latent:
            self.latent_scale_raw = nn.Parameter(torch.ones(1, device=device))

    has_trainable_latent = property(lambda self: "latent_scale_raw" in self._parameters)
    has_latent_scale = property(lambda self: self.latent_scale is not None or self.has_trainable_latent)
    has_residual = property(lambda self: self.dlr_index is not None)
    bias = property(lambda self: self.B.bias)
    # Neither residual nor latent scale: the forward is B(act(A(x))), the factors' own modules.
    is_plain = property(lambda self: self.dlr_index is None and not self.has_latent_scale)

    def residual_scale(self) -> torch.Tensor | float:
        return self.dlr_alpha / self.alpha_divisor if self.alpha_divisor is not None else self.dlr_scale

    def latent_multiplier(self) -> torch.Tensor | float | None:
        return torch.tanh(self.latent_scale_raw) if self.has_trainable_latent else self.latent_scale

    def up_weight(self) -> torch.Tensor:
        """c (B + s R), the weight z is multiplied by, and what the fold writes into B."""
        w = self.B.weight
        if self.dlr_index is not None:
            if self.alpha_divisor is None and not self.has_latent_scale and self.bias is None:
                # The default layer: s added at (o, index[o]) by one scatter, in B's dtype (the
                # kernel the trainer uses, so a fold gives bitwise the trained function).
                scale = torch.full((self.out_features, 1), self.dlr_scale, dtype=w.dtype, device=w.device)
                w = w.scatter_add(1, self.dlr_index.unsqueeze(1), scale)
            else:  # pointwise, so a trainable s gets its gradient
                cols = torch.arange(self.rank, device=w.device)
                w = torch.where(cols == self.dlr_index.unsqueeze(1), w + self.residual_scale(), w)
        c = self.latent_multiplier()
        return w if c is None else w * c

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        z = self.A(x)
        return z if self.activation == "identity" else getattr(F, self.activation)(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_plain:  # calls B itself, so an engine's replacement of B runs
            # On rows, [tokens, d]: vLLM's CPU int8 kernel (the AMX one) takes 2-D inputs only,
            # and its Transformers backend passes [1, tokens, d]. A view; the same matmuls.
            return self.B(self.latent(x.reshape(-1, x.shape[-1]))).reshape(*x.shape[:-1], -1)  # -1: a TP rank's columns
        z = self.latent(x)
        if not isinstance(self.B, nn.Linear):
            return self.engine_forward(z)
        return F.linear(z, self.up_weight(), self.bias)

    def engine_forward(self, z: torch.Tensor) -> torch.Tensor:
        """c (B + s R) z + b as B(c z) + s (c z)[index], for a B that a serving engine replaced with
        its own layer (vLLM repacks the weight for its kernels, so B + s R cannot be built)."""
        c = self.latent_multiplier()
        z = z if c is None else z * c
        y = self.B(z)
        return y if self.dlr_index is None else y + self.residual_scale() * z[..., self.dlr_index]

    @torch.no_grad()
    def fold_(self) -> bool:
        """B <- c (B + s R) (the same ops as the forward), dropping index, alpha and latent scale."""
        if self.is_plain:
            return False
        self.B.weight.copy_(self.up_weight())
        self._buffers.pop("dlr_index", None)
        self._parameters.pop("dlr_alpha", None)
        self._parameters.pop("latent_scale_raw", None)
        self.dlr_index = self.alpha_divisor = self.latent_scale = None
        self.dlr_scale = 0.0
        return True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, act={self.activation}, residual={self.has_residual}"


def factorize_projections(layers: nn.ModuleList, config) -> int:
    """Swap the dense projections of every layer before weight init; returns how many. A folded
    config gets neither residual nor latent scale: a plain lowrank model's layout."""
    if config.dlr_method == "full" or config.dlr_rank is None:  # no rank: a dense method
        return 0
    unfolded, rank, count = not config.dlr_folded, config.dlr_rank, 0
    residual = RESIDUAL_PROJECTIONS[config.dlr_scope] if config.dlr_method == "dlr" and unfolded else ()
    latent_alpha = config.dlr_latent_alpha if unfolded else None
    for i, layer in enumerate(layers):
        for part, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for proj in (p for p in PROJECTIONS if hasattr(parent, p)):
                d_in, d_out = getattr(parent, proj).in_features, getattr(parent, proj).out_features
                index, scale, divisor = None, 0.0, None
                if proj in residual:
                    name = f"{i}.{proj}" if config.dlr_expand == "permuted" else f"model.layers.{i}.{part}.{proj}"
                    index = expand_index(d_out, rank, config.dlr_expand, config.dlr_seed, name)
                    root_k = math.sqrt(expansion_factor(d_out, rank)) if config.dlr_variance_correction else 1.0
                    scale = config.dlr_alpha / root_k
                    divisor = root_k if config.dlr_trainable_alpha else None
                setattr(parent, proj, LowRankLinear(
                    d_in, d_out, rank, config.dlr_activation, scale, index, trainable_alpha_divisor=divisor,
                    latent_scale=None if latent_alpha is None else latent_alpha / rank,
                    trainable_latent=unfolded and config.dlr_trainable_latent_scale, bias=config.dlr_bias))
                count += 1
    return count
