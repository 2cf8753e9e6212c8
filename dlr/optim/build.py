"""Build the optimizer named by the `optimizer` config group (configs/optimizer/*.yaml)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dlr.errors import ConfigError, bad_value
from dlr.optim.spectron import NS_DTYPES, Spectron

OPTIMIZERS = ("adamw", "spectron")
METHODS = ("full", "lowrank", "dlr")
# Methods whose projections are factor pairs Spectron can step.
FACTORIZED_METHODS = ("lowrank", "dlr")


def find_factor_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(module name, A, B) for every factorized layer, in `model.named_modules()` order.

    Duck-typed rather than `isinstance(m, LowRankLinear)`: a factorized layer is any module
    that directly owns trainable 2-D Parameters named `A` [rank, d_in] and `B` [d_out, rank]
    with a shared rank. This matches `dlr.hf.lowrank.LowRankLinear` and the same class when
    loaded as HF remote code (a different Python class), and it keeps this package free of
    an import of the model code. A wrapper (DDP, torch.compile) only prefixes the names.
    """
    pairs, seen = [], set()
    for name, module in model.named_modules():
        a, b = module._parameters.get("A"), module._parameters.get("B")
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


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if value is None else value


def _number(cfg: Mapping[str, Any], key: str, default: Any, ok, accepted: str) -> float:
    value = _get(cfg, key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad_value(f"optimizer.{key}", value, accepted) from None
    if not ok(number):
        raise bad_value(f"optimizer.{key}", value, accepted)
    return number


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module, method: str, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer for `model` trained with `method` ("full" | "lowrank" | "dlr").

    cfg keys (configs/optimizer/*.yaml): name, lr, weight_decay, betas, eps; spectron adds
    momentum, ns_steps, adamw_lr, adamw_weight_decay, power_init_iters, ns_dtype, seed.
    Missing or null keys take the defaults documented in docs/spectron.md. fused: AdamW's
    single-kernel implementation (the trainer asks for it on CUDA); Spectron ignores it.
    """
    name = _get(cfg, "name")
    if name not in OPTIMIZERS:
        raise bad_value("optimizer", name, OPTIMIZERS)
    if method not in METHODS:
        raise bad_value("method", method, METHODS)

    lr = _number(cfg, "lr", None, lambda x: x > 0, "a number > 0")
    wd = _number(cfg, "weight_decay", 0.0, lambda x: x >= 0, "a number >= 0")
    eps = _number(cfg, "eps", 1e-8, lambda x: x > 0, "a number > 0")
    betas_value = _get(cfg, "betas", (0.9, 0.999))
    try:
        betas = tuple(float(b) for b in betas_value)
    except (TypeError, ValueError):
        raise bad_value("optimizer.betas", betas_value, "a list of 2 numbers in [0, 1)") from None
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise bad_value("optimizer.betas", list(betas_value), "a list of 2 numbers in [0, 1)")

    if name == "adamw":
        groups = _adamw_groups(_trainable(model), lr=lr, weight_decay=wd)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=fused or None)

    if method not in FACTORIZED_METHODS:
        raise ConfigError(
            f"optimizer='spectron' is not valid with method={method!r}; accepted: method=lowrank, dlr (or optimizer=adamw)"
        )
    if not find_factor_pairs(model):
        raise ConfigError(
            f"optimizer='spectron' found no factorized layers (A/B parameter pairs) in the {method} model; use optimizer=adamw"
        )
    momentum = _number(cfg, "momentum", 0.9, lambda x: 0 <= x < 1, "a number in [0, 1)")
    ns_steps = _number(cfg, "ns_steps", 5, lambda x: x >= 1 and x == int(x), "an integer >= 1")
    power_init = _number(cfg, "power_init_iters", 10, lambda x: x >= 1 and x == int(x), "an integer >= 1")
    seed = _number(cfg, "seed", 0, lambda x: x == int(x), "an integer")
    adamw_lr = _number(cfg, "adamw_lr", lr, lambda x: x > 0, "a number > 0 (or null: same as lr)")
    adamw_wd = _number(cfg, "adamw_weight_decay", wd, lambda x: x >= 0, "a number >= 0 (or null: same as weight_decay)")
    ns_dtype = _get(cfg, "ns_dtype", "float32")
    if ns_dtype not in NS_DTYPES:
        raise bad_value("optimizer.ns_dtype", ns_dtype, NS_DTYPES)

    groups = spectron_param_groups(
        model,
        lr=lr,
        adamw_lr=adamw_lr,
        weight_decay=wd,
        adamw_weight_decay=adamw_wd,
        spectron=dict(momentum=momentum, ns_steps=int(ns_steps), power_init_iters=int(power_init), ns_dtype=ns_dtype, seed=int(seed)),
    )
    return Spectron(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)
