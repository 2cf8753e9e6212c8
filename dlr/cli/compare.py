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
import dataclasses
import sys
from pathlib import Path

from dlr.atomic import check_writable
from dlr.cli._common import run_cli
from dlr.errors import ConfigError
from dlr.config import CompareConfig, build

PROG = "dlr-compare"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2, like every dlr command
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    """Built from dlr.config.CompareConfig: `runs` positional, every other field a --flag."""
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(CompareConfig):
        doc = f.metadata["doc"]
        flag = f"--{f.name.replace('_', '-')}"
        if f.name == "runs":
            ap.add_argument("runs", nargs="*", metavar="RUN_DIR", help=doc)
        elif f.type == "bool":
            ap.add_argument(flag, dest=f.name, action="store_true", help=doc)
        elif f.type == "list":  # repeatable
            ap.add_argument(flag, dest=f.name, action="append", default=[], metavar="KEY", help=doc)
        else:
            ap.add_argument(flag, dest=f.name, default=f.default, help=f"{doc} (default {f.default})")
    return ap


def compare_main(argv: list[str]) -> int:
    from dlr import compare

    args = _parser().parse_args(argv)
    build(CompareConfig, vars(args))
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        check_writable(out, "--out")  # before any run is read
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
    if out is not None:
        if not args.no_plots:
            compare.pyplot()  # a missing matplotlib is refused before any file is written
        files = compare.write_outputs(groups, args.metric, out, plots=not args.no_plots)
        for key in sweeps:
            files.update(compare.write_sweep(groups, key, args.metric, out, plots=not args.no_plots))
        print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, _parser().format_help(), compare_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
