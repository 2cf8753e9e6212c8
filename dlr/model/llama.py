"""Build a full / low-rank / DLR LLaMA from a zoo size and the factorization options."""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from ..config import FactorizationConfig, build, check_field, method_named
from ..errors import ConfigError, bad_value
from ..hf import DlrLlamaConfig, DlrLlamaForCausalLM
from .sizes import EOS_ID, PAD_ID, VOCAB_SIZE, LlamaSize, get_size


# Each factorization setting is stored in config.json as dlr_<name>.
_HF_FIELDS = {f.name: f"dlr_{f.name}" for f in dataclasses.fields(FactorizationConfig)}


def factorization(method: str = "dlr", rank: int | None = None, alpha: float = 1.0, **knobs) -> FactorizationConfig:
    """A checked factorization section from keyword arguments (rank None: the size's default)."""
    return build(FactorizationConfig, {"method": method, "rank": rank, "alpha": alpha, **knobs})


def make_config(size: str | LlamaSize, fact: FactorizationConfig, *, seed: int = 0,
                vocab_size: int = VOCAB_SIZE) -> DlrLlamaConfig:
    """The one place a factorization section becomes the HF model config; ConfigError on bad input.

    `fact`: a section built by dlr.config (a TrainConfig's, or `factorization(...)`), whose settings
    were each checked there; what ties them together and to the size is checked here."""
    spec = get_size(size) if isinstance(size, str) else size
    rank = spec.default_rank if fact.rank is None else fact.rank
    check_combination(fact, rank, spec.hidden_size, spec.intermediate_size,
                      where=f" (the smallest projection dim of {spec.name})")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise bad_value("vocab_size", vocab_size, "a positive integer")
    dlr_fields = {hf: getattr(fact, name) for name, hf in _HF_FIELDS.items()}
    dlr_fields.update(dlr_rank=rank if method_named(fact.method).factorized else None)
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
        attention_bias=fact.bias,
        mlp_bias=fact.bias,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
        dlr_size=spec.name,
        dlr_seed=seed,
        dlr_folded=False,
        **dlr_fields,
    )


def factorization_of(config: DlrLlamaConfig) -> FactorizationConfig:
    """The factorization section a saved config.json describes (unchecked: see check_factorization)."""
    return FactorizationConfig(**{name: getattr(config, hf) for name, hf in _HF_FIELDS.items()})


def deploy_config(config: DlrLlamaConfig) -> DlrLlamaConfig:
    """The config of the model `config` deploys as (a copy): folded into its method's deploys_as
    layout (no residual, no latent scale; the bias kept), or itself when there is nothing to fold."""
    method, out = method_named(config.dlr_method), copy.deepcopy(config)
    if method.folds(factorization_of(config)):
        target = method_named(method.deploys_as)
        out.dlr_method, out.dlr_folded = target.name, True
        out.dlr_rank = out.dlr_rank if target.factorized else None
    return out


def check_factorization(fact: FactorizationConfig, rank: int | None, hidden_size: int, intermediate_size: int, *,
                        prefix: str = "", where: str = "") -> None:
    """Each factorization setting's declared range, and what ties them together: for a saved
    config.json, whose values no dlr.config build has checked; `prefix` names the keys as the
    caller's user knows them (e.g. "dlr_" in config.json).
    """
    for name in _HF_FIELDS:
        if name != "rank":
            check_field(FactorizationConfig, name, getattr(fact, name), prefix + name)
    check_combination(fact, rank, hidden_size, intermediate_size, prefix=prefix, where=where)


def check_combination(fact: FactorizationConfig, rank: int | None, hidden_size: int, intermediate_size: int, *,
                      prefix: str = "", where: str = "") -> None:
    """What ties the factorization settings together and to the size (the rank fits its projections)."""
    if fact.latent_alpha is not None and fact.trainable_latent_scale:
        raise ConfigError(f"{prefix}latent_alpha={fact.latent_alpha!r} has no effect with "
                          f"{prefix}trainable_latent_scale=true (the trainable scale is tanh(p), p starting at 1); "
                          "accepted: one of the two")
    smallest = min(hidden_size, intermediate_size)
    if method_named(fact.method).factorized and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < smallest):
        raise bad_value(prefix + "rank", rank, f"an integer with 0 < rank < {smallest}{where}")


def build_from_config(config: DlrLlamaConfig, device: str | torch.device | None = None) -> DlrLlamaForCausalLM:
    """Instantiate with SDPA attention (flash / memory-efficient kernels on GPU); a method whose
    layers dlr/hf does not ship swaps its own in (not once folded: then it is its deploys_as layout)."""
    config._attn_implementation = "sdpa"
    method = method_named(config.dlr_method)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = DlrLlamaForCausalLM(config)
        if method.build is not None and not config.dlr_folded:
            method.build(model)
    return model


def build_model(
    model: str | LlamaSize,
    method: str = "dlr",
    rank: int | None = None,
    alpha: float = 1.0,
    device: str | torch.device | None = None,
    **options,
) -> DlrLlamaForCausalLM:
    """`dlr.build_model("llama_60m", method="dlr", rank=128)`; device="meta" allocates nothing.

    options: seed (random_reuse / permuted), vocab_size, and the other settings of
    dlr.config.FactorizationConfig (activation, expand, scope, ...).
    """
    seed, vocab_size = options.pop("seed", 0), options.pop("vocab_size", VOCAB_SIZE)
    knobs = set(_HF_FIELDS) - {"method", "rank", "alpha"}
    if set(options) - knobs:
        accepted = ", ".join(["seed", "vocab_size", *sorted(knobs)])
        raise ConfigError(f"unknown option(s) {sorted(set(options) - knobs)}; accepted: {accepted}")
    config = make_config(model, factorization(method, rank, alpha, **options), seed=seed, vocab_size=vocab_size)
    return build_from_config(config, device)
