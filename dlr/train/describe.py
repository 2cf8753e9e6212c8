"""The dry run: what a run would be (sizes, FLOPs, plan, memory), built on `meta`, nothing allocated."""
from __future__ import annotations

import torch

from ..config import PARALLELISMS
from ..hf import DlrLlamaConfig
from ..model.counting import ModelStats, model_stats
from ..model.fused_loss import DEFAULT_CHUNK_TOKENS
from ..model.llama import build_from_config, deploy_config
from .compile import compile_enabled
from .plan import TrainPlan, memory_estimate_gib
from .setup import precision
from ..config import TrainConfig


def memory_estimate(cfg: TrainConfig, plan: TrainPlan, config: DlrLlamaConfig, stats: ModelStats, parallelism: str) -> dict:
    """memory_estimate_gib for these settings, rounded to 0.01 GiB."""
    # A plan for several processes is a GPU plan: bf16 there, unless fp32 is asked for.
    on_gpu = torch.cuda.is_available() or plan.processes > 1
    bf16 = precision(cfg) == "bf16" or (plan.processes > 1 and cfg.system.precision != "fp32")
    compiled_loss = cfg.system.loss == "liger" or compile_enabled(cfg.system.compile, torch.device("cuda" if on_gpu else "cpu"))
    memory = memory_estimate_gib(stats, plan, hidden=config.hidden_size, layers=config.num_hidden_layers,
                                 heads=config.num_attention_heads, vocab=config.vocab_size, bf16=bf16, gradient_checkpointing=cfg.system.gradient_checkpointing,
                                 parallelism=parallelism, optimizer_bytes_per_param=8,
                                 fused_loss=cfg.system.loss != "plain", loss_chunk_tokens=DEFAULT_CHUNK_TOKENS,
                                 compiled_loss=compiled_loss)
    return {k: round(v, 2) for k, v in memory.items()}


def describe_plan(cfg: TrainConfig, plan: TrainPlan, config: DlrLlamaConfig) -> dict:
    """What dry_run prints: built on `meta`, so it works for llama_7b on a laptop."""
    train_stats = model_stats(build_from_config(config, device="meta"), plan.seq_len)
    deploy_stats = model_stats(build_from_config(deploy_config(config), device="meta"), plan.seq_len)
    memory = {p: memory_estimate(cfg, plan, config, train_stats, p) for p in PARALLELISMS}
    return {
        "model": config.dlr_size, "method": cfg.factorization.method, "rank": config.dlr_rank, "alpha": cfg.factorization.alpha,
        "train_params": train_stats.total_params, "train_non_embedding_params": train_stats.non_embedding_params,
        "deploy_params": deploy_stats.total_params, "deploy_non_embedding_params": deploy_stats.non_embedding_params,
        "forward_flops_per_token": train_stats.forward_flops_per_token,
        "train_flops_per_token": train_stats.train_flops_per_token,
        "total_train_flops": train_stats.train_flops_per_token * plan.total_tokens,
        **plan.as_dict(),
        "parallelism": cfg.system.parallelism,
        "memory_estimate_per_process_gib": memory[cfg.system.parallelism],
        "memory_estimate_per_process_gib_by_parallelism": memory,
        "out_dir": cfg.checkpoint.out_dir,
    }
