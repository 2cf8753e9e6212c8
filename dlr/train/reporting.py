"""Where each record goes: metrics.jsonl (main process), the tracker, and the console."""
from __future__ import annotations

import uuid

import torch
from tqdm.auto import tqdm

from ..artifacts.run_dir import METRICS_FILE, MetricsLog
from .trainer_state import TrainerState
from .telemetry import Throughput, peak_flops, peak_memory_gib


def open_metrics(state: TrainerState, resolved: dict) -> None:
    """metrics.jsonl as the checkpoint left it, and the wandb run (when logger=wandb)."""
    acc, cfg = state.accelerator, state.cfg
    state.metrics = MetricsLog(state.out_dir / METRICS_FILE, acc.is_main_process, keep_lines=state.metrics_lines)
    if cfg.logging.logger == "wandb":
        # Our own id (wandb's generator moved between releases), kept in every checkpoint so
        # a resumed run continues the same wandb run.
        state.wandb_id = state.wandb_id or uuid.uuid4().hex[:8]
        mode = {"mode": cfg.logging.wandb.mode} if cfg.logging.wandb.mode else {}
        acc.init_trackers(cfg.logging.wandb.project, config=resolved, init_kwargs={"wandb": {
            "name": cfg.logging.wandb.name or state.out_dir.name, "id": state.wandb_id, "resume": "allow",
            "entity": cfg.logging.wandb.entity, "dir": str(state.out_dir), **mode}})


def report(state: TrainerState, record: dict) -> None:
    """One record (it has a "step") to metrics.jsonl and the tracker."""
    state.metrics.write(record)
    state.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def say(state: TrainerState, text: str) -> None:
    """A line on the console of the main process, above the progress bar."""
    if state.is_main:
        tqdm.write(text)


class TrainLogger:
    """The training record of each log point: loss, lr, grad norm, tokens/s, memory, MFU."""

    def __init__(self, state: TrainerState) -> None:
        self.speed = Throughput(state.plan.tokens_per_step, state.device)
        self.peak = peak_flops(state.device)
        self.first_in_log = True
        self.progress = tqdm(total=state.plan.steps, initial=state.step, disable=not state.is_main,
                             desc="train", dynamic_ncols=True)

    def step_done(self, state: TrainerState) -> None:
        self.progress.update(1)
        if self.speed.step_done():
            what = "compile + warm-up" if state.compiled else "warm-up"
            say(state, f"first step ({what}): {self.speed.first_step_s:.1f} s, kept out of tokens/s")

    def log(self, state: TrainerState, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Reduce the loss (the one host sync per log interval) and report the record."""
        loss = state.accelerator.reduce(loss_sum, "sum").item()
        tok_s = self.speed.window_tokens_per_s()
        lr = state.scheduler.get_last_lr()[0]
        record = {"step": state.step, "tokens": state.tokens(state.step), "loss": loss, "lr": lr,
                  "tokens_per_s": tok_s, "grad_norm": float(grad_norm), "peak_mem_gib": peak_memory_gib(state.device)}
        if self.first_in_log:
            record["first_step_s"], self.first_in_log = self.speed.first_step_s, False
        if self.peak and tok_s:
            record["mfu"] = tok_s * state.stats.train_flops_per_token / (self.peak * state.accelerator.num_processes)
        report(state, record)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}" if tok_s else "-")
        self.speed.new_window()

    def close(self) -> None:
        self.progress.close()
