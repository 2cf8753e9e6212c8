"""dlr-fold: fold the DLR residual into B, verify, and write a new model directory.

    dlr-fold ckpt=runs/x/final                 # -> runs/x/folded
    dlr-fold ckpt=runs/x/final out=/tmp/f      # anywhere but over the input
    dlr-fold ckpt=runs/x/final dense=true      # identity activation: plain LlamaForCausalLM
    dlr-fold ckpt=runs/x/final verify=false    # skip the sha256 check of the input (trusted files)
    dlr-fold ckpt=OLD upgrade=true out=NEW     # a format_version 2 directory in the current format

The fold happens in place on the one loaded copy (B += sR touches only B's storage), so
memory is the model plus the logits of the check batches.
"""
from __future__ import annotations

import sys

from dlr.cli._common import EXIT_CHECK_FAILED, from_overrides, run_cli

PROG = "dlr-fold"
USAGE = __doc__


def fold_main(args: list[str]) -> int:
    cfg = from_overrides("fold", args)
    # Types and ranges: dlr.config.FoldConfig (from_overrides); the rest: dlr.artifacts.fold.fold_and_verify.
    ckpt = cfg.ckpt
    from dlr.data import data_spec
    from ..artifacts.fold import fold_and_verify, nothing_to_fold

    if cfg.upgrade:
        from ..artifacts.upgrade import upgrade_model_dir

        out = upgrade_model_dir(ckpt, cfg.out, overwrite=cfg.overwrite, verify=cfg.verify)
        print(f"{PROG}: upgraded {ckpt} to the current model-directory format: wrote {out}")
        return 0
    if not cfg.dense:
        why = nothing_to_fold(ckpt)
        if why:
            print(f"{PROG}: nothing to fold: {why}; nothing written")
            return 0
    report = fold_and_verify(ckpt, cfg.out, dense=cfg.dense, check_batches=cfg.check_batches,
                             batch_size=cfg.batch_size, tolerance=cfg.tolerance, device=cfg.device,
                             verify=cfg.verify, overwrite=cfg.overwrite, data=data_spec(cfg.data))
    _print(report)
    if not report.passed:
        print(f"{PROG}: verification failed (see above); nothing written", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _print(r) -> None:
    c, p, f = r.check, r.params, r.forward_flops_per_token
    lines = [
        f"{PROG}: {r.model}: {'dense export' if r.kind == 'dense' else 'folded'} {r.layers_folded} DLR layer(s)",
        f"  logits on {c.batches} batch(es) x {c.batch_size} x {c.seq_len} ({c.tokens} tokens, fp32): "
        f"max abs diff {c.max_abs_diff:.3e}, max rel diff {c.max_rel_diff:.3e} (tolerance {c.tolerance:.0e})",
        f"  params {p.after:,} vs {r.reference} {p.reference:,}: {'equal' if p.equal else 'DIFFERENT'}",
        f"  forward FLOPs/token {f.after:,} vs reference {f.reference:,}: {'equal' if f.equal else 'DIFFERENT'}",
    ]
    if r.passed:
        lines.append(f"  wrote {r.output} (fold_report.json inside) in {r.seconds['total']:.1f}s, "
                     f"peak RSS {r.peak_rss_mb:.0f} MiB")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, USAGE, fold_main, argv)


if __name__ == "__main__":
    main()
