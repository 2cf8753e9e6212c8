"""The schemas as Hydra structured configs, and the run-directory name resolver.

configs/<command>.yaml start with `- <command>_schema`; group option files with
`- <group>_schema` (configs/model/llama_tiny.yaml), so every key and type comes from here.
"""
from __future__ import annotations

from importlib import resources

from .commands import COMMAND_SCHEMAS
from .methods import method_named
from .sections import OPTIMIZER_SCHEMAS, ModelConfig


def run_name(model: str, method: str, rank: int, alpha: float, seed: int, optimizer: str) -> str:
    """The default out_dir: deterministic (never a timestamp), so every process and every resume agree."""
    parts = [model, method, *method_named(method).name_parts(rank=rank, alpha=alpha)]
    if optimizer != "adamw":
        parts.append(optimizer)
    parts.append(f"s{seed}")
    return "runs/" + "-".join(parts)


def register() -> None:
    """Register the schemas with Hydra's ConfigStore and the `dlr_run_dir` resolver (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for name, node in COMMAND_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    shipped = resources.files("dlr.configs") / "optimizer"
    for name, node in OPTIMIZER_SCHEMAS.items():
        cs.store(group="optimizer", name=f"{name}_schema", node=node)
        if not (shipped / f"{name}.yaml").is_file():  # a registered optimizer: its schema is its recipe
            cs.store(group="optimizer", name=name, node=node)
    OmegaConf.register_new_resolver("dlr_run_dir", lambda *parts: run_name(*parts), replace=True)
