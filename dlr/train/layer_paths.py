"""The trainer's forward for LowRankLinear: the same function as the shipped layer, built the
way that is cheapest where training runs.

A model directory ships one forward per layer (dlr.hf.lowrank). For the default layer (fixed
s, no latent scale, no bias) training builds B + s R differently per setting (measured in
benchmarks/README.md, "Training step"):
- bf16 autocast, eager: an out-of-place scatter, then autocast's cast, which low-rank pays
  anyway; the cast copy is what F.linear keeps for backward, so no memory is added, and
  autograd stays in C++ (small models on a GPU are bound by per-op host overhead).
- no autocast (fp32), eager: `_RebuiltResidualUp`, which keeps B rather than a B-sized copy of
  B + s R for backward and rebuilds it there.
- torch.compile: a pointwise `where` over an index comparison, which inductor fuses with the
  cast.
Layers with the other knobs take the shipped forward. Every path gives the shipped layer's
outputs and gradients bit for bit (tests/test_layers.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hf.lowrank import LowRankLinear


class _RebuiltResidualUp(torch.autograd.Function):
    """y = z (B + s R)^T keeping z and B, not an fp32 B + s R, for backward; dL/dB = dL/d(B + s R)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, B: torch.Tensor, index_col: torch.Tensor, scale_col: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, B, index_col, scale_col)
        return F.linear(z, B.scatter_add(1, index_col, scale_col))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        z, B, index_col, scale_col = ctx.saved_tensors
        grad_z = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_y @ B.scatter_add(1, index_col, scale_col)
        if ctx.needs_input_grad[1]:
            grad_B = grad_y.reshape(-1, grad_y.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
        return grad_z, grad_B, None, None


class TrainingLowRankLinear(LowRankLinear):
    """LowRankLinear with the training paths; the same parameters, buffers and state dict."""

    _dlr_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def is_default(self) -> bool:
        # Plain Python, so torch.compile specialises on it instead of breaking the graph.
        return self.alpha_divisor is None and not self.has_latent_scale and self.bias is None

    def scatter_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index column, scale column) for B.scatter_add, cached for B's device and dtype.

        The scale column lives on B's device (a host float turned into a tensor would be a
        blocking copy per call); the cache follows the index object, so a load with
        assign=True or a device move (both replace the buffer) rebuilds it.
        """
        B, index, cache = self.B.weight, self.dlr_index, self._dlr_cache
        if cache is None or cache[0] is not index or cache[2].dtype != B.dtype or cache[2].device != B.device:
            scale = torch.full((self.out_features, 1), self.dlr_scale, dtype=B.dtype, device=B.device)
            cache = self._dlr_cache = (index, index.unsqueeze(1), scale)
        return cache[1], cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dlr_index is None or not self.is_default:
            return super().forward(x)
        z, B = self.latent(x), self.B.weight
        if torch.compiler.is_compiling():
            cols = torch.arange(self.rank, device=B.device)
            return F.linear(z, torch.where(cols == self.dlr_index.unsqueeze(1), B + self.dlr_scale, B))
        if torch.is_autocast_enabled(z.device.type):
            return F.linear(z, B.scatter_add(1, *self.scatter_operands()))
        return _RebuiltResidualUp.apply(z, B, *self.scatter_operands())


def training_layer(layer: LowRankLinear) -> TrainingLowRankLinear:
    """A TrainingLowRankLinear with `layer`'s settings that holds `layer`'s very parameters and buffers.

    Built on meta with the same constructor arguments (nothing allocated, nothing drawn from
    the RNG), then given the layer's tensor objects by a strict load: the same names, so the
    optimizer, checkpoints and the saved model directory see the same model.
    """
    with torch.device("meta"):
        new = TrainingLowRankLinear(layer.in_features, layer.out_features, layer.rank, layer.activation,
                                    layer.dlr_scale, layer.dlr_index, trainable_alpha_divisor=layer.alpha_divisor,
                                    latent_scale=layer.latent_scale, trainable_latent=layer.has_trainable_latent,
                                    bias=layer.bias is not None)
    for name, p in new.named_parameters():  # an assigning load keeps the receiving side's flag
        p.requires_grad_(layer.get_parameter(name).requires_grad)
    new.load_state_dict(layer.state_dict(keep_vars=True), strict=True, assign=True)
    left = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (a non-persistent buffer) the training layer lacks
        raise RuntimeError(f"training_layer: {left} not taken over from the shipped layer")
    return new.train(layer.training)


def apply_training_paths(model: nn.Module) -> int:
    """Replace every LowRankLinear of `model` by its training layer (same parameter objects,
    same names), in place; returns how many. Call before wrapping or sharding."""
    names = [name for name, module in model.named_modules() if type(module) is LowRankLinear]
    for name in names:
        model.set_submodule(name, training_layer(model.get_submodule(name)))
    return len(names)
