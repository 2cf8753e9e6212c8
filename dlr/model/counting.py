"""Parameter counts and FLOPs per token, read off the built modules (meta device is fine).

FLOPs follow the PaLM / MFU convention: forward = 2 * (matmul parameters, lm_head
included, input embedding excluded) + 4 * layers * seq_len * hidden for attention scores
and values; training = 3 * forward. A DLR layer costs what its low-rank layer costs: the
residual goes through the effective weight B + sR, and folds away for deployment.
Biases and the trainable alpha / latent scale (one element per layer) count as parameters,
not as matmul FLOPs; the fold removes alpha and the latent scale, so they never reach deployment.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    non_embedding_params: int
    embedding_params: int
    forward_flops_per_token: int
    train_flops_per_token: int
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def _matmul_params(module: nn.Module) -> int:
    # A LowRankLinear's factors are nn.Linear children: r (d_in + d_out) is counted through them.
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def model_stats(model: nn.Module, seq_len: int = 256) -> ModelStats:
    """Counts for a built causal LM (HF LLaMA layout: model.embed_tokens, lm_head)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    matmul = sum(_matmul_params(m) for m in model.modules())
    cfg = model.config
    attention = 4 * cfg.num_hidden_layers * seq_len * cfg.hidden_size
    forward = 2 * matmul + attention
    return ModelStats(total, total - embedding, embedding, forward, 3 * forward, seq_len)


def zoo_table(seq_len: int = 256) -> str:
    """Markdown table of every zoo size, full vs low-rank at its default rank (docs/models.md)."""
    from ..config import FULL, LOWRANK
    from .llama import build_model
    from .sizes import get_size, size_names

    rows = [
        "| size | hidden / inter / heads / layers | rank | full params | low-rank params | full non-emb | low-rank non-emb | full GFLOPs/tok (fwd) | low-rank GFLOPs/tok (fwd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = sorted(size_names(), key=lambda n: model_stats(build_model(n, FULL.name, device="meta")).total_params)
    for name in sizes:
        s = get_size(name)
        full = model_stats(build_model(name, FULL.name, device="meta"), seq_len)
        low = model_stats(build_model(name, LOWRANK.name, device="meta"), seq_len)
        rows.append(
            f"| {name} | {s.hidden_size} / {s.intermediate_size} / {s.num_attention_heads} / {s.num_hidden_layers} "
            f"| {s.default_rank} | {full.total_params:,} | {low.total_params:,} | {full.non_embedding_params:,} "
            f"| {low.non_embedding_params:,} | {full.forward_flops_per_token / 1e9:.3f} | {low.forward_flops_per_token / 1e9:.3f} |"
        )
    return "\n".join(rows) + "\n"
