"""dlr-scaling: fit L(N, D) = E + A N^-alpha + B D^-beta per group of finished runs; predict and compare.

    dlr-scaling runs/scaling/runs --out scaling/                 # every run below the folder
    dlr-scaling 'study/runs/*' --at 1e15,1e17 --out scaling/     # predictions at these FLOP budgets

Runs are grouped as dlr-compare groups them (method, optimizer and any other setting that
differs), except that the size (model, rank and the size's recipe lr / global batch) and
the budget (steps, tokens) are what the law is fitted over. Each run is one point: N its
non-embedding parameters (summary.json `train_non_embedding_params`), D its training
tokens, L its final validation loss (`--metric`, default val_loss, in nats), C its training
FLOPs (`train_flops_per_token` x tokens). The fit is Chinchilla's approach 3 (dlr.scaling)
with bootstrap intervals (`--bootstrap` refits on resampled points, `--seed`).

Prints, and with --out writes: fit.json (parameters, intervals, residuals, the points used),
table.md / table.csv (per group and budget: the compute-optimal N and D, predicted loss and
perplexity with intervals), the predicted difference between every two groups with its
interval, loss_vs_compute.png (the points and each group's fitted frontier) and
isoflop.png (where at least 3 runs of a group share a budget within 10%).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dlr.atomic import check_writable
from dlr.cli._common import run_cli
from dlr.errors import ConfigError
from dlr.scaling_report import ScalingRequest as Req

PROG = "dlr-scaling"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2, like every dlr command
        raise ConfigError(message)


def _budgets(text: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--at {text!r} is not valid; accepted: comma-separated FLOP budgets, e.g. 1e15,1e17") from None
    if not out or any(not (math.isfinite(c) and c > 0) for c in out):
        raise ConfigError(f"--at {text!r} is not valid; accepted: positive FLOP budgets, e.g. 1e15,1e17")
    return out


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories, globs (quote them) or folders of runs")
    ap.add_argument("--out", default=None, help="write fit.json, table.md, table.csv and the plots here")
    ap.add_argument("--at", default=None, help="comma-separated FLOP budgets to predict at "
                                               "(default: the three decades from the largest run's)")
    ap.add_argument("--metric", default=Req.metric, help=f"summary.json loss to fit, in nats (default {Req.metric})")
    ap.add_argument("--bootstrap", type=int, default=Req.bootstrap,
                    help=f"bootstrap refits for the intervals (default {Req.bootstrap})")
    ap.add_argument("--seed", type=int, default=Req.seed, help=f"seed of the bootstrap resampling (default {Req.seed})")
    ap.add_argument("--level", type=float, default=Req.level, help=f"interval level (default {Req.level})")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib import)")
    return ap


# ---------------------------------------------------------------- points and groups

def _check_args(args: argparse.Namespace) -> None:
    if not args.runs:
        raise ConfigError("no run directories given; e.g. dlr-scaling runs/studies/runs --out scaling")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap {args.bootstrap} is not valid; accepted: an integer >= 0 (0 = no intervals)")
    if not 0 < args.level < 1:
        raise ConfigError(f"--level {args.level} is not valid; accepted: a number between 0 and 1, e.g. 0.95")
    if args.out is not None:
        check_writable(args.out, "--out")


def scaling_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    budgets = _budgets(args.at) if args.at is not None else None
    if args.out is not None and not args.no_plots:
        from dlr.compare import pyplot

        pyplot()  # a missing matplotlib is refused before any file is written
    from dlr.scaling_report import (default_budgets, differences, differences_markdown, fit_runs,
                                    params_markdown, predictions, predictions_markdown, write_outputs)

    req = Req(runs=args.runs, metric=args.metric, bootstrap=args.bootstrap, seed=args.seed,
                         level=args.level, plots=not args.no_plots)
    groups, labels, points, laws = fit_runs(req)
    budgets = budgets or default_budgets(points)
    rows = predictions(laws, labels, budgets, args.level)
    diffs = differences(groups, laws, labels, budgets, args.level)
    text = "\n".join(t for t in (params_markdown(laws, labels, args.level), predictions_markdown(rows, args.level),
                                 differences_markdown(diffs, args.level)) if t)
    print(f"{sum(len(p) for p in points)} run(s) in {len(groups)} group(s)\n\n{text}")
    if args.out is not None:
        written = write_outputs(Path(args.out), req, {"groups": groups, "labels": labels, "points": points,
                                                       "laws": laws, "rows": rows, "diffs": diffs, "text": text})
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, _parser().format_help(), scaling_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
