"""The end of a run: final/, the fold and folded/ (method=dlr), summary.json.

Under FSDP2 the model stays sharded throughout: evaluation runs sharded, the fold works on
each process's rows of B, and final/ and folded/ are streamed from the shards.
"""
from __future__ import annotations

from ..counting import model_stats
from ..fold import fold_model
from ..run_dir import FINAL_DIR, FOLDED_DIR, tidy, write_summary
from .sharding import save_final
from .state import TrainerState
from .telemetry import Throughput, peak_memory_gib
from .reporting import say
from .validation import run_eval


def _summary(state: TrainerState, wall_s: float, speed: Throughput, memory_estimate: dict) -> dict:
    cfg, plan, stats, last = state.cfg, state.plan, state.stats, state.last_eval
    config = state.plain_model().config
    return {
        "model": config.dlr_size, "method": cfg.factorization.method, "rank": config.dlr_rank,
        "alpha": cfg.factorization.alpha, "seed": cfg.seed, "optimizer": cfg.optimizer.name, "steps": plan.steps,
        "tokens": plan.total_tokens, "processes": plan.processes,
        "val_loss": last["val_loss"], "val_ppl": last["val_ppl"], "val_tokens": last["val_tokens"],
        "train_params": stats.total_params, "train_non_embedding_params": stats.non_embedding_params,
        "deploy_params": stats.total_params, "train_flops_per_token": stats.train_flops_per_token,
        "wall_s": wall_s, "mean_tokens_per_s": speed.mean_tokens_per_s(), "first_step_s": speed.first_step_s,
        "compile": state.compiled, "loss_impl": state.loss_impl, "peak_mem_gib": peak_memory_gib(state.device),
        "parallelism": cfg.system.parallelism, "memory_estimate_per_process_gib": memory_estimate,
    }


def _fold(state: TrainerState, summary: dict, extra: dict) -> None:
    """Fold the trained model in place, evaluate it and write folded/."""
    model, last = state.plain_model(), state.last_eval
    say(state, "folding the DLR residual into B, then validating the folded model")
    folded = fold_model(model)
    folded_eval = run_eval(state, eval_model=model, prefix="folded_val")
    deploy = model_stats(model, state.plan.seq_len)
    summary.update({"folded_layers": folded, "folded_val_loss": folded_eval["val_loss"],
                    "folded_val_ppl": folded_eval["val_ppl"], "deploy_params": deploy.total_params,
                    "deploy_non_embedding_params": deploy.non_embedding_params,
                    "fold_rel_ppl_diff": abs(folded_eval["val_ppl"] - last["val_ppl"]) / last["val_ppl"]})
    say(state, f"writing {state.out_dir / FOLDED_DIR}")
    save_final(model, state.tokenizer, state.out_dir / FOLDED_DIR, state.is_main,
               extra={**extra, "val_loss": folded_eval["val_loss"], "folded_from": str(state.out_dir / FINAL_DIR)})


def finish(state: TrainerState, wall_s: float, speed: Throughput, memory_estimate: dict) -> dict:
    """Write final/ (and folded/ for dlr, with its perplexity) and summary.json; the summary."""
    acc, last = state.accelerator, state.last_eval
    # What docs/checkpoints.md promises in dlr_checkpoint.json: where in training this model is.
    extra = {"step": state.plan.steps, "tokens": state.plan.total_tokens, "val_loss": last["val_loss"],
             "val_tokens": last["val_tokens"]}
    say(state, f"writing {state.out_dir / FINAL_DIR}")
    save_final(state.plain_model(), state.tokenizer, state.out_dir / FINAL_DIR, state.is_main, extra=extra)
    summary = _summary(state, wall_s, speed, memory_estimate)
    acc.wait_for_everyone()
    if state.cfg.factorization.method == "dlr":
        _fold(state, summary, extra)
    if state.is_main:
        write_summary(state.out_dir, summary)
        tidy(state.out_dir)
    acc.wait_for_everyone()
    acc.end_training()
    return summary
