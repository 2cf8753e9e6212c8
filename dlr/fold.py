"""Fold the DLR residual (and a latent scale) into B: B* = c (B + s R), exact and idempotent."""
from __future__ import annotations

from torch import nn

from .hf.lowrank import LowRankLinear


def fold_model(model: nn.Module) -> int:
    """Fold every DLR layer in place (with the learned alpha and latent scale, if trainable);
    returns how many layers were folded (0 if none are left)."""
    folded = sum(m.fold_() for m in model.modules() if isinstance(m, LowRankLinear))
    config = getattr(model, "config", None)
    if config is not None and (getattr(config, "dlr_method", None) == "dlr" or folded):
        # Recorded so that a reload builds the residual-free (lowrank) layout.
        config.dlr_folded = True
    return folded

