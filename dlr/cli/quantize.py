"""dlr-quantize: quantize every factor of a folded model directory, check it, write a model directory.

    dlr-quantize ckpt=runs/x/folded                          # w8a8 -> runs/x/folded-w8a8
    dlr-quantize ckpt=runs/x/folded scheme=w4a16 group_size=16 out=/tmp/q4
    dlr-quantize ckpt=runs/x/folded max_ppl_ratio=1.2 min_agreement=0.8

The output is a compressed-tensors checkpoint: `python -m vllm.entrypoints.openai.api_server --model DIR
--model-impl transformers --trust-remote-code --dtype bfloat16` (the command its model card gives) runs its
factors with vLLM's int8 (w8a8) or 4-bit (w4a16) CPU kernels, and
dlr-eval / transformers load it. Nothing is written unless the reloaded directory's perplexity and
greedy tokens on the validation batches are within the bounds.
"""
from __future__ import annotations

import sys

from dlr.cli._common import EXIT_CHECK_FAILED, from_overrides, run_cli

PROG = "dlr-quantize"
USAGE = __doc__


def quantize_main(args: list[str]) -> int:
    cfg = from_overrides("quantize", args)
    # Types and ranges: dlr.config.QuantizeConfig (from_overrides); the rest: dlr.artifacts.quantize.quantize_and_verify.
    ckpt = cfg.ckpt
    from dlr.data import data_spec
    from ..artifacts.quantize import quantize_and_verify

    report = quantize_and_verify(ckpt, cfg.out, scheme=cfg.scheme, group_size=cfg.group_size,
                                 eval_tokens=cfg.eval_tokens, batch_size=cfg.batch_size,
                                 max_ppl_ratio=cfg.max_ppl_ratio, min_agreement=cfg.min_agreement,
                                 device=cfg.device, verify=cfg.verify, overwrite=cfg.overwrite,
                                 data=data_spec(cfg.data), ignore=cfg.ignore)
    _print(report)
    if not report.passed:
        print(f"{PROG}: check failed (see above); nothing written", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _print(r) -> None:
    c, w, p = r.check, r.weight_bytes, r.projection_bytes
    lines = [
        f"{PROG}: {r.model}: {r.factors} factor(s) quantized ({r.linears} linear layers, compressed-tensors {r.format})"
        + (f"; kept unquantized: {', '.join(r.ignore)}" if r.ignore else ""),
        f"  validation ({c.tokens} tokens): ppl {c.ppl_after:.4f} vs {c.ppl_before:.4f} unquantized "
        f"(ratio {c.ppl_ratio:.4f}, max {c.max_ppl_ratio}); same greedy token at {c.top1_agreement:.2%} "
        f"(min {c.min_agreement:.0%})",
        f"  weight bytes {w['before']:,} -> {w['after']:,}; of the quantized layers {p['before']:,} -> {p['after']:,}",
    ]
    if r.passed:
        lines.append(f"  wrote {r.output} (quantize_report.json inside) in {r.seconds:.1f}s")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, quantize_main, argv)


if __name__ == "__main__":
    main()
