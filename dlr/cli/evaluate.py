"""dlr-eval: validation perplexity, corpus perplexity and benchmark tasks of a model directory.

    dlr-eval ckpt=runs/x/final                                  # hub C4 validation
    dlr-eval ckpt=runs/x/folded data=c4_sample eval_tokens=20000 out=res.json
    dlr-eval ckpt=DIR data=text data.validation_files=wikitext-2/test.txt --json   # sliding window
    dlr-eval ckpt=DIR tasks=c4_cloze                            # lm-evaluation-harness, offline task
    dlr-eval ckpt=DIR tasks=hellaswag,arc_easy num_fewshot=0    # hub tasks (need the network)
    dlr-eval ckpt=DIR verify=false                              # skip the sha256 check (trusted files)
    torchrun --nproc_per_node=2 -m dlr.cli.evaluate ckpt=DIR    # same number, split work

Uses the checkpoint's own tokenizer. protocol=rows: `dlr.data.validation_batches` (the fixed
first `val_tokens` tokens) and `dlr.eval.loss.evaluate` (token-weighted, all-reduced), the
very code path of the trainer's final eval, hence the same number for the same budget.
protocol=sliding (the default for data=text): every token of the concatenated corpus, see
`dlr.eval.corpus`. tasks=...: `dlr.eval.harness` (perplexity is then measured only if data= is given).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dlr.atomic import check_writable
from dlr.cli._common import from_overrides, run_cli, write_json
from dlr.config import EvalConfig

if TYPE_CHECKING:
    from dlr.data.spec import DataSpec

PROG = "dlr-eval"
USAGE = __doc__


def _validate(cfg: EvalConfig) -> None:
    # Types and ranges: dlr.config.EvalConfig (from_overrides). Checked now, not after a long evaluation:
    if cfg.out is not None:
        check_writable(cfg.out, "out", file=True)


def _data(cfg: EvalConfig, args: list[str]) -> DataSpec | None:
    """The DataSpec to measure perplexity on; None when only tasks are asked for."""
    from dlr.data import data_spec

    # With tasks=..., perplexity is measured only when a data config is asked for.
    if cfg.tasks is not None and not any(a.split("=", 1)[0].lstrip("+") in ("data", "eval_tokens", "protocol")
                                         for a in args):
        return None
    spec = data_spec(cfg.data)
    return spec if cfg.eval_tokens is None else dataclasses.replace(spec, val_tokens=cfg.eval_tokens)


def eval_main(args: list[str]) -> int:
    # `--json` is the conventional switch; Hydra only knows key=value.
    args = ["json=true" if a == "--json" else a for a in args]
    from dlr.eval.harness import parse_tasks, split_task_override

    args = split_task_override(args)
    cfg = from_overrides("eval", args)
    _validate(cfg)
    ckpt = Path(cfg.ckpt).expanduser()
    tasks = None if cfg.tasks is None else parse_tasks(cfg.tasks, cfg.num_fewshot, cfg.limit, cfg.include_path)
    from dlr.device import dist_env
    from dlr.eval.protocol import evaluate_checkpoint

    report = evaluate_checkpoint(ckpt, data=_data(cfg, args), protocol=cfg.protocol, stride=cfg.stride,
                                 tasks=tasks, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                                 verify=cfg.verify, min_coverage=cfg.min_coverage, progress=cfg.progress)
    if dist_env()[0] != 0:
        return 0
    result = report.to_dict()
    if cfg.out is not None:
        write_json(cfg.out, result)
    if "val_loss" in result and (result["tokens"] == 0 or not math.isfinite(result["val_loss"])):
        print(f"{PROG}: warning: {result['tokens']} tokens evaluated, val_loss={result['val_loss']}", file=sys.stderr)
    if cfg.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        _print(report)
    return 0


def _print(report) -> None:
    where = f"({report.model}, {report.dtype}, {report.device}, {report.num_processes} process(es), {report.seconds:.1f}s)"
    ppl = report.perplexity
    if ppl is not None:
        line = f"val_ppl={ppl.val_ppl:.4f} val_loss={ppl.val_loss:.6f} tokens={ppl.tokens}"
        if ppl.corpus is not None and ppl.corpus.word_ppl is not None:
            line += f" word_ppl={ppl.corpus.word_ppl:.4f} bits_per_byte={ppl.corpus.bits_per_byte:.4f}"
        print(f"{line} [{ppl.protocol}] {where}")
    for name, metrics in (report.tasks or {}).items():
        shown = " ".join(f"{k}={v:.4f}" + (f"±{metrics[k + '_stderr']:.4f}" if isinstance(metrics.get(k + "_stderr"), float) else "")
                         for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_stderr") and k != "version")
        print(f"{name}: {shown} (n={metrics.get('samples')}) {where}")


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, eval_main, argv)


if __name__ == "__main__":
    main()
