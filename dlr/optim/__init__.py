"""Optimizers: AdamW and Spectron (stabilized native low-rank training, docs/spectron.md), and
`register_optimizer` for another one (docs/architecture.md, "add an optimizer")."""
from dlr.config import OPTIMIZERS
from dlr.optim.build import OptimizerSpec, build_optimizer, find_factor_pairs, optimizer_spec, register_optimizer, spectron_param_groups
from dlr.optim.spectron import Spectron, newton_schulz, power_iteration

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "Spectron",
    "build_optimizer",
    "find_factor_pairs",
    "newton_schulz",
    "optimizer_spec",
    "power_iteration",
    "register_optimizer",
    "spectron_param_groups",
]
