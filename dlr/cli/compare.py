"""dlr-compare: group finished runs by everything but the seed; mean ± std, paired differences, plots.

    dlr-compare runs/llama_demo-*                      # a glob
    dlr-compare sweep/ --out compare/                  # a multirun folder (runs anywhere below)
    dlr-compare runs/a-s0 runs/a-s1 runs/b-s0 --metric folded_val_ppl
    dlr-compare study/runs --by alpha --out study/alpha   # sensitivity: val_ppl vs alpha

--by KEY (any config key, dotted for nested ones: alpha, rank, expand, optimizer.lr, ...)
adds the sweep: the metric against KEY's values, mean ± 95% t-interval over seeds per
group, the lowrank runs (which do not use alpha, expand, scope, ...) as a band, and per value
the paired-by-seed difference to lowrank with its 95% interval; --out then also writes
by_KEY.md, by_KEY.csv and by_KEY.png.

Prints the table (Markdown) and, where two groups differ only in method, the per-seed
paired difference with its mean and standard error. --out DIR writes table.md, table.csv,
pairs.csv, val_ppl_vs_tokens.png and train_loss_vs_step.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlr.cli._common import EXIT_BAD_INPUT
from dlr.errors import ConfigError

PROG = "dlr-compare"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories, globs (quote them) or multirun folders")
    ap.add_argument("--out", type=Path, default=None, help="write table.md, table.csv, pairs.csv and PNG plots here")
    ap.add_argument("--metric", default="val_ppl",
                    help="summary.json key to compare (val_ppl, val_loss, folded_val_ppl, ...); default val_ppl")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib import)")
    ap.add_argument("--by", action="append", default=[], metavar="KEY",
                    help="sweep view over this config key (alpha, rank, expand, scope, variance_correction, ...); repeatable")
    return ap


def compare_main(argv: list[str]) -> int:
    from dlr import compare

    args = _parser().parse_args(argv)
    runs = compare.load_runs(args.runs)
    groups = compare.group_runs(runs)
    if all(compare.group_stats(g, args.metric).n == 0 for g in groups):
        raise ConfigError(f"--metric {args.metric!r} is in none of the runs' summary.json; e.g. val_ppl, val_loss, folded_val_ppl")
    pairs = compare.paired_differences(groups, args.metric)
    print(f"{len(runs)} run(s) in {len(groups)} group(s)\n")
    print(compare.markdown_table(groups, args.metric))
    paired = compare.paired_markdown(pairs, groups, args.metric)
    if paired:
        print(f"Paired by seed, {args.metric} of b minus a (negative = b lower):\n")
        print(paired)
    sweeps = {key: compare.sweep_points(groups, key, args.metric) for key in args.by}  # bad keys fail before writing
    for key, points in sweeps.items():
        print(f"{args.metric} by {key} (95% t-intervals over seeds; 'no difference' = the interval contains 0):\n")
        print(compare.sweep_markdown(points, key, args.metric))
    if args.out is not None:
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {str(args.out)!r} is a file; give a directory")
        files = compare.write_outputs(groups, args.metric, args.out, plots=not args.no_plots)
        for key in sweeps:
            files.update(compare.write_sweep(groups, key, args.metric, args.out, plots=not args.no_plots))
        print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = compare_main(argv)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code)


if __name__ == "__main__":
    main()
