"""dlr-scaling's plots: loss against compute with each group's fitted frontier, and IsoFLOP curves."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .compare import outside_legend, pyplot, save_png

ISO_TOLERANCE = 0.10  # runs whose budgets agree within 10% are one IsoFLOP set
ISO_MIN_SIZES = 3  # a profile needs a minimum to show, so at least three sizes


def plot_loss_vs_compute(laws: list, labels: list[str], points: list[list[dict]], budgets: list[float],
                         path: Path) -> Path:
    """Each run as a point (C, loss); each group's loss at the compute-optimal (N, D) as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cs = [p["C"] for pts in points for p in pts]
    grid = np.logspace(math.log10(min(cs) / 2), math.log10(max(max(cs), *budgets) * 1.5), 60)
    for law, name, pts in zip(laws, labels, points):
        line, = ax.plot(grid, [law.loss_at(c) for c in grid], lw=1.5, label=f"{name}: fitted frontier")
        ax.scatter([p["C"] for p in pts], [p["loss"] for p in pts], s=18, color=line.get_color(),
                   label=f"{name}: runs (n={len(pts)})")
    for c in budgets:
        ax.axvline(c, color="grey", ls=":", lw=0.8)
    return _finish(plt, fig, ax, "training compute C (FLOPs; dotted: the at= budgets)", path)


def _finish(plt, fig, ax, xlabel: str, path: Path) -> Path:
    """Log x axis, loss on y, the legend outside the axes; saved and closed."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats)")
    ax.grid(True, alpha=0.3)
    outside_legend(ax)
    written = save_png(fig, path)
    plt.close(fig)
    return written


def isoflop_sets(pts: list[dict]) -> list[list[dict]]:
    """Runs of one group whose budgets agree within ISO_TOLERANCE, with ISO_MIN_SIZES sizes or more."""
    ordered = sorted(pts, key=lambda p: p["C"])
    sets, current = [], []
    for p in ordered:
        if current and p["C"] > current[0]["C"] * (1 + ISO_TOLERANCE):
            sets.append(current)
            current = []
        current.append(p)
    if current:
        sets.append(current)
    return [s for s in sets if len({p["N"] for p in s}) >= ISO_MIN_SIZES]


def plot_isoflops(laws: list, labels: list[str], points: list[list[dict]], path: Path) -> Path | None:
    """Loss against N at a fixed budget (Chinchilla's approach 2 view) with the law's curve; None if no set."""
    found = [(law, name, s) for law, name, pts in zip(laws, labels, points) for s in isoflop_sets(pts)]
    if not found:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for law, name, s in found:
        c = float(np.exp(np.mean(np.log([p["C"] for p in s]))))
        ns = np.logspace(math.log10(min(p["N"] for p in s) / 2), math.log10(max(p["N"] for p in s) * 2), 50)
        line, = ax.plot(ns, law.predict(ns, c / law.flops(ns)), lw=1.2, label=f"{name} at {c:.2g} FLOPs: law")
        ax.scatter([p["N"] for p in s], [p["loss"] for p in s], s=18, color=line.get_color(),
                   label=f"{name} at {c:.2g} FLOPs: runs")
    return _finish(plt, fig, ax, "non-embedding parameters N", path)
