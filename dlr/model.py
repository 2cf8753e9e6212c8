"""Build a full / low-rank / DLR LLaMA from a zoo size and the factorization options."""
from __future__ import annotations

import torch

from .errors import ConfigError, bad_value
from .hf import DlrLlamaConfig, DlrLlamaForCausalLM
from .zoo import EOS_ID, PAD_ID, VOCAB_SIZE, LlamaSize, get_size


def make_config(
    size: str | LlamaSize,
    method: str = "dlr",
    rank: int | None = None,
    alpha: float = 1.0,
    activation: str = "silu",
    expand: str = "uniform",
    scope: str = "all",
    seed: int = 0,
    vocab_size: int = VOCAB_SIZE,
    variance_correction: bool = True,
    trainable_alpha: bool = False,
    latent_alpha: float | None = None,
    trainable_latent_scale: bool = False,
    bias: bool = False,
) -> DlrLlamaConfig:
    """Validate every option and return the HF config; raises ConfigError on bad input."""
    spec = get_size(size) if isinstance(size, str) else size
    if rank is None:
        rank = spec.default_rank
    check_factorization(method, rank, alpha, activation, expand, scope, spec.hidden_size, spec.intermediate_size,
                        variance_correction=variance_correction, trainable_alpha=trainable_alpha,
                        latent_alpha=latent_alpha, trainable_latent_scale=trainable_latent_scale, bias=bias,
                        where=f" (the smallest projection dim of {spec.name})")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise bad_value("vocab_size", vocab_size, "a positive integer")
    return DlrLlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        num_hidden_layers=spec.num_hidden_layers,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
        dlr_size=spec.name,
        dlr_method=method,
        dlr_rank=None if method == "full" else rank,
        dlr_activation=activation,
        dlr_alpha=float(alpha),
        dlr_expand=expand,
        dlr_scope=scope,
        dlr_seed=int(seed),
        dlr_folded=False,
        dlr_variance_correction=variance_correction,
        dlr_trainable_alpha=trainable_alpha,
        dlr_latent_alpha=None if latent_alpha is None else float(latent_alpha),
        dlr_trainable_latent_scale=trainable_latent_scale,
        dlr_bias=bias,
    )


OPTIONS = ("activation", "expand", "scope", "seed", "vocab_size", "variance_correction", "trainable_alpha",
           "latent_alpha", "trainable_latent_scale", "bias")


def check_factorization(method: str, rank: int | None, alpha: float, activation: str, expand: str, scope: str,
                        hidden_size: int, intermediate_size: int, *, variance_correction: bool = True,
                        trainable_alpha: bool = False, latent_alpha: float | None = None,
                        trainable_latent_scale: bool = False, bias: bool = False, prefix: str = "",
                        where: str = "") -> None:
    """The one check of the factorization settings, for make_config and for a saved config.json.

    Choices and ranges come from the schema (dlr.schema.TrainConfig); the rank bound needs the
    model's dims. `prefix` names the keys as the caller's user knows them (e.g. "dlr_").
    """
    from .schema import TrainConfig, check_field

    for name, value in (("method", method), ("activation", activation), ("expand", expand), ("scope", scope),
                        ("alpha", alpha), ("variance_correction", variance_correction),
                        ("trainable_alpha", trainable_alpha), ("latent_alpha", latent_alpha),
                        ("trainable_latent_scale", trainable_latent_scale), ("bias", bias)):
        check_field(TrainConfig, name, value, prefix + name)
    if latent_alpha is not None and trainable_latent_scale:
        raise ConfigError(f"{prefix}latent_alpha={latent_alpha!r} has no effect with {prefix}trainable_latent_scale=true "
                          "(the trainable scale is tanh(p), p starting at 1); accepted: one of the two")
    smallest = min(hidden_size, intermediate_size)
    if method != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < smallest):
        raise bad_value(prefix + "rank", rank, f"an integer with 0 < rank < {smallest}{where}")


def build_from_config(config: DlrLlamaConfig, device: str | torch.device | None = None) -> DlrLlamaForCausalLM:
    """Instantiate with SDPA attention (flash / memory-efficient kernels on GPU)."""
    config._attn_implementation = "sdpa"
    if device is None:
        return DlrLlamaForCausalLM(config)
    with torch.device(device):
        return DlrLlamaForCausalLM(config)


def build_model(
    model: str | LlamaSize,
    method: str = "dlr",
    rank: int | None = None,
    alpha: float = 1.0,
    device: str | torch.device | None = None,
    **options,
) -> DlrLlamaForCausalLM:
    """`dlr.build_model("llama_60m", method="dlr", rank=128)`; device="meta" allocates nothing.

    options: activation ("silu" | "identity" | "gelu" | "relu"), expand ("uniform" |
    "random_reuse" | "permuted"), scope ("all" | "attn" | "mlp"), seed (random_reuse /
    permuted), vocab_size, variance_correction (True), trainable_alpha (False),
    latent_alpha (None), trainable_latent_scale (False), bias (False).
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}; accepted: {', '.join(OPTIONS)}")
    return build_from_config(make_config(model, method, rank, alpha, **options), device)
