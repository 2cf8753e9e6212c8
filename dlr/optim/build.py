"""The optimizers, each declared once (`OptimizerSpec`: its settings and how it is built), and
build_optimizer, which makes the one the `optimizer` config group names (configs/optimizer/*.yaml)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlr.config import METHODS, OPTIMIZER_SCHEMAS, AdamWConfig, ScheduleConfig, SpectronConfig, build, check_field, method_named
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


def _adamw(c: Any, model: nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
    groups = _adamw_groups(_trainable(model), lr=lr, weight_decay=c.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(c.betas), eps=c.eps,
                             weight_decay=c.weight_decay, fused=fused or None)


def _spectron(c: Any, model: nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
    if not find_factor_pairs(model):
        raise ConfigError("optimizer='spectron' found no factorized layers (A/B parameter pairs) in the model; "
                          "use optimizer=adamw")
    groups = spectron_param_groups(
        model,
        lr=lr,
        adamw_lr=lr if c.adamw_lr is None else c.adamw_lr,
        weight_decay=c.weight_decay,
        adamw_weight_decay=c.weight_decay if c.adamw_weight_decay is None else c.adamw_weight_decay,
        spectron=dict(momentum=c.momentum, ns_steps=c.ns_steps, power_init_iters=c.power_init_iters,
                      ns_dtype=c.ns_dtype, seed=c.seed),
    )
    return Spectron(groups, lr=lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: its settings (a dataclass of dlr.config `setting`s whose `name` field
    defaults to the optimizer's name; the configs/optimizer/<name> group option) and how it is
    built from them: build(settings, model, lr, fused) -> torch.optim.Optimizer, where lr is the
    schedule's peak learning rate (the one learning-rate setting)."""

    settings: type
    build: Callable[[Any, nn.Module, float, bool], torch.optim.Optimizer]
    factorized_only: bool = False  # it needs the A/B factor pairs of a factorized method (Spectron)
    fsdp2: bool = True  # it steps FSDP2-sharded parameters (Spectron needs each factor whole)

    @property
    def name(self) -> str:
        return {f.name: f for f in dataclasses.fields(self.settings)}["name"].default


BUILDERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Make `spec` a value of optimizer= for dlr-train (and build_optimizer); returns it."""
    BUILDERS[spec.name] = spec
    OPTIMIZER_SCHEMAS[spec.name] = spec.settings
    return spec


register_optimizer(OptimizerSpec(AdamWConfig, _adamw))
register_optimizer(OptimizerSpec(SpectronConfig, _spectron, factorized_only=True, fsdp2=False))


def optimizer_spec(cfg: Any, method: str) -> OptimizerSpec:
    """The registered optimizer that `cfg` (its settings, or a mapping with their keys) names,
    refused in one line when `method` cannot be trained with it (Spectron needs factors)."""
    name = cfg.get("name") if isinstance(cfg, Mapping) else getattr(cfg, "name", None)
    if name not in BUILDERS:
        raise bad_value("optimizer", name, BUILDERS)
    spec, factorized = BUILDERS[name], method_named(method).factorized
    if spec.factorized_only and not factorized:
        accepted = ", ".join(m for m in METHODS if method_named(m).factorized)
        raise ConfigError(f"optimizer={name!r} is not valid with method={method!r}; accepted: method={accepted} "
                          "(or optimizer=adamw)")
    return spec


def build_optimizer(cfg: Mapping[str, Any] | Any, model: nn.Module, method: str, *, lr: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer for `model` trained with `method` (a name in dlr.config.METHODS).

    cfg: the optimizer section (its registered settings dataclass, e.g. dlr.config.AdamWConfig,
    or a mapping with their keys, checked here; unknown keys are refused). lr: the peak learning
    rate (the schedule's `lr`, the one learning-rate setting; Spectron's factor step), checked
    here as the schedule declares it. fused: AdamW's single-kernel implementation (the trainer
    asks for it on CUDA); the others ignore it. The trainer, whose settings are checked when its
    config is built, checks the combination once (`optimizer_spec`) and calls the spec's build.
    """
    spec = optimizer_spec(cfg, method)
    c = cfg if isinstance(cfg, spec.settings) else build(spec.settings, {k: v for k, v in cfg.items() if k != "defaults"},
                                                         "optimizer.")
    return spec.build(c, model, check_field(ScheduleConfig, "lr", lr), fused)
