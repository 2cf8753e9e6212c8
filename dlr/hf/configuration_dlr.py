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


__all__ = ["DlrLlamaConfig"]
