"""LLaMA with factorized projections: the base model (AutoModel, what vLLM's Transformers backend
builds) and the causal LM. Shipped in model directories (remote code): torch and transformers only."""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers import initialization as init

from .configuration_dlr import DlrLlamaConfig
from .lowrank import LowRankLinear, factorize_projections

AUTO_MAP = {"AutoConfig": "configuration_dlr.DlrLlamaConfig", "AutoModel": "modeling_dlr.DlrLlamaModel",
            "AutoModelForCausalLM": "modeling_dlr.DlrLlamaForCausalLM"}


@torch.no_grad()
def _init_weights(self, module: torch.nn.Module) -> None:
    """HF's init, but CoLA's scale for the factors (not N(0, 0.02): it matters at low rank). HF
    visits children first, so A, then B, then their LowRankLinear (its scales) are initialised."""
    std = getattr(module, "dlr_init_std", None)
    if isinstance(module, torch.nn.Linear) and std is not None:  # a factor of a LowRankLinear
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
        return
    if not isinstance(module, LowRankLinear):
        return LlamaPreTrainedModel._init_weights(self, module)
    if module.has_trainable_latent:
        init.ones_(module.latent_scale_raw)  # c = tanh(1) at the start, as the reference
    if module.alpha_divisor is not None:
        init.constant_(module.dlr_alpha, module.dlr_scale * module.alpha_divisor)


class DlrLlamaModel(LlamaModel):
    config_class = DlrLlamaConfig
    _init_weights = _init_weights

    def post_init(self) -> None:
        # Swapped before HF's weight init runs, so it runs once, on the final modules.
        factorize_projections(self.layers, self.config)
        super().post_init()


class DlrLlamaForCausalLM(LlamaForCausalLM):
    config_class = DlrLlamaConfig
    _init_weights = _init_weights

    def post_init(self) -> None:
        # self.model is the LlamaModel that LlamaForCausalLM.__init__ built (and initialised):
        # factorize it here, and route its init to ours, which knows LowRankLinear.
        factorize_projections(self.model.layers, self.config)
        self.model._init_weights = self._init_weights
        super().post_init()

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        # transformers' TP (from_pretrained(tp_plan="auto")) shards the factors by the config's plan;
        # a residual or latent scale has none (B + s R is built whole), so refuse rather than replicate.
        tp = getattr(distributed_config, "tp_size", 1) or 1
        if tp > 1 and model.config.base_model_tp_plan is None:
            raise ValueError(f"tensor parallelism needs a folded model: this {model.config.dlr_method} model's residual "
                             "or latent scale is not folded into B (fold it first: dlr-fold ckpt=DIR)")
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    def save_pretrained(self, *args, **kwargs):
        # The base model's entry too: vLLM's Transformers backend builds it with AutoModel.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(*args, **kwargs)
