"""The reproductions of docs/results.md, docs/ablations.md and docs/downstream.md. Run each from
the repository root as `python -m experiments.NAME`."""
