"""Evaluation of a causal LM and of model directories.

- `dlr.eval.loss`: token-weighted validation loss over batches (the trainer's eval, too);
- `dlr.eval.corpus`: a corpus as one token stream, scored by a sliding window;
- `dlr.eval.harness`: lm-evaluation-harness tasks on a loaded model;
- `dlr.eval.protocol`: the protocols end to end on a model directory, with typed reports
  (what `dlr-eval` runs).
"""
from dlr.eval.corpus import CorpusMetrics
from dlr.eval.harness import TaskRequest, parse_tasks, run_tasks
from dlr.eval.loss import evaluate
from dlr.eval.protocol import (EvalReport, PerplexityReport, evaluate_checkpoint, resolve_protocol, rows_perplexity,
                               sliding_perplexity)

__all__ = [
    "CorpusMetrics", "EvalReport", "PerplexityReport", "TaskRequest", "evaluate", "evaluate_checkpoint",
    "parse_tasks", "resolve_protocol", "rows_perplexity", "run_tasks", "sliding_perplexity",
]
