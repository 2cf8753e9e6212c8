"""The accepted values of every choice setting, declared once.

The code that gives each value its meaning (the layer, the loss, the data readers) branches on
these names; the settings in `dlr.config.sections` accept exactly these. Methods and optimizers
are registries, not tuples: each is a declaration (`dlr.config.methods`, `dlr.optim`), and one
registered later is accepted by every command.
"""
from __future__ import annotations

from typing import Any

# name -> dlr.config.methods.Method: full, lowrank, dlr, and any registered method.
METHODS: dict[str, Any] = {}
ACTIVATIONS = ("silu", "identity", "gelu", "relu")
EXPAND_MODES = ("uniform", "random_reuse", "permuted")
SCOPES = ("all", "attn", "mlp")

# name -> settings schema: adamw, spectron (dlr.config.sections), and any registered optimizer.
OPTIMIZERS: dict[str, type] = {}
NS_DTYPES = ("float32", "bfloat16")

SOURCES = ("hub", "json", "parquet", "text", "tokens", "mix")
# What a mixture does when one of its sources has handed out all its documents.
EXHAUSTED = ("cycle", "stop")
MODES = ("paper", "packed")
SAMPLE_BY = ("paragraph", "line")

LOSS_IMPLS = ("chunked", "liger", "plain")
PRECISIONS = ("auto", "fp32", "bf16")
DTYPE_NAMES = ("fp32", "bf16")  # what evaluation and the benchmarks compute in
PARALLELISMS = ("ddp", "fsdp2")
LOGGERS = ("none", "wandb")
EVAL_PROTOCOLS = ("auto", "sliding", "rows")
QUANT_SCHEMES = ("w8a8", "w4a16")
