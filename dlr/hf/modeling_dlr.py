"""LlamaForCausalLM with factorized projections; loads through AutoModelForCausalLM.

Copied into saved model directories as HF remote code (with configuration_dlr.py and
lowrank.py), so the folded model can be used without installing dlr.
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dlr import DlrLlamaConfig
from .lowrank import LowRankLinear, cola_init_std, factorize_projections


class DlrLlamaForCausalLM(LlamaForCausalLM):
    config_class = DlrLlamaConfig
    # Set by the trainer to fused_loss(hidden, lm_head_weight, labels, num_items) -> loss: the
    # loss is then computed from the hidden states without [tokens, vocab] logits (dlr.loss).
    # Inside forward, so DDP/FSDP hooks see it. None (loaded models, generate()): plain HF.
    fused_loss = None

    def __init__(self, config: DlrLlamaConfig) -> None:
        super().__init__(config)

    def forward(self, input_ids=None, labels=None, **kwargs):
        if self.fused_loss is None or labels is None:
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.setdefault("use_cache", False)
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(loss=self.fused_loss(hidden, self.lm_head.weight, labels, num_items))

    def post_init(self) -> None:
        # LlamaForCausalLM.__init__ ends with post_init(); swapping the projections here
        # means HF's weight init runs exactly once, on the final modules.
        factorize_projections(self, self.config)
        # HF initialises a sub-model (self.model, a plain LlamaModel) with that sub-model's
        # own _init_weights, which knows nothing of LowRankLinear; route it to ours.
        self.model._init_weights = self._init_weights
        super().post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, LowRankLinear):
            # HF's generic init would draw N(0, 0.02); CoLA's scale matters for low rank.
            std = cola_init_std(module.in_features, module.out_features, module.rank)
            init.normal_(module.A, mean=0.0, std=std)
            init.normal_(module.B, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            if module.has_trainable_latent_scale:
                init.ones_(module.latent_scale_raw)  # c = tanh(1) at the start, as the reference
            if module.alpha_divisor is not None:
                init.constant_(module.dlr_alpha, module.dlr_scale * module.alpha_divisor)
        else:
            super()._init_weights(module)


__all__ = ["DlrLlamaForCausalLM"]
