"""Fold the DLR residual (and a latent scale) into B: B* = c (B + s R), exact and idempotent."""
from __future__ import annotations

import torch
from torch import nn

from .hf.lowrank import LowRankLinear


@torch.no_grad()
def _fold_shard_(layer: LowRankLinear) -> bool:
    """`layer.fold_()` on this process's rows of an FSDP2-sharded B: no gather, no copy.

    c (B + s R) is row-local (R is one-hot per output row), so the layer's own fold runs on a
    view of its rows: B is swapped for the local shard (which it then writes in place) and the
    index for those rows' entries. Same ops as unsharded, so the result is bit-identical.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded_B, out_features = layer.B, layer.out_features
    shape, offset = compute_local_shape_and_global_offset(sharded_B.shape, sharded_B.device_mesh, sharded_B.placements)
    rows = slice(offset[0], offset[0] + shape[0])
    layer._parameters["B"] = nn.Parameter(sharded_B.to_local(), requires_grad=False)
    if layer.dlr_index is not None:
        layer._buffers["dlr_index"] = layer.dlr_index[rows]
    layer.out_features, layer._dlr_cache = shape[0], None
    try:
        return layer.fold_()
    finally:
        layer._parameters["B"], layer.out_features = sharded_B, out_features


def fold_model(model: nn.Module) -> int:
    """Fold every DLR layer in place (with the learned alpha and latent scale, if trainable);
    returns how many layers were folded (0 if none are left). On an FSDP2-sharded model each
    process folds the rows of B it holds."""
    from torch.distributed.tensor import DTensor

    folded = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            folded += _fold_shard_(m) if isinstance(m.B, DTensor) else m.fold_()
    config = getattr(model, "config", None)
    if config is not None and (getattr(config, "dlr_method", None) == "dlr" or folded):
        # Recorded so that a reload builds the residual-free (lowrank) layout.
        config.dlr_folded = True
    return folded
