"""Run a named sensitivity study (alpha, variance_correction, scope, expand, rank, or all).

    python -m experiments.study alpha --device cuda --jobs 10
    python -m experiments.study all --dry-run

See dlr/study.py for what each study runs, the run naming, resuming and the bundle;
experiments/render_ablations.py turns the results into docs/ablations.md.
"""
from dlr.study import cli

if __name__ == "__main__":
    cli()
