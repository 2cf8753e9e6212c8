"""Optimizers: AdamW and Spectron (stabilized native low-rank training), see docs/spectron.md."""
from dlr.optim.build import OPTIMIZERS, build_optimizer, find_factor_pairs, spectron_param_groups
from dlr.optim.spectron import Spectron, newton_schulz, power_iteration

__all__ = [
    "OPTIMIZERS",
    "Spectron",
    "build_optimizer",
    "find_factor_pairs",
    "newton_schulz",
    "power_iteration",
    "spectron_param_groups",
]
