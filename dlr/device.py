"""Which device a command runs on, and which process of a launch this is."""
from __future__ import annotations

import os

import torch

from dlr.errors import ConfigError, bad_value


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun / accelerate launch export them."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch.device; a missing GPU is a ConfigError.

    With `local_rank` given, a bare `cuda` means this process's own GPU (one per process
    under torchrun); without it, `cuda` is left to torch's current device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
        return torch.device(f"cuda:{local_rank}" if name == "cuda" and local_rank is not None else name)
    raise bad_value("device", name, "auto, cpu, cuda, cuda:N")
