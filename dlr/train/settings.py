"""The one place the trainer reads its configuration other than by attribute.

Everything else in dlr.train reads `cfg.<key>`; this function validates the settings once
and turns them into plain data (what config.yaml records and what a tracker is given).
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ..schema import TrainConfig, validate


def resolved_settings(cfg: Any) -> dict:
    """The validated settings as a plain, fully resolved dict; ConfigError (one line) if invalid."""
    validate(TrainConfig, cfg)
    return OmegaConf.to_container(cfg, resolve=True)
