"""build_optimizer: config handling, parameter grouping, errors, and training a tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import dlr
from dlr.errors import ConfigError
from dlr.optim import Spectron, build_optimizer, find_factor_pairs
from dlr.config import OPTIMIZER_SCHEMAS

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "optimizer"


def optimizer_cfg(config: str, **overrides):
    """The optimizer group as the trainer sees it: its schema (dlr/config/) merged with the
    YAML's values (the learning rate is the schedule's, passed as build_optimizer's lr=)."""
    values = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{config}.yaml")).items() if k != "defaults"}
    node = OmegaConf.merge(OmegaConf.structured(OPTIMIZER_SCHEMAS[config]), values)
    root = OmegaConf.create({"optimizer": node})
    for key, value in overrides.items():
        root.optimizer[key] = value
    return root.optimizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core box, two intra-op threads competing with other processes made the
    # tiny-model steps ~15x slower; one thread keeps these tests at a few seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_lowrank() -> nn.Module:
    torch.manual_seed(0)
    return dlr.build_model("llama_tiny", method="lowrank")


def test_yaml_configs_hold_no_learning_rate_of_their_own():
    for name in ("adamw", "spectron"):
        cfg = optimizer_cfg(name)
        assert cfg.name == name and "lr" not in cfg  # one learning-rate setting: the schedule's lr=
        assert list(cfg.betas) == [0.9, 0.999] and cfg.eps == 1e-8 and cfg.weight_decay == 0.01
    spectron = optimizer_cfg("spectron")
    assert spectron.momentum == 0.9 and spectron.ns_steps == 5


def test_adamw_decays_2d_weights_only(tiny_lowrank):
    opt = build_optimizer(optimizer_cfg("adamw"), tiny_lowrank, "lowrank", lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    by_id = {id(p): n for n, p in tiny_lowrank.named_parameters()}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any("embed_tokens" in by_id[id(p)] for p in decay["params"])
    assert any("lm_head" in by_id[id(p)] for p in decay["params"])
    assert any("norm" in by_id[id(p)] for p in no_decay["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tiny_lowrank.parameters()))


@pytest.mark.parametrize("method", ["lowrank", "dlr"])
def test_spectron_groups_cover_factors_and_the_rest(method):
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method=method)
    opt = build_optimizer(optimizer_cfg("spectron", adamw_lr=1e-3), model, method, lr=0.02)
    assert isinstance(opt, Spectron)
    factors, decay, no_decay = opt.param_groups
    pairs = find_factor_pairs(model)
    assert len(pairs) == 7 * model.config.num_hidden_layers
    assert factors["spectron"] and factors["params"] == [p for _, a, b in pairs for p in (a, b)]
    assert factors["lr"] == 0.02 and decay["lr"] == 1e-3 and no_decay["lr"] == 1e-3
    assert not decay["spectron"] and decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_adamw_lr_defaults_to_lr(tiny_lowrank):
    opt = build_optimizer(optimizer_cfg("spectron"), tiny_lowrank, "lowrank", lr=0.05)
    assert {g["lr"] for g in opt.param_groups} == {0.05}


def test_spectron_rejects_full_method():
    model = dlr.build_model("llama_tiny", method="full")
    with pytest.raises(ConfigError, match=r"optimizer='spectron' is not valid with method='full'; accepted: method=lowrank, dlr"):
        build_optimizer(optimizer_cfg("spectron"), model, "full", lr=0.02)
    assert isinstance(build_optimizer(optimizer_cfg("adamw"), model, "full", lr=0.02), torch.optim.AdamW)


def test_spectron_rejects_model_without_factors():
    with pytest.raises(ConfigError, match="no factorized layers"):
        build_optimizer(optimizer_cfg("spectron"), nn.Linear(4, 4), "lowrank", lr=0.02)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"name": "sgd"}, r"optimizer='sgd' is not valid; accepted: adamw, spectron"),
        ({"momentum": 1.0}, r"optimizer.momentum=1.0 is not valid"),
        ({"ns_steps": 0}, r"optimizer.ns_steps=0 is not valid"),
        ({"betas": [0.9]}, r"optimizer.betas=\[0.9\] is not valid"),
        ({"ns_dtype": "fp8"}, r"optimizer.ns_dtype='fp8' is not valid; accepted: float32, bfloat16"),
    ],
)
def test_bad_values_are_one_line_config_errors(tiny_lowrank, overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_optimizer(optimizer_cfg("spectron", **overrides), tiny_lowrank, "lowrank", lr=0.02)
    assert "\n" not in str(info.value)


def test_unknown_method_is_a_config_error(tiny_lowrank):
    with pytest.raises(ConfigError, match="method='sparse' is not valid"):
        build_optimizer(optimizer_cfg("adamw"), tiny_lowrank, "sparse", lr=0.02)


def _train_tiny(method: str, steps: int, lr: float = 0.02, **overrides) -> list[float]:
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method=method)
    opt = build_optimizer(optimizer_cfg("spectron", **{"weight_decay": 0.0, **overrides}), model, method, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    pattern = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    ids = pattern.repeat(1, 3)  # a fixed, repeated batch: learnable in a few hundred steps
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses


@pytest.mark.parametrize("method, steps", [("lowrank", 200), ("dlr", 60)])
def test_spectron_reduces_loss_on_tiny_model(method, steps):
    losses = _train_tiny(method, steps)
    assert losses[-1] < 0.2 * losses[0], losses[::20]


def test_spectron_factor_updates_alone_reduce_loss():
    # AdamW part frozen (lr ~ 0): any progress comes from the Spectron-stepped factors.
    losses = _train_tiny("lowrank", steps=60, lr=0.05, adamw_lr=1e-12)
    assert losses[-1] < losses[0] - 0.4, losses[::10]
