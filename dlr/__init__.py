"""dlr: pre-train low-rank LLaMA models with Duplicated Latent Residuals, then fold them."""
from .counting import ModelStats, model_stats
from .errors import ConfigError
from .fold import fold_model
from .hf import DlrLlamaConfig, DlrLlamaForCausalLM, LowRankLinear
from .model import build_from_config, build_model, make_config
from .zoo import get_size, size_names

__all__ = [
    "ConfigError",
    "DlrLlamaConfig",
    "DlrLlamaForCausalLM",
    "LowRankLinear",
    "ModelStats",
    "build_from_config",
    "build_model",
    "fold_model",
    "get_size",
    "make_config",
    "model_stats",
    "size_names",
]
