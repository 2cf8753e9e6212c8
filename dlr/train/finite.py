"""No checkpoint with non-finite numbers: checked before a save and before one is named."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


def nonfinite(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an inf (nested dicts/lists walked)."""
    bad: list[str] = []

    def walk(name: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
                bad.append(name)
        elif isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{name}.{k}" if name else str(k), x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{name}.{i}", x)

    for name, v in tensors:
        walk(name, v)
    return bad


def training_state_nonfinite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Non-finite weights (by name) and optimizer state entries of a live run."""
    bad = nonfinite(model.state_dict().items())
    bad += ["optimizer." + n for n in nonfinite([("state", optimizer.state_dict().get("state", {}))])]
    return bad


def checkpoint_is_finite(ckpt: Path) -> bool:
    """Every tensor of every safetensors file in a training checkpoint directory is finite."""
    from safetensors import safe_open

    files = sorted(Path(ckpt).rglob("*.safetensors"))  # state/ shards included
    if not files:
        return False
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if nonfinite([(key, st.get_tensor(key))]):
                        return False
    except Exception:  # unreadable: not a checkpoint we can name as good
        return False
    return True


def last_finite_checkpoint(checkpoints: list[Path]) -> Path | None:
    """The newest of `checkpoints` (oldest first) whose tensors are all finite."""
    return next((c for c in reversed(checkpoints) if checkpoint_is_finite(c)), None)
