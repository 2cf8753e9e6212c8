"""dlr-scaling: fit L(N, D) = E + A N^-alpha + B D^-beta per group of finished runs; predict and compare.

    dlr-scaling runs/scaling/runs out=scaling/                  # every run below the folder
    dlr-scaling 'study/runs/*' at=1e15,1e17 out=scaling/        # predictions at these FLOP budgets

Run directories are given bare; every other setting is key=value (dlr.config.ScalingConfig).
Runs are grouped as dlr-compare groups them (method, optimizer and any other setting that
differs), except that the size (model, rank and the size's recipe lr / global batch) and
the budget (steps, tokens) are what the law is fitted over. Each run is one point: N its
non-embedding parameters (summary.json `train_non_embedding_params`), D its training
tokens, L its final validation loss (`metric=`, default val_loss, in nats), C its training
FLOPs (`train_flops_per_token` x tokens). The fit is Chinchilla's approach 3 (dlr.analysis.scaling)
with bootstrap intervals (`bootstrap=` refits on resampled points, `seed=`).

Prints, and with out= writes: fit.json (parameters, intervals, residuals, the points used),
table.md / table.csv (per group and budget: the compute-optimal N and D, predicted loss and
perplexity with intervals), the predicted difference between every two groups with its
interval, loss_vs_compute.png (the points and each group's fitted frontier) and
isoflop.png (where at least 3 runs of a group share a budget within 10%).
"""
from __future__ import annotations

import sys
from pathlib import Path

from dlr.atomic import check_writable
from dlr.cli._common import run_cli
from dlr.config import ScalingConfig, from_command_line
from dlr.errors import ConfigError
from ..analysis.scaling_report import ScalingRequest

PROG = "dlr-scaling"


def _check(cfg: ScalingConfig) -> None:
    if not cfg.runs:
        raise ConfigError("no run directories given; e.g. dlr-scaling runs/studies/runs out=scaling")
    if cfg.out is not None:
        check_writable(cfg.out, "out")  # before any run is read


def scaling_main(argv: list[str]) -> int:
    cfg = from_command_line("scaling", argv)
    _check(cfg)
    if cfg.out is not None and cfg.plots:
        from ..analysis.compare import pyplot

        pyplot()  # a missing matplotlib is refused before any file is written
    from ..analysis.scaling_report import (default_budgets, differences, differences_markdown, fit_runs,
                                    params_markdown, predictions, predictions_markdown, write_outputs)

    req = ScalingRequest(runs=cfg.runs, metric=cfg.metric, bootstrap=cfg.bootstrap, seed=cfg.seed, level=cfg.level,
                         plots=cfg.plots)
    groups, labels, points, laws = fit_runs(req, say=lambda text: print(f"{PROG}: {text}", file=sys.stderr,
                                                                        flush=True))
    budgets = [float(c) for c in cfg.at] if cfg.at is not None else default_budgets(points)  # at=1e18,100 holds ints too
    rows = predictions(laws, labels, budgets, cfg.level)
    diffs = differences(groups, laws, labels, budgets, cfg.level)
    text = "\n".join(t for t in (params_markdown(laws, labels, cfg.level), predictions_markdown(rows, cfg.level),
                                 differences_markdown(diffs, cfg.level)) if t)
    print(f"{sum(len(p) for p in points)} run(s) in {len(groups)} group(s)\n\n{text}")
    if cfg.out is not None:
        written = write_outputs(Path(cfg.out), req, {"groups": groups, "labels": labels, "points": points,
                                                      "laws": laws, "rows": rows, "diffs": diffs, "text": text})
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, __doc__, scaling_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
