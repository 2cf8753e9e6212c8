"""The accepted values of every choice setting, declared once.

The code that gives each value its meaning (the layer, the loss, the optimizer, the data
readers) branches on these names; the settings in `dlr.config.sections` accept exactly these.
"""
from __future__ import annotations

METHODS = ("full", "lowrank", "dlr")
FACTORIZED_METHODS = ("lowrank", "dlr")
ACTIVATIONS = ("silu", "identity", "gelu", "relu")
EXPAND_MODES = ("uniform", "random_reuse", "permuted")
SCOPES = ("all", "attn", "mlp")

OPTIMIZERS = ("adamw", "spectron")
NS_DTYPES = ("float32", "bfloat16")

SOURCES = ("hub", "json", "text", "tokens")
MODES = ("paper", "packed")
SAMPLE_BY = ("paragraph", "line")

LOSS_IMPLS = ("auto", "chunked", "liger", "plain")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLELISMS = ("ddp", "fsdp2")
LOGGERS = ("none", "wandb")
EVAL_PROTOCOLS = ("auto", "sliding", "rows")
QUANT_SCHEMES = ("w8a8", "w4a16")
