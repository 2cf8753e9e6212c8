"""When to checkpoint, what goes in, and where a run resumes from (the format: training_state)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..atomic import normalize_modes
from ..errors import ConfigError, TrainingDiverged
from .finite import last_finite_checkpoint, training_state_nonfinite
from ..artifacts.run_dir import settings_differences
from .settings import resolved_settings
from .trainer_state import TrainerState
from .checkpoint_files import checkpoint_dirs, load_checkpoint, save_checkpoint
from ..config import TrainConfig

log = logging.getLogger("dlr.train")


def due(every: int, step: int, last_step: int) -> bool:
    """Every `every` steps, and always at the last one."""
    return step % every == 0 or step == last_step


def resume_point(cfg: TrainConfig, out_dir: Path, named: Path | None) -> Path | None:
    """The checkpoint to resume from for resume=auto|never|<dir>; ConfigError if it contradicts out_dir.

    `named`: the checkpoint directory resume=<dir> names, as dlr.train.preflight.check_resume found it.
    """
    existing = checkpoint_dirs(out_dir)
    if cfg.checkpoint.resume == "auto":
        return existing[-1] if existing else None
    if cfg.checkpoint.resume == "never":
        if existing:
            raise ConfigError(f"resume='never' but out_dir={str(out_dir)!r} has checkpoints; "
                              "accepted: resume=auto or another out_dir")
        return None
    return named


def check_resumed_settings(ckpt: Path, saved: dict, resolved: dict, allow: bool) -> None:
    """The checkpoint's settings are this run's (runtime settings aside), or the user said
    resume_changed=true: a deleted config.yaml must not let another lr resume silently."""
    diff = settings_differences(saved, resolved)
    if diff and not allow:
        raise ConfigError(f"checkpoint {str(ckpt)!r} was written with other settings (differs in: {'; '.join(diff[:8])}); "
                          "accepted: the checkpoint's settings, another out_dir, or resume_changed=true to resume it "
                          "anyway (its model, optimizer, schedule and data position as saved)")


def _data_state(state: TrainerState) -> dict:
    """This process's data position, and the whole run's in process-count-independent terms."""
    mine = torch.tensor(state.data.local_position(), dtype=torch.long, device=state.device)
    positions = state.accelerator.gather(mine).view(-1, mine.numel()).tolist()
    return {"process": state.data.state_dict(), "global": state.data.global_state(positions)}


def save(state: TrainerState, wall_s: float) -> None:
    """checkpoints/step_<step>: never one with NaN/inf in it (resume=auto would fail on it again)."""
    # DDP: the whole model is local; FSDP2 shards are left to the step's own refusal.
    bad = training_state_nonfinite(state.plain_model(), state.optimizer) if state.cfg.system.parallelism == "ddp" else []
    if bad:
        good = last_finite_checkpoint(checkpoint_dirs(state.out_dir))
        raise TrainingDiverged(
            f"non-finite weights or optimizer state at step {state.step} ({len(bad)} tensors, e.g. {bad[0]}); "
            f"not saved. Last finite checkpoint: {good or 'none'} (try a lower lr={state.cfg.schedule.lr})")
    trainer_state = {"step": state.step, "tokens": state.tokens(state.step), "wall_s": wall_s,
                     "wandb_id": state.wandb_id, "last_eval": state.last_eval, "config": resolved_settings(state.cfg),
                     # What metrics.jsonl holds at this point: a resume drops what came after.
                     "metrics_lines": state.metrics.lines if state.metrics is not None else 0}
    saved = save_checkpoint(state.accelerator, state.out_dir, state.step, model=state.model, optimizer=state.optimizer,
                            scheduler=state.scheduler, data_state=_data_state(state), trainer_state=trainer_state,
                            keep_last=state.cfg.checkpoint.keep_last)
    if state.is_main:
        normalize_modes(saved)  # safetensors writes 0600; every file of a run gets one mode


def restore(state: TrainerState, ckpt: Path, checked: dict) -> None:
    """Model, optimizer, schedule, RNG and data position from `ckpt`; where training stands.

    `checked`: its trainer state as check_checkpoint returned it before any work (dlr.train.loop).
    """
    trainer_state, data_state = load_checkpoint(state.accelerator, ckpt, state.model, state.optimizer, state.scheduler,
                                                checked=checked)
    # Its own exact position when the processes are the same; else the global position.
    state.data.restore(data_state["process"], data_state["global"])
    state.step, state.wall_before = trainer_state["step"], trainer_state["wall_s"]
    state.wandb_id, state.last_eval = trainer_state["wandb_id"], trainer_state["last_eval"]
    state.metrics_lines = trainer_state["metrics_lines"]
    log.info("resumed from %s at step %d", ckpt, state.step)


def wall_clock(state: TrainerState, started: float) -> float:
    """Wall time of the whole run so far, resumed parts included."""
    return state.wall_before + time.perf_counter() - started
