"""Hugging Face config for a LLaMA whose projections are low-rank, with optional DLR.

This file is copied into every saved model directory (HF remote code), so it may import
only torch/transformers and its sibling files.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class DlrLlamaConfig(LlamaConfig):
    """LlamaConfig plus the factorization settings.

    dlr_method: "full" (dense), "lowrank" (y = B act(A x)) or "dlr" (low-rank plus the
    fixed residual (alpha/sqrt(K)) Expand_K(z)). A folded DLR model keeps dlr_method="dlr"
    with dlr_folded=True: it has no residual left and the exact layout of a lowrank model.
    dlr_folded=True also means a latent scale has been folded into B (lowrank too).

    The reference layer's knobs: dlr_variance_correction (s = alpha/sqrt(K), else alpha),
    dlr_trainable_alpha (one scalar per residual layer), dlr_latent_alpha (fixed latent
    scale latent_alpha / r; None = 1), dlr_trainable_latent_scale (tanh of a scalar per
    layer, initialised to 1), dlr_bias (an output bias on every projection; LLaMA's
    attention_bias / mlp_bias carry the same value for the dense layers).
    """

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

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return super().from_dict(upgrade_legacy(config_dict), **kwargs)


# The first key added with the reference layer's knobs: a config.json without it was written
# before `expand=random_reuse` took the reference's meaning (draws with replacement).
KNOBS_MARKER = "dlr_variance_correction"


def upgrade_legacy(config_dict: dict) -> dict:
    """An older config.json's `random_reuse` was the balanced permutation, now `permuted`.

    Its index is in the safetensors either way; this keeps the name honest, and a rebuilt
    index (e.g. on `meta`) the same as the saved one.
    """
    if isinstance(config_dict, dict) and KNOBS_MARKER not in config_dict and config_dict.get("dlr_expand") == "random_reuse":
        config_dict = {**config_dict, "dlr_expand": "permuted"}
    return config_dict


__all__ = ["DlrLlamaConfig", "upgrade_legacy"]
