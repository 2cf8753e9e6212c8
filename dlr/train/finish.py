"""The end of a run: final/, the fold and folded/ (when there is something to fold), summary.json.

Under FSDP2 the model stays sharded throughout: evaluation runs sharded, the fold works on
each process's rows of B, and final/ and folded/ are streamed from the shards.
"""
from __future__ import annotations

import logging

from ..model.counting import model_stats
from ..data import data_provenance
from ..artifacts.fold import fold_model, foldable
from ..artifacts.run_dir import FINAL_DIR, FOLDED_DIR, tidy, write_summary
from .sharding import save_final
from .trainer_state import TrainerState
from .telemetry import Throughput, peak_memory_gib
from .reporting import say
from .evaluation import run_eval

log = logging.getLogger(__name__)


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


def data_tokens(state: TrainerState) -> dict[str, int] | None:
    """The tokens the run took from each data source (a mixture's sources, or the one source),
    summed over processes; None for token shards, which count no sources."""
    data = state.data
    if not hasattr(data, "source_tokens"):
        return None
    import torch

    counts = torch.tensor(data.source_tokens(), dtype=torch.long, device=state.device)
    counts = state.accelerator.reduce(counts, reduction="sum")
    return dict(zip(data.source_names, (int(n) for n in counts.tolist())))


def _fold(state: TrainerState, summary: dict, extra: dict) -> None:
    """Fold the trained model in place, evaluate it and write folded/."""
    model, last = state.plain_model(), state.last_eval
    say(state, "folding the DLR residual into B, then validating the folded model")
    folded = fold_model(model)  # in place: the objective evaluation runs holds the same modules
    folded_eval = run_eval(state, prefix="folded_val")
    deploy = model_stats(model, state.plan.seq_len)
    summary.update({"folded_layers": folded, "folded_val_loss": folded_eval["val_loss"],
                    "folded_val_ppl": folded_eval["val_ppl"], "deploy_params": deploy.total_params,
                    "deploy_non_embedding_params": deploy.non_embedding_params,
                    "fold_rel_ppl_diff": abs(folded_eval["val_ppl"] - last["val_ppl"]) / last["val_ppl"]})
    say(state, f"writing {state.out_dir / FOLDED_DIR}")
    save_final(model, state.tokenizer, state.out_dir / FOLDED_DIR, state.is_main,
               extra={**extra, "val_loss": folded_eval["val_loss"], "unfolded_val_loss": last["val_loss"],
                      "folded_from": FINAL_DIR})  # a name in the run directory: no path of this machine


def finish(state: TrainerState, wall_s: float, speed: Throughput, memory_estimate: dict) -> dict:
    """Write final/ (and folded/ with its perplexity when dlr-fold would fold it) and summary.json; the summary."""
    acc, last = state.accelerator, state.last_eval
    # What docs/checkpoints.md promises in dlr_checkpoint.json: where in training this model is.
    extra = {"step": state.plan.steps, "tokens": state.plan.total_tokens, "val_loss": last["val_loss"],
             "val_tokens": last["val_tokens"], **data_provenance(state.cfg.data)}
    tokens = data_tokens(state)
    if tokens is not None:
        # What the model was trained on, source by source: in summary.json and the model card.
        extra["data_tokens"] = tokens
        if state.is_main:
            log.info("tokens per data source: %s", ", ".join(f"{k} {v:,}" for k, v in tokens.items()))
    say(state, f"writing {state.out_dir / FINAL_DIR}")
    save_final(state.plain_model(), state.tokenizer, state.out_dir / FINAL_DIR, state.is_main, extra=extra)
    summary = _summary(state, wall_s, speed, memory_estimate)
    if tokens is not None:
        summary["data_tokens"] = tokens
    acc.wait_for_everyone()
    if foldable(state.plain_model().config):  # what dlr-fold folds: a residual, a latent scale, ...
        _fold(state, summary, extra)
    if state.is_main:
        write_summary(state.out_dir, summary)
        tidy(state.out_dir)
    acc.wait_for_everyone()
    acc.end_training()
    return summary
