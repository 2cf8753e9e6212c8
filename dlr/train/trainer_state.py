"""The trainer-state object: what one training run holds, passed to each part of the loop."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..config import TrainConfig
from ..data.tokenizer import Tokenizer
from ..model.counting import ModelStats
from .plan import TrainPlan
from ..artifacts.run_dir import MetricsLog


@dataclass
class TrainerState:
    """The parts of a run (built by dlr.train.setup) and where in training it is."""

    cfg: TrainConfig
    plan: TrainPlan
    accelerator: Accelerator
    model: torch.nn.Module  # what the step runs: the TrainingObjective (dlr.train.objective), wrapped or sharded
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any
    val: list
    tokenizer: Tokenizer
    stats: ModelStats
    out_dir: Path
    compiled: bool
    loss_impl: str
    autocast_dtype: torch.dtype | None
    step: int = 0
    wall_before: float = 0.0  # wall time of the run before this process resumed it
    wandb_id: str | None = None
    last_eval: dict | None = None
    metrics_lines: int | None = None  # metrics.jsonl lines to keep on resume (None: a fresh run)
    metrics: MetricsLog | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def objective(self) -> torch.nn.Module:
        """The TrainingObjective without the DDP wrapper (under FSDP2: the sharded root)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def plain_model(self) -> torch.nn.Module:
        """The causal LM being trained (under FSDP2 its parameters are the shards)."""
        return self.objective().causal_lm

    def eval_model(self) -> torch.nn.Module:
        """What evaluation runs: the causal LM, or under FSDP2 the sharded root, whose forward
        gathers the final norm and lm_head the loss reads."""
        objective = self.objective()
        return objective if self.cfg.system.parallelism == "fsdp2" else objective.causal_lm

    def tokens(self, at_step: int) -> int:
        return at_step * self.plan.tokens_per_step
