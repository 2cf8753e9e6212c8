"""Evaluation during and at the end of training, logged as val_* (or folded_val_*) records."""
from __future__ import annotations

from ..eval.loss import evaluate
from .reporting import report, say
from .trainer_state import TrainerState

# What a checkpoint keeps of the last evaluation (finish() needs it after a resume).
EVAL_KEYS = ("val_loss", "val_ppl", "val_tokens")


def run_eval(state: TrainerState, prefix: str = "val") -> dict:
    """Evaluate on the validation batches at the current step and report the record."""
    # Without DDP: evaluation needs no DDP hooks, and a compiled graph would recompile for
    # no-grad mode and every new batch shape.
    model = state.eval_model()
    result = evaluate(model, state.val, state.device, dtype=state.autocast_dtype, compiled_loss=state.compiled)
    result = {k: result[k] for k in EVAL_KEYS}
    report(state, {"step": state.step, "tokens": state.tokens(state.step), f"{prefix}_loss": result["val_loss"],
                   f"{prefix}_ppl": result["val_ppl"], f"{prefix}_tokens": result["val_tokens"]})
    say(state, f"step {state.step}: {prefix}_loss {result['val_loss']:.4f} {prefix}_ppl {result['val_ppl']:.2f} "
               f"({result['val_tokens']} tokens)")
    return result
