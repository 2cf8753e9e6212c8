"""Export to a plain dense `LlamaForCausalLM` (no remote code needed to load it).

Only exact for activation=identity: there y = B (A x), so W = B A multiplies out. With SiLU,
y = B silu(A x) is not linear in x and no dense matrix reproduces it, so we refuse.
A DLR residual is included through the effective up weight B + sR (folded or not).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..atomic import atomic_dir
from ..config import method_named
from ..errors import ConfigError
from ..hf import DlrLlamaConfig, DlrLlamaForCausalLM
from ..hf.lowrank import LowRankLinear
from .model_dir import finish_model_dir, save_pretrained_quietly, write_errors


def dense_refusal(config: DlrLlamaConfig) -> str | None:
    """Why this model cannot be exported dense, or None if it can."""
    if not method_named(config.dlr_method).exports_dense(config.dlr_activation):
        return (
            f"dense export needs activation=identity (y = B A x); this checkpoint uses "
            f"activation={config.dlr_activation!r}, where y = B {config.dlr_activation}(A x) is not a linear map, "
            "so no dense weight reproduces it. Use the folded low-rank directory (loads with trust_remote_code=True)"
        )
    return None


def dense_config(config: DlrLlamaConfig) -> LlamaConfig:
    """The same LLaMA, minus every dlr_* field and the remote-code auto_map."""
    d = config.to_dict()
    for key in list(d):
        if key.startswith("dlr_") or key in ("auto_map", "model_type", "architectures", "transformers_version"):
            d.pop(key)
    return LlamaConfig(**d)


@torch.no_grad()
def export_dense(model: DlrLlamaForCausalLM) -> LlamaForCausalLM:
    """Dense LlamaForCausalLM computing the same function as `model` (identity activation).

    Built on meta and filled tensor by tensor, so memory is the dense model plus one
    projection's product at a time (the dense 7B is ~4x the low-rank one, unavoidably).
    The product is taken in fp32 even for a bf16 model, then stored in the model's dtype.
    """
    reason = dense_refusal(model.config)
    if reason:
        raise ConfigError(reason)
    config = dense_config(model.config)
    config._attn_implementation = "sdpa"
    device = next(model.parameters()).device
    with torch.device("meta"):
        dense = LlamaForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0].removesuffix(".A").removesuffix(".B") not in lowrank:
            state[name] = t
    for name, m in lowrank.items():
        w = m.up_weight().float() @ m.A.weight.float()
        state[f"{name}.weight"] = w.to(m.A.weight.dtype)
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias
    dense.load_state_dict(state, strict=True, assign=True)
    # Non-persistent rotary buffers are not in the state dict: rebuild them on the real device.
    with torch.device("cpu"):
        rotary = type(dense.model.rotary_emb)(config=config)
    dense.model.rotary_emb = rotary.to(device)
    dense.generation_config = model.generation_config
    return dense.eval()


def save_dense_dir(dense: LlamaForCausalLM, tokenizer: Any, out_dir: str | os.PathLike, files: dict | None = None,
                   extra: dict | None = None) -> Path:
    """Atomic write like save_model_dir, with the same card and record (dlr-eval verifies and
    reads it); the result loads with plain AutoModelForCausalLM."""
    with write_errors(out_dir), atomic_dir(out_dir) as tmp:
        save_pretrained_quietly(dense, tmp)
        finish_model_dir(tmp, extra, tokenizer=tokenizer, files=files)
    return Path(out_dir).expanduser().absolute()

