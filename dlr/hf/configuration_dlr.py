"""Config of a LLaMA with low-rank projections and an optional DLR residual (shipped: transformers only)."""
from __future__ import annotations

from transformers import LlamaConfig

COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


class DlrLlamaConfig(LlamaConfig):
    """LlamaConfig plus the factorization. dlr_method: full | lowrank (y = B act(A x)) | dlr (plus
    the residual (alpha/sqrt(K)) Expand_K(z)); dlr_folded: residual and latent scale folded into B.
    The reference's knobs: dlr_variance_correction (s = alpha/sqrt(K), else alpha), dlr_trainable_alpha,
    dlr_latent_alpha (fixed latent scale latent_alpha / r), dlr_trainable_latent_scale (tanh of a
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

    @property
    def base_model_tp_plan(self) -> dict[str, str] | None:
        """Tensor parallelism for transformers (tp_plan="auto") and vLLM's Transformers backend: B
        column-parallel for q, k, v, gate, up (A replicated); A row-parallel for o and down (B
        replicated), reduced before the activation, so each all-reduce carries r values per token.
        None (nothing to shard) while a residual or latent scale is unfolded: fold the model first."""
        if self.dlr_method == "full":
            return LlamaConfig.base_model_tp_plan
        latent = self.dlr_latent_alpha is not None or self.dlr_trainable_latent_scale
        if not self.dlr_folded and (self.dlr_method == "dlr" or latent):
            return None
        return {**{f"layers.*.{p}.B": "colwise" for p in COLWISE}, **{f"layers.*.{p}.A": "rowwise" for p in ROWWISE}}
