"""Training-state checkpoints: written atomically, read back without pickle.

Layout of checkpoints/step_<N>/: model.safetensors, optimizer.pt, scheduler.pt,
rng_<rank>.pt, data_<rank>.pt, trainer_state.json. A directory named step_<N> is
complete by construction: it is assembled under a temporary name and renamed by the
main process after every process has written its part.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _full_state_dicts(accelerator: Accelerator, model, optimizer) -> tuple[dict, dict]:
    if accelerator.distributed_type == DistributedType.FSDP:
        # Sharded parameters: gather full, CPU-offloaded copies (rank 0 keeps them).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.unwrap_model(model).state_dict(), optimizer.state_dict()


def save_checkpoint(accelerator: Accelerator, out_dir: Path, step: int, model, optimizer, scheduler,
                    data_state: dict, trainer_state: dict, keep_last: int) -> Path:
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    model_sd, optim_sd = _full_state_dicts(accelerator, model, optimizer)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    torch.save(_rng_state(), tmp / f"rng_{rank}.pt")
    torch.save(data_state, tmp / f"data_{rank}.pt")
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, tmp / "model.safetensors")
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "processes": accelerator.num_processes}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a re-run of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, ckpt: Path, model, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler/RNG in place; returns (trainer_state, data_state)."""
    ckpt = Path(ckpt)
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    if trainer_state["processes"] != accelerator.num_processes:
        from ..errors import ConfigError

        raise ConfigError(
            f"checkpoint {ckpt} was written by {trainer_state['processes']} processes, this run has "
            f"{accelerator.num_processes}; accepted: resume with the same number of processes"
        )
    model_sd = load_file(ckpt / "model.safetensors")
    optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        accelerator.unwrap_model(model).load_state_dict(model_sd, strict=True)
        optimizer.load_state_dict(optim_sd)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rank = accelerator.process_index
    _set_rng_state(torch.load(ckpt / f"rng_{rank}.pt", weights_only=True))
    data_state = torch.load(ckpt / f"data_{rank}.pt", weights_only=True)
    return trainer_state, data_state
