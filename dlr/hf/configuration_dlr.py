"""Config of a LLaMA with low-rank projections and an optional DLR residual (shipped: transformers only)."""
from __future__ import annotations

from transformers import LlamaConfig


class DlrLlamaConfig(LlamaConfig):
    """LlamaConfig plus the factorization. dlr_method: full | lowrank (y = B act(A x)) | dlr (plus
    the residual (alpha/sqrt(K)) Expand_K(z)); dlr_folded: residual and latent scale folded into B.
    The reference's knobs: dlr_variance_correction (s = alpha/sqrt(K), else alpha), dlr_trainable_alpha,
    dlr_latent_alpha (fixed latent scale latent_alpha / r), a trainable latent scale (tanh of a
    scalar, initialised to 1), dlr_bias (LLaMA's attention_bias / mlp_bias match it)."""

    model_type = "dlr_llama"

    dlr_size: str | None = None
    dlr_method: str = "lowrank"
    dlr_rank: int | None = None
    dlr_activation: str = "silu"
    dlr_alpha: float = 1.0
    dlr_expand: str = "uniform"
    dlr_scope: str = "all"
    dlr_seed: int = 0
    dlr_folded: bool = False
    dlr_variance_correction: bool = True
    dlr_trainable_alpha: bool = False
    dlr_latent_alpha: float | None = None
    dlr_trainable_latent_scale: bool = False
    dlr_bias: bool = False
