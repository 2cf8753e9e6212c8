"""Every setting of dlr, declared once: typed sections (`sections`), the commands built from
them (`commands`), the accepted values of each choice (`choices`), and how a setting is
declared and checked (`fields`). This package imports nothing from dlr but the error type,
so every other module can depend on it.

    from dlr.config import from_overrides
    cfg = from_overrides("train", ["model=llama_tiny", "rank=8"])   # a TrainConfig
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .choices import *  # noqa: F403  (the accepted values are part of the config's API)
from .commands import (COMMAND_SCHEMAS, SHORT_SECTIONS, CompareConfig, EvalConfig, FinetuneConfig, FoldConfig,
                       PrepareConfig, QuantizeConfig, ScalingConfig, TrainConfig)
from .fields import FP32_MAX, build, check_field, describe_field, setting, unknown_key
from .hydra import register, run_name
from .overrides import compose, from_command_line, from_overrides, group_options, parse_overrides, typed
from .methods import DLR, FULL, LOWRANK, Method, method_named, register_method
from .keys import all_keys, canonical_key, display_key, find_field, short_form, short_names
from .sections import (OPTIMIZER_SCHEMAS, AdamWConfig, CheckpointConfig, DataConfig, FactorizationConfig,
                       LoggingConfig, ModelConfig, ScheduleConfig, SpectronConfig, SystemConfig, WandbConfig)


def to_dict(cfg: Any) -> dict:
    """A typed config as plain nested dicts (config.yaml, wandb's config)."""
    return dataclasses.asdict(cfg)


def runtime_keys(schema: type, prefix: str = "") -> set[str]:
    """Dotted keys of the settings that may change between a run and its resumption."""
    out: set[str] = set()
    for f in dataclasses.fields(schema):
        sub = f.metadata.get("section")
        group = f.metadata.get("group")
        if f.metadata.get("runtime"):
            out.add(prefix + f.name)
        elif sub is not None:
            out |= runtime_keys(sub, f"{prefix}{f.name}.")
        elif isinstance(group, type):
            out |= runtime_keys(group, f"{prefix}{f.name}.")
    return out
