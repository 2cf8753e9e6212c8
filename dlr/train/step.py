"""One optimizer step: the global batch, token-weighted loss, the finite guard, the update."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TrainingDiverged
from .finite import last_finite_checkpoint
from .sharding import clip_grad_norm, no_sync
from .trainer_state import TrainerState
from .checkpoint_files import checkpoint_dirs


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: the copy overlaps the GPU's queue instead of stalling the host on it.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def fused_adamw(optimizer) -> torch.optim.Optimizer | None:
    """The torch AdamW behind accelerate's wrapper when it is fused (it then honours found_inf)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused") else None


def diverged_message(out_dir: Path, bad_step: int, at_step: int, lr: float) -> str:
    good = last_finite_checkpoint(checkpoint_dirs(out_dir))  # named only once read back and checked
    where = f"at step {bad_step}" + (f" (found at step {at_step})" if at_step != bad_step else "")
    return (f"loss or gradient is not finite {where}; that update was refused, so the weights stay finite; stopped. "
            f"Last finite checkpoint: {good or 'none'} (try a lower lr={lr})")


class FiniteGuard:
    """Refuses an update whose loss or gradient is not finite, without a host sync per step.

    With fused AdamW the refusal happens on the device (found_inf: the kernel leaves weights
    and moments alone) and the first refused step is kept on the device, read only by
    `check` at log, eval and save points. Without it (CPU, Spectron) the step is refused on
    the host before the update.
    """

    def __init__(self, state: TrainerState) -> None:
        self.out_dir, self.lr = state.out_dir, state.cfg.schedule.lr
        self.fused = fused_adamw(state.optimizer)
        self.refused_at = torch.zeros((), dtype=torch.long, device=state.device)  # 0: none

    def guard(self, finite: torch.Tensor, step: int) -> None:
        if self.fused is not None:
            self.fused.found_inf = (~finite).float()
            self.refused_at = torch.where((self.refused_at == 0) & ~finite, step, self.refused_at)
        elif not bool(finite):
            raise TrainingDiverged(diverged_message(self.out_dir, step, step, self.lr))

    def check(self, at_step: int) -> None:
        bad = int(self.refused_at) if self.fused is not None else 0
        if bad:
            raise TrainingDiverged(diverged_message(self.out_dir, bad, at_step, self.lr))


def next_batches(state: TrainerState) -> list[dict]:
    """This process's micro-batches of the next step.

    A data loader draws its base seed from torch's global RNG when its iterator starts, which
    a resumed run does at another point than an uninterrupted one; the fork keeps the global
    RNG (saved in every checkpoint) the uninterrupted run's.
    """
    with torch.random.fork_rng(devices=[]):
        return [next(state.data) for _ in range(state.plan.grad_accum)]


def train_step(state: TrainerState, micro: list[dict], guard: FiniteGuard) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and update on one global batch; (this process's loss sum, grad norm)."""
    acc, device, model = state.accelerator, state.device, state.model
    # Token-weighted loss over the whole global batch: the same number whatever the split
    # into processes and micro-batches (HF divides the summed CE by this count). Counted on
    # the host (the labels are still there), summed on the device.
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    n_tokens = acc.reduce(to_device(torch.tensor(local_tokens, dtype=torch.long), device), "sum")
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        with no_sync(acc, model, skip=i < len(micro) - 1), acc.autocast():
            out = model(input_ids=to_device(batch["input_ids"], device), labels=to_device(batch["labels"], device),
                        num_items_in_batch=n_tokens)
            # DDP averages gradients over processes; undo that, the count is global.
            acc.backward(out.loss * acc.num_processes)
        loss_sum += out.loss.detach().float()
    grad_norm = clip_grad_norm(acc, model, state.cfg.schedule.grad_clip)
    state.step += 1
    # A non-finite loss anywhere makes every process's gradient (all-reduced) non-finite.
    guard.guard(torch.isfinite(loss_sum) & torch.isfinite(grad_norm), state.step)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm
