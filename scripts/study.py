"""Run a named sensitivity study (alpha, variance_correction, scope, expand, rank, or all).

    python scripts/study.py alpha --device cuda --jobs 10
    python scripts/study.py all --dry-run

See dlr/study.py for what each study runs, the run naming, resuming and the bundle;
scripts/render_ablations.py turns the results into docs/ablations.md.
"""
from dlr.study import cli

if __name__ == "__main__":
    cli()
