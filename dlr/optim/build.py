"""Build the optimizer named by the `optimizer` config group (configs/optimizer/*.yaml)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dlr.config import OPTIMIZER_SCHEMAS, build
from dlr.config.choices import FACTORIZED_METHODS, METHODS, OPTIMIZERS
from dlr.errors import ConfigError, bad_value
from dlr.optim.spectron import Spectron


def find_factor_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(module name, A, B) for every factorized layer, in `model.named_modules()` order.

    Duck-typed rather than `isinstance(m, LowRankLinear)`: a factorized layer is any module
    whose children `A` and `B` own trainable 2-D weights, A's [rank, d_in] and B's [d_out, rank],
    with a shared rank. This matches `dlr.hf.lowrank.LowRankLinear` and the same class when
    loaded as HF remote code (a different Python class), and it keeps this package free of
    an import of the model code. A wrapper (DDP, torch.compile) only prefixes the names.
    """
    pairs, seen = [], set()
    for name, module in model.named_modules():
        a, b = (getattr(module._modules.get(k), "_parameters", {}).get("weight") for k in ("A", "B"))
        if a is None or b is None or not (a.requires_grad and b.requires_grad):
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            continue
        if id(a) in seen or id(b) in seen:
            continue  # shared module reached twice (e.g. through a wrapper alias)
        seen.update((id(a), id(b)))
        pairs.append((name, a, b))
    return pairs


def _adamw_groups(params: list[tuple[str, nn.Parameter]], **hparams: Any) -> list[dict[str, Any]]:
    """Decay 2-D weights (embeddings, lm_head, projections); never norms, biases, 1-D."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    wd = hparams.pop("weight_decay")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": wd, **hparams})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **hparams})
    return groups


def _trainable(model: nn.Module, exclude: set[int] = frozenset()) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() deduplicates tied weights (embed_tokens / lm_head).
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in exclude]


def spectron_param_groups(
    model: nn.Module, *, lr: float, adamw_lr: float, weight_decay: float, adamw_weight_decay: float, spectron: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One Spectron group with all factor pairs, then the AdamW groups for the rest."""
    pairs = find_factor_pairs(model)
    factors = [p for _, a, b in pairs for p in (a, b)]
    groups: list[dict[str, Any]] = []
    if factors:
        groups.append({"params": factors, "spectron": True, "lr": lr, "weight_decay": weight_decay, **spectron})
    rest = _trainable(model, {id(p) for p in factors})
    groups += _adamw_groups(rest, lr=adamw_lr, weight_decay=adamw_weight_decay, spectron=False)
    return groups


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module, method: str, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer for `model` trained with `method` ("full" | "lowrank" | "dlr").

    cfg: the optimizer section (a dlr.config.AdamWConfig / SpectronConfig, or a mapping with
    their keys, checked there; unknown keys are refused). fused: AdamW's single-kernel
    implementation (the trainer asks for it on CUDA); Spectron ignores it.
    """
    name = cfg.get("name") if isinstance(cfg, Mapping) else getattr(cfg, "name", None)
    if name not in OPTIMIZERS:
        raise bad_value("optimizer", name, OPTIMIZERS)
    if method not in METHODS:
        raise bad_value("method", method, METHODS)
    schema = OPTIMIZER_SCHEMAS[name]
    c = cfg if isinstance(cfg, schema) else build(schema, {k: v for k, v in cfg.items() if k != "defaults"}, "optimizer.")
    betas = tuple(float(b) for b in c.betas)

    if name == "adamw":
        groups = _adamw_groups(_trainable(model), lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.AdamW(groups, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay, fused=fused or None)

    if method not in FACTORIZED_METHODS:
        raise ConfigError(
            f"optimizer='spectron' is not valid with method={method!r}; accepted: method=lowrank, dlr (or optimizer=adamw)"
        )
    if not find_factor_pairs(model):
        raise ConfigError(
            f"optimizer='spectron' found no factorized layers (A/B parameter pairs) in the {method} model; use optimizer=adamw"
        )
    groups = spectron_param_groups(
        model,
        lr=c.lr,
        adamw_lr=c.lr if c.adamw_lr is None else c.adamw_lr,
        weight_decay=c.weight_decay,
        adamw_weight_decay=c.weight_decay if c.adamw_weight_decay is None else c.adamw_weight_decay,
        spectron=dict(momentum=c.momentum, ns_steps=c.ns_steps, power_init_iters=c.power_init_iters,
                      ns_dtype=c.ns_dtype, seed=c.seed),
    )
    return Spectron(groups, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay)
