"""The training plan: batch geometry, budget and a memory estimate, derived from the config."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import PARALLELISMS, TrainConfig
from ..model.counting import ModelStats
from ..errors import bad_value


@dataclass(frozen=True)
class TrainPlan:
    processes: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    steps: int
    warmup_steps: int
    tokens_per_step: int
    total_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def make_plan(cfg: TrainConfig, processes: int, seq_len: int) -> TrainPlan:
    """Derive accumulation and steps; every inconsistency is a one-line ConfigError.

    Each value's type and range is checked by the schema (dlr.config) before this.
    """
    if cfg.schedule.global_batch % processes:
        raise bad_value("global_batch", cfg.schedule.global_batch, f"a multiple of the number of processes ({processes})")
    per_process = cfg.schedule.global_batch // processes
    if per_process % cfg.schedule.micro_batch:
        divisors = [d for d in range(1, per_process + 1) if per_process % d == 0]
        raise bad_value("micro_batch", cfg.schedule.micro_batch, f"a divisor of global_batch/processes = {per_process}: {divisors}")
    per_forward = cfg.schedule.micro_batch * processes
    tokens_per_step = cfg.schedule.global_batch * seq_len
    steps = math.ceil(cfg.schedule.tokens / tokens_per_step) if cfg.schedule.tokens is not None else cfg.schedule.steps
    return TrainPlan(
        processes=processes,
        global_batch=cfg.schedule.global_batch,
        micro_batch=cfg.schedule.micro_batch,
        grad_accum=cfg.schedule.global_batch // per_forward,
        seq_len=seq_len,
        steps=steps,
        warmup_steps=int(cfg.schedule.warmup * steps),
        tokens_per_step=tokens_per_step,
        total_tokens=steps * tokens_per_step,
    )


def memory_estimate_gib(stats: ModelStats, plan: TrainPlan, *, hidden: int, layers: int, heads: int, vocab: int,
                        bf16: bool, gradient_checkpointing: bool, optimizer_bytes_per_param: int = 8,
                        parallelism: str = "ddp", fused_loss: bool = False, loss_chunk_tokens: int = 8192,
                        compiled_loss: bool = False) -> dict:
    """Rough per-process peak: weights + grads + optimizer state, FSDP2's gathered units, activations.

    States: fp32 weights and grads plus the optimizer's state (AdamW: 8 bytes per parameter);
    DDP keeps all of it on every process, FSDP2 a 1/processes shard. DDP under bf16 autocast
    also caches a bf16 copy of the weights for the step. FSDP2 holds, besides its shard, the
    unsharded parameters of two decoder layers (the one computing and the prefetched next,
    bf16 on bf16 runs), one layer's unsharded gradient (compute dtype, plus fp32 for the
    reduce-scatter), and lm_head unsharded from its forward to its backward.

    Activations follow Korthikanti et al. (2022) for a transformer layer with flash/SDPA
    attention, 34 * s * b * h bytes in half precision (x2 in fp32), and the logits
    (b * s * V, fp32 for the loss, plus their gradient; with a fused loss, dlr.model.fused_loss, one chunk
    of logits as the chunk's math holds them: eager, the matmul's output, its fp32 upcast and
    the gradient cast back (2 + 4 + 2 bytes per logit in bf16, 4 in fp32, where they are one
    tensor); compiled (`compiled_loss`, and Liger), one buffer in the compute dtype that the
    gradient overwrites (2 bytes in bf16, 4 in fp32); plus lm_head's fp32 gradient and the
    hidden states' gradient). With checkpointing only each layer's input (2 * s * b * h bytes)
    is kept. An estimate, not a measurement: compare it with `peak_mem_gib` in summary.json
    (docs/training.md, "Memory"; measured figures in docs/performance.md).
    """
    if parallelism not in PARALLELISMS:
        raise bad_value("parallelism", parallelism, PARALLELISMS)
    s, b, n = plan.seq_len, plan.micro_batch, stats.total_params
    compute_bytes = 2 if bf16 else 4
    per_state = 4 + 4 + optimizer_bytes_per_param
    if parallelism == "ddp":
        states = n * per_state
        gathered = n * 2 if bf16 else 0  # autocast's weight cache
    else:
        states = n * per_state / plan.processes
        layer = stats.non_embedding_params / max(layers, 1)
        lm_head = stats.embedding_params / 2
        gathered = 2 * layer * compute_bytes + layer * (compute_bytes + 4) + lm_head * compute_bytes
    per_layer = (2 * s * b * hidden) if gradient_checkpointing else 34 * s * b * hidden
    activations = per_layer * layers * (1 if bf16 else 2)
    if fused_loss:
        per_logit = (2 if compiled_loss else 2 + 4 + 2) if bf16 else 4
        logits = min(b * s, loss_chunk_tokens) * vocab * per_logit + vocab * hidden * 4 + b * s * hidden * 4
    else:
        logits = b * s * vocab * 4 * 2
    gib = 1024**3
    return {
        "weights_grads_optimizer_gib": states / gib,
        "gathered_params_gib": gathered / gib,
        "activations_gib": activations / gib,
        "logits_gib": logits / gib,
        "total_gib": (states + gathered + activations + logits) / gib,
    }
