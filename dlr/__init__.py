"""dlr: pre-train low-rank LLaMA models with Duplicated Latent Residuals, then fold them.

Names are imported on first use, so `import dlr.config` (and every command's --help) does
not pay for torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "dlr.errors",
    "ModelStats": "dlr.model.counting",
    "model_stats": "dlr.model.counting",
    "fold_model": "dlr.artifacts.fold",
    "fold_and_verify": "dlr.artifacts.fold",
    "FoldReport": "dlr.artifacts.fold",
    "evaluate_checkpoint": "dlr.eval",
    "EvalReport": "dlr.eval",
    "DlrLlamaConfig": "dlr.hf",
    "DlrLlamaForCausalLM": "dlr.hf",
    "LowRankLinear": "dlr.hf",
    "build_from_config": "dlr.model.llama",
    "build_model": "dlr.model.llama",
    "factorization": "dlr.model.llama",
    "make_config": "dlr.model.llama",
    "get_size": "dlr.model.sizes",
    "size_names": "dlr.model.sizes",
}
__all__ = sorted(_EXPORTS)


_SUBPACKAGES = ("analysis", "artifacts", "config", "data", "eval", "model", "optim", "train")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"dlr.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dlr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
