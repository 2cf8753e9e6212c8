"""dlr-train's entry point: check everything, set up, loop over steps, finish.

One code path for CPU, one GPU, many GPUs and nodes, DDP or FSDP2. Each part has its module:
settings (the config read), setup (model, optimizer, data), step (one optimizer step and
its finite guard), validation, checkpointing (cadence, save, resume), reporting (metrics,
tracker, console), telemetry (throughput, memory), finish (final/, fold, summary), describe
(the dry run), and training_state (the checkpoint format; the run directory is dlr.artifacts.run_dir).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from accelerate import Accelerator

from ..errors import TrainingDiverged
from .checkpointing import check_resumed_settings, due, restore, resume_point, save, wall_clock
from .describe import describe_plan, memory_estimate
from .finish import finish
from .plan import TrainPlan, make_plan
from .preflight import check_data_files, check_out_dir
from .reporting import TrainLogger, open_metrics, say
from ..artifacts.run_dir import RunLock, check_run_dir, finished_summary, tidy, write_config
from .settings import resolved_settings
from .setup import Inputs, build_state, check_inputs, make_accelerator
from .trainer_state import TrainerState
from .step import FiniteGuard, next_batches, train_step
from .telemetry import Throughput
from .checkpoint_files import check_checkpoint
from .evaluation import run_eval
from ..config import TrainConfig

log = logging.getLogger("dlr.train")
__all__ = ["TrainingDiverged", "train"]


def train(cfg: TrainConfig) -> dict:
    """Run (or dry-run) one training job described by the settings.

    Everything that can be wrong with the input is refused (ConfigError, one line) before a
    fresh run directory is created: the settings, the model/optimizer/plan combination, the
    resume value and checkpoint, out_dir, every data file and the first batch. A finished run
    (resume=auto) is returned as it is, with "already_finished": True, and nothing is written.
    """
    resolved = resolved_settings(cfg)
    inputs = check_inputs(cfg)
    if cfg.system.dry_run:
        return describe_plan(cfg, make_plan(cfg, cfg.system.plan_processes or 1, inputs.spec.seq_len), inputs.config)
    accelerator = make_accelerator(cfg, inputs.parallelism)
    plan = make_plan(cfg, accelerator.num_processes, inputs.spec.seq_len)
    out_dir = Path(cfg.checkpoint.out_dir)
    done = _check_run_dir(cfg, out_dir, resolved)
    if done is not None:
        log.info("%s has finished; nothing to do (resume=auto leaves a finished run as it is)", out_dir)
        return {**done, "already_finished": True}
    resume = _check_resume_point(cfg, out_dir, inputs, resolved)
    check_data_files(inputs.spec)
    lock = RunLock(out_dir)
    try:
        state, first = _setup(cfg, inputs, accelerator, plan, lock, resume, resolved=resolved)
        wall_s, speed = _loop(state, first)
        return finish(state, wall_s, speed, memory_estimate(cfg, plan, inputs.config, state.stats, inputs.parallelism))
    finally:
        lock.release()


def _check_run_dir(cfg: TrainConfig, out_dir: Path, resolved: dict) -> dict | None:
    """Refuse an out_dir that cannot hold this run; the summary if it has finished (resume=auto)."""
    check_out_dir(out_dir)
    check_run_dir(out_dir, resolved, allow_changed=cfg.checkpoint.resume_changed)
    return finished_summary(out_dir) if cfg.checkpoint.resume == "auto" else None


def _check_resume_point(cfg: TrainConfig, out_dir: Path, inputs: Inputs, resolved: dict) -> tuple[Path, dict] | None:
    """(the checkpoint to resume from, its checked trainer state), or None for a fresh start.

    A corrupt, old-format or other-settings checkpoint is one line, before any work; the
    checkpoint is read and checked here once, and restored from what this check returned.
    """
    resume_from = resume_point(cfg, out_dir, inputs.resume)
    if resume_from is None:
        return None
    checked = check_checkpoint(resume_from, cfg.checkpoint.verify)
    check_resumed_settings(resume_from, checked["config"], resolved, cfg.checkpoint.resume_changed)
    return resume_from, checked


def _own(lock: RunLock) -> None:
    lock.acquire()
    tidy(lock.out_dir)


def _setup(cfg: TrainConfig, inputs: Inputs, accelerator: Accelerator, plan: TrainPlan, lock: RunLock,
           resume: tuple[Path, dict] | None, *, resolved: dict) -> tuple[TrainerState, list | None]:
    """The trainer state at its starting step, and the first step's batches (None at the end).

    An existing run directory is locked before its checkpoints are read; a fresh one is
    created only once the model, the checkpoint to resume from and the first batch have
    been built, so whatever they refuse leaves no directory behind.
    """
    main = accelerator.is_main_process
    if main and lock.out_dir.exists():
        _own(lock)
    state = build_state(cfg, inputs, accelerator, plan)
    if resume is not None:
        restore(state, *resume)
    first = next_batches(state) if state.step < plan.steps else None
    accelerator.wait_for_everyone()
    if main:
        if not lock.held:
            _own(lock)
        write_config(state.out_dir, resolved)
    open_metrics(state, resolved)
    return state, first


def _loop(state: TrainerState, first: list | None) -> tuple[float, Throughput]:
    """Steps to the end of the plan, evaluating and saving on their cadence; (wall s, throughput)."""
    cfg, last = state.cfg, state.plan.steps
    guard, logger = FiniteGuard(state), TrainLogger(state)
    started = time.perf_counter()
    micro = first
    while state.step < last:
        loss_sum, grad_norm = train_step(state, micro or next_batches(state), guard)
        micro = None
        logger.step_done(state)
        if due(cfg.logging.log_every, state.step, last):
            guard.check(state.step)
            logger.log(state, loss_sum, grad_norm)
        if due(cfg.logging.eval_every, state.step, last):
            guard.check(state.step)
            with logger.speed.paused():
                say(state, f"step {state.step}: validating")
                state.last_eval = run_eval(state)
        if due(cfg.checkpoint.save_every, state.step, last):
            guard.check(state.step)
            with logger.speed.paused():
                say(state, f"step {state.step}: saving checkpoints/step_{state.step}")
                save(state, wall_clock(state, started))
    logger.close()
    state.data.close()
    return wall_clock(state, started), logger.speed
