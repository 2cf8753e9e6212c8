"""Setup: the checks that need no run directory, then the model, optimizer, schedule and data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..model.counting import model_stats
from ..data import check_vocab, data_spec, load_tokenizer, train_batches, validation_batches
from ..data.spec import DataSpec
from ..data.tokenizer import Tokenizer
from ..hf import DlrLlamaConfig
from ..errors import ConfigError
from ..model.fused_loss import make_loss_fn, resolve_loss_impl
from ..model.llama import build_from_config, make_config
from .layer_paths import apply_training_paths
from ..optim import OptimizerSpec, optimizer_spec
from .objective import TrainingObjective
from ..model.sizes import size_from_mapping
from .compile import compile_enabled, compile_for
from .plan import TrainPlan
from .preflight import check_resume
from .sharding import check_parallelism, equal_batch_count, shard_model
from .trainer_state import TrainerState
from ..config import TrainConfig


@dataclass(frozen=True)
class Inputs:
    """What the run is made of, checked before anything is built for real."""

    spec: DataSpec
    tokenizer: Tokenizer
    config: DlrLlamaConfig  # the model's
    parallelism: str
    optimizer: OptimizerSpec  # checked against the method; built once, in build_state
    resume: Path | None  # the checkpoint that resume=<dir> names (None: auto or never)


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> DlrLlamaConfig:
    """The model's config from the settings; the whole model node, so model.hidden_size=... applies."""
    config = make_config(size_from_mapping(cfg.model), cfg.factorization, seed=cfg.seed, vocab_size=tokenizer.vocab_size)
    # The ids the data pipeline writes are the ids the model (and generate()) must use.
    config.pad_token_id, config.eos_token_id = tokenizer.pad_id, tokenizer.eos_id
    return config


def check_inputs(cfg: TrainConfig) -> Inputs:
    """Data spec, tokenizer, model config, parallelism, optimizer and resume value; ConfigError if bad.

    Each is checked here once, from the settings alone: nothing is built (the model and the
    optimizer are built once, by build_state) and nothing is read but the tokenizer.
    """
    spec = data_spec(cfg.data)
    tokenizer = load_tokenizer(spec.tokenizer)
    config = model_config(cfg, tokenizer)
    check_vocab(tokenizer, config.vocab_size)
    parallelism = check_parallelism(cfg)
    optimizer = optimizer_spec(cfg.optimizer, cfg.factorization.method)  # e.g. spectron on a full model
    return Inputs(spec, tokenizer, config, parallelism, optimizer, check_resume(cfg.checkpoint.resume))


def precision(cfg: TrainConfig) -> str:
    """accelerate's mixed_precision for precision=auto|fp32|bf16."""
    if cfg.system.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return "no" if cfg.system.precision == "fp32" else "bf16"


def make_accelerator(cfg: TrainConfig, parallelism: str) -> Accelerator:
    """The process group, device and reductions; refuses accelerate's own FSDP."""
    # cpu=True is what makes accelerate pick gloo for a torchrun-launched CPU job. Under FSDP2
    # the sharding's MixedPrecisionPolicy casts for compute, so accelerate's autocast stays off.
    accelerator = Accelerator(mixed_precision=precision(cfg) if parallelism == "ddp" else "no",
                              cpu=not torch.cuda.is_available(), log_with="wandb" if cfg.logging.logger == "wandb" else None)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("accelerate's own FSDP (distributed_type: FSDP in the accelerate config) is not used by dlr-train; "
                          "accepted: distributed_type MULTI_GPU with parallelism=fsdp2 (configs/accelerate/fsdp2.yaml)")
    return accelerator


def _enable_checkpointing(model) -> None:
    # transformers 5.x renamed it (the old name warns and goes away in v6); 4.x has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_state(cfg: TrainConfig, inputs: Inputs, accelerator: Accelerator, plan: TrainPlan) -> TrainerState:
    """Model (compiled, sharded), optimizer, schedule and data, at step 0; writes nothing."""
    parallelism, device, bf16 = inputs.parallelism, accelerator.device, precision(cfg) == "bf16"
    set_seed(cfg.seed)  # identical init on every process
    model = build_from_config(inputs.config)
    apply_training_paths(model)  # the training-only fast forwards; same parameters and numbers
    stats = model_stats(model, plan.seq_len)
    if cfg.system.gradient_checkpointing:
        _enable_checkpointing(model)
    compiled = compile_enabled(cfg.system.compile, device)
    loss_impl = resolve_loss_impl(cfg.system.loss, device)
    if compiled:
        compile_for(model, parallelism)
    # What the trainer runs: the model's decoder and lm_head (the same parameters) with its loss.
    objective = TrainingObjective(model, make_loss_fn(loss_impl, compiled=compiled))
    if parallelism == "fsdp2":  # before the optimizer: it must hold the sharded parameters
        objective = shard_model(objective, device, bf16=bf16)
    # Fused AdamW on CUDA: one kernel for all parameters, and it can refuse a whole update on
    # the device (found_inf) without a host sync. The CPU keeps the foreach kernel (its numbers).
    optimizer = inputs.optimizer.build(cfg.optimizer, model, cfg.schedule.lr, device.type == "cuda")
    # Not passed to prepare(): accelerate would step it once per process per step.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, plan.warmup_steps, plan.steps,
                                                            min_lr_rate=cfg.schedule.min_lr_ratio)
    if parallelism == "ddp":
        objective, optimizer = accelerator.prepare(objective, optimizer)
    process_index, num_processes = accelerator.process_index, accelerator.num_processes
    data = train_batches(inputs.spec, inputs.tokenizer, plan.micro_batch, process_index, num_processes, cfg.seed)
    val = validation_batches(inputs.spec, inputs.tokenizer, plan.micro_batch, process_index, num_processes)
    if parallelism == "fsdp2":
        val = equal_batch_count(val, device)
    return TrainerState(
        cfg=cfg, plan=plan, accelerator=accelerator, model=objective, optimizer=optimizer, scheduler=scheduler,
        data=data, val=val, tokenizer=inputs.tokenizer, stats=stats, out_dir=Path(cfg.checkpoint.out_dir),
        compiled=compiled, loss_impl=loss_impl,
        # Under FSDP2 the MixedPrecisionPolicy computes in bf16; autocast stays off.
        autocast_dtype=torch.bfloat16 if bf16 and parallelism == "ddp" else None)
