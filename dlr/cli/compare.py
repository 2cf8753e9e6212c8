"""dlr-compare: group finished runs by everything but the seed; mean ± std, paired differences, plots.

    dlr-compare runs/llama_demo-*                      # a glob
    dlr-compare sweep/ out=compare/                    # a multirun folder (runs anywhere below)
    dlr-compare runs/a-s0 runs/a-s1 runs/b-s0 metric=folded_val_ppl
    dlr-compare study/runs by=alpha out=study/alpha    # sensitivity: val_ppl vs alpha

Run directories are given bare; every other setting is key=value (dlr.config.CompareConfig).
by=KEY (any config key, dotted for nested ones: alpha, rank, expand, optimizer.weight_decay,
...; comma-separated for several) adds the sweep: the metric against KEY's values, mean ± 95%
t-interval over seeds per group, the lowrank runs (which do not use alpha, expand, scope, ...)
as a band, and per value the paired-by-seed difference to lowrank with its 95% interval;
out= then also writes by_KEY.md, by_KEY.csv and by_KEY.png.

Prints the table (Markdown) and, where two groups differ only in method, the per-seed
paired difference with its mean and standard error. out=DIR writes table.md, table.csv,
pairs.csv, val_ppl_vs_tokens.png and train_loss_vs_step.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

from dlr.atomic import check_writable
from dlr.cli._common import run_cli
from dlr.config import from_command_line
from dlr.errors import ConfigError

PROG = "dlr-compare"


def compare_main(argv: list[str]) -> int:
    from ..analysis import compare

    cfg = from_command_line("compare", argv)
    out = Path(cfg.out) if cfg.out is not None else None
    if out is not None:
        check_writable(out, "out")  # before any run is read
    runs = compare.load_runs(cfg.runs)
    groups = compare.group_runs(runs)
    if all(compare.group_stats(g, cfg.metric).n == 0 for g in groups):
        raise ConfigError(f"metric={cfg.metric!r} is in none of the runs' summary.json; e.g. val_ppl, val_loss, "
                          "folded_val_ppl")
    pairs = compare.paired_differences(groups, cfg.metric)
    print(f"{len(runs)} run(s) in {len(groups)} group(s)\n")
    print(compare.markdown_table(groups, cfg.metric))
    paired = compare.paired_markdown(pairs, groups, cfg.metric)
    if paired:
        print(f"Paired by seed, {cfg.metric} of b minus a (negative = b lower):\n")
        print(paired)
    sweeps = {key: compare.sweep_points(groups, key, cfg.metric) for key in cfg.by}  # bad keys fail before writing
    for key, points in sweeps.items():
        print(f"{cfg.metric} by {key} (95% t-intervals over seeds; 'no difference' = the interval contains 0):\n")
        print(compare.sweep_markdown(points, key, cfg.metric))
    if out is not None:
        if cfg.plots:
            compare.pyplot()  # a missing matplotlib is refused before any file is written
        files = compare.write_outputs(groups, cfg.metric, out, plots=cfg.plots)
        for key in sweeps:
            files.update(compare.write_sweep(groups, key, cfg.metric, out, plots=cfg.plots))
        print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, __doc__, compare_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
