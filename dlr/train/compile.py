"""How the trainer compiles the model: the whole decoder as one graph, or each layer under FSDP2."""
from __future__ import annotations

import torch


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """compile=auto: on for CUDA (docs/performance.md), off on CPU, where compile time dominates;
    true or false as given (the setting accepts nothing else: dlr.config.SystemConfig)."""
    return device.type == "cuda" if setting == "auto" else setting


def compile_decoder(model) -> None:
    """The whole decoder (embedding, mask, every layer, final norm) as one graph, in place.

    The loss stays outside (the chunked loss compiles its own chunk). One graph rather than
    one per layer keeps the host from starving the GPU between small graphs, and traces away
    transformers' mask code, which syncs with the host once per eager forward. In place, so
    parameter names, state dicts, the fold and DDP wrapping are the eager model's.
    """
    model.model.compile()


def compile_layers(model) -> None:
    """Each decoder layer its own graph, in place: what FSDP2 needs, since its units are the layers
    and a whole-decoder graph would have to trace FSDP2's hooks (torchtitan's per-block compile)."""
    for layer in model.model.layers:
        layer.compile()


def compile_for(model, parallelism: str) -> None:
    """Compile `model` for `parallelism`; before FSDP2 shards it (torchtitan's order)."""
    if parallelism == "fsdp2":
        compile_layers(model)
    else:
        compile_decoder(model)
