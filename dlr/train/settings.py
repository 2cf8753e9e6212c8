"""The one place the trainer reads its configuration other than by attribute: the settings as
plain data (what config.yaml records and what a tracker is given)."""
from __future__ import annotations

from ..config import TrainConfig, to_dict


def resolved_settings(cfg: TrainConfig) -> dict:
    """The typed settings (validated when they were built) as a plain nested dict."""
    return to_dict(cfg)
