"""Multi-seed comparison of finished runs: grouping, statistics, tables and plots.

A group is every run whose resolved config.yaml agrees on everything but the seed, the
out_dir and the runtime keys that `dlr.train.rundir` already treats as "same run" (logging,
checkpoint cadence, micro_batch, ...). Keys a method does not use (rank for `full`, alpha /
expand / scope for `lowrank`) are dropped too, so e.g. two `full` runs launched with
different `rank=` land in one group. Everything here is a plain function so that
`dlr-compare`, `scripts/run_results.py` and the tests share one implementation.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .train.rundir import RUNTIME_DATA_KEYS, RUNTIME_KEYS

# Beyond the runtime keys: what makes a run one sample of a group rather than another group.
SAMPLE_KEYS = {"seed", "out_dir"}
# Config keys a method does not read, so they must not split groups or block pairing.
UNUSED_BY_METHOD = {
    "full": {"rank", "alpha", "activation", "expand", "scope"},
    "lowrank": {"alpha", "expand", "scope"},
    "dlr": set(),
}
METHOD_ORDER = {"full": 0, "lowrank": 1, "dlr": 2}


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    records: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.config.get("method", self.summary.get("method", "?")))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", self.summary.get("seed", 0)))


@dataclass
class Group:
    key: tuple
    settings: dict  # flattened config without the seed / runtime keys
    runs: list[Run]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float  # sample std (ddof=1); nan for n < 2
    n: int


@dataclass(frozen=True)
class Paired:
    """b - a per seed present in both groups; a is the simpler method (full < lowrank < dlr)."""

    a: Group
    b: Group
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    stderr: float  # std(diffs, ddof=1) / sqrt(n); nan for n < 2


# ---------------------------------------------------------------- discovery and loading

def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "summary.json").is_file()


def find_run_dirs(args: Sequence[str]) -> list[Path]:
    """Expand RUN_DIRs, globs and multirun folders (any folder holding run dirs below it).

    A named path that is not a finished run and holds none raises ConfigError (one line):
    a typo must not silently shrink the comparison.
    """
    if not args:
        raise ConfigError("no run directories given; e.g. dlr-compare runs/llama_demo-*")
    found: list[Path] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise ConfigError(f"{arg!r} matches nothing; accepted: run directories, globs or multirun folders")
        for m in matches:
            p = Path(m)
            if not p.exists():
                raise ConfigError(f"{m!r} does not exist; accepted: run directories, globs or multirun folders")
            if not p.is_dir():
                if glob.has_magic(arg):
                    continue  # a glob may also match stray files next to the runs
                raise ConfigError(f"{m!r} is not a directory; accepted: run directories, globs or multirun folders")
            if _is_run(p):
                found.append(p)
                continue
            if (p / "config.yaml").is_file():
                raise ConfigError(f"{m!r} is an unfinished run (no summary.json); finish or resume it, or leave it out")
            # A multirun folder: finished runs anywhere below it (checkpoints/ and final/ hold no config.yaml).
            below = sorted({c.parent for c in p.rglob("summary.json") if _is_run(c.parent)})
            if not below:
                raise ConfigError(f"{m!r} is not a run directory (no config.yaml + summary.json) and holds none")
            found.extend(below)
    unique = list(dict.fromkeys(x.resolve() for x in found))
    return unique


def load_run(path: Path) -> Run:
    path = Path(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{str(path)!r} has an unreadable config.yaml or summary.json: {err}") from None
    records = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill: the rest of the file is still good
    return Run(path, config, summary, records)


def load_runs(args: Sequence[str]) -> list[Run]:
    return [load_run(p) for p in find_run_dirs(args)]


# ---------------------------------------------------------------- grouping

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings(run: Run) -> dict:
    """The flattened config that identifies the run's group (no seed, out_dir, runtime keys)."""
    flat = _flatten(run.config)
    ignored = SAMPLE_KEYS | RUNTIME_KEYS | {f"data.{k}" for k in RUNTIME_DATA_KEYS}
    ignored |= UNUSED_BY_METHOD.get(run.method, set())
    return {k: v for k, v in flat.items() if k not in ignored and k.split(".")[0] not in ignored}


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Runs that differ only in the seed (and runtime keys) form one group; order: model, method, rank."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        s = settings(run)
        key = tuple(sorted((k, _freeze(v)) for k, v in s.items()))
        groups.setdefault(key, Group(key, s, [])).runs.append(run)
    for g in groups.values():
        g.runs.sort(key=lambda r: r.seed)
    return sorted(groups.values(), key=lambda g: (str(g.settings.get("model.name")), METHOD_ORDER.get(g.method, 9),
                                                  str(g.settings.get("rank", "")), str(g.key)))


def varying_keys(groups: Sequence[Group]) -> list[str]:
    """Settings that differ between groups: what a reader needs to tell the rows apart."""
    keys = sorted(set().union(*(g.settings for g in groups))) if groups else []
    # Among the groups that use the key: lowrank has no alpha, which is no reason to print dlr's.
    return [k for k in keys if len({repr(g.settings[k]) for g in groups if k in g.settings}) > 1]


def label(group: Group, keys: Sequence[str]) -> str:
    # optimizer.lr is `${lr}` in the optimizer configs: printing both says the same thing twice.
    shown = [k for k in keys if k not in ("method", "model.name") and not (k == "optimizer.lr" and "lr" in keys)]
    parts = [group.method] + [f"{k}={group.settings[k]}" for k in shown if k in group.settings]
    return " ".join(parts)


# ---------------------------------------------------------------- statistics

def metric_value(run: Run, metric: str) -> float | None:
    """A final number from summary.json, else the last metrics.jsonl record that has it."""
    v = run.summary.get(metric)
    if v is None:
        v = next((r[metric] for r in reversed(run.records) if metric in r), None)
    return float(v) if v is not None else None


def stats(values: Sequence[float]) -> Stats:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return Stats(math.nan, math.nan, 0)
    return Stats(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan, len(vals))


def group_stats(group: Group, metric: str) -> Stats:
    return stats([metric_value(r, metric) for r in group.runs])


def _pairable(a: Group, b: Group) -> bool:
    if a.method == b.method:
        return False
    unused = UNUSED_BY_METHOD.get(a.method, set()) | UNUSED_BY_METHOD.get(b.method, set()) | {"method"}
    keys = (set(a.settings) | set(b.settings)) - unused
    return all(a.settings.get(k) == b.settings.get(k) for k in keys)


def paired_differences(groups: Sequence[Group], metric: str) -> list[Paired]:
    """Every pair of groups that differ only in method, paired by seed (same seed = same data order)."""
    out = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if not _pairable(a, b):
                continue
            if METHOD_ORDER.get(a.method, 9) > METHOD_ORDER.get(b.method, 9):
                a, b = b, a
            va = {r.seed: metric_value(r, metric) for r in a.runs}
            vb = {r.seed: metric_value(r, metric) for r in b.runs}
            seeds = tuple(s for s in sorted(set(va) & set(vb)) if va[s] is not None and vb[s] is not None)
            diffs = tuple(vb[s] - va[s] for s in seeds)
            st = stats(diffs)
            stderr = st.std / math.sqrt(st.n) if st.n > 1 else math.nan
            out.append(Paired(a, b, seeds, diffs, st.mean, stderr))
    return out


# ---------------------------------------------------------------- tables

TABLE_COLUMNS = ["group", "method", "size", "rank", "alpha", "steps", "tokens", "n", "seeds",
                 "{metric}_mean", "{metric}_std", "deploy_params", "tokens_per_s"]


def _first(group: Group, key: str) -> Any:
    return next((r.summary[key] for r in group.runs if r.summary.get(key) is not None), None)


def table_rows(groups: Sequence[Group], metric: str) -> list[dict]:
    keys = varying_keys(groups)
    rows = []
    for g in groups:
        st = group_stats(g, metric)
        tps = stats([r.summary.get("mean_tokens_per_s") for r in g.runs])
        rows.append({
            "group": label(g, keys), "method": g.method, "size": g.settings.get("model.name", _first(g, "model")),
            "rank": _first(g, "rank") if g.method != "full" else None,
            "alpha": g.settings.get("alpha") if g.method == "dlr" else None,
            "steps": _first(g, "steps"), "tokens": _first(g, "tokens"), "n": st.n,
            "seeds": " ".join(str(s) for s in g.seeds),
            f"{metric}_mean": st.mean, f"{metric}_std": st.std,
            "deploy_params": _first(g, "deploy_params"), "tokens_per_s": tps.mean,
        })
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) >= 1e-2 or v == 0 else f"{v:.3g}"
    return str(v)


def mean_std_text(mean: float, std: float, n: int, digits: int = 2) -> str:
    if n == 0:
        return "—"
    spread = f" ± {std:.{digits}f}" if n > 1 else ""
    return f"{mean:.{digits}f}{spread} (n={n})"


def markdown_table(groups: Sequence[Group], metric: str) -> str:
    rows = table_rows(groups, metric)
    head = ["group", "method", "size", "rank", "alpha", "steps", "tokens", f"{metric} mean ± std (n)",
            "deploy params", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["group"], r["method"], r["size"], _fmt(r["rank"]), _fmt(r["alpha"], 3), _fmt(r["steps"]),
                 _fmt(r["tokens"]), mean_std_text(r[f"{metric}_mean"], r[f"{metric}_std"], r["n"]),
                 _fmt(r["deploy_params"]), _fmt(r["tokens_per_s"], 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def paired_markdown(pairs: Sequence[Paired], groups: Sequence[Group], metric: str) -> str:
    if not pairs:
        return ""
    keys = varying_keys(groups)
    lines = [f"| comparison | seeds | per-seed {metric} difference (b - a) | mean | standard error |", "|---|---|---|---|---|"]
    for p in pairs:
        per_seed = ", ".join(f"s{s}: {d:+.3f}" for s, d in zip(p.seeds, p.diffs))
        lines.append(f"| {label(p.b, keys)} − {label(p.a, keys)} | {len(p.seeds)} | {per_seed or '—'} "
                     f"| {_fmt_signed(p.mean)} | {_fmt(p.stderr, 3)} |")
    return "\n".join(lines) + "\n"


def _fmt_signed(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:+.3f}"


def csv_text(groups: Sequence[Group], metric: str) -> str:
    rows = table_rows(groups, metric)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[c.format(metric=metric) for c in TABLE_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})
    return buf.getvalue()


def pairs_csv_text(pairs: Sequence[Paired], groups: Sequence[Group], metric: str) -> str:
    keys = varying_keys(groups)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["a", "b", "seed", f"{metric}_a", f"{metric}_b", "diff_b_minus_a"])
    for p in pairs:
        a = {r.seed: metric_value(r, metric) for r in p.a.runs}
        b = {r.seed: metric_value(r, metric) for r in p.b.runs}
        for s, d in zip(p.seeds, p.diffs):
            writer.writerow([label(p.a, keys), label(p.b, keys), s, a[s], b[s], d])
    return buf.getvalue()


# ---------------------------------------------------------------- curves and plots

def curve(group: Group, key: str, x: str) -> tuple[list[float], list[float], list[float], list[int]]:
    """(xs, mean, std, n) of `key` over the group's seeds at each `x` every seed logged.

    Only x values present in every run are kept, so the band never mixes n=3 with n=1 points
    (a run that stopped early would otherwise bend the mean).
    """
    per_run = [{r[x]: float(r[key]) for r in run.records if key in r and x in r} for run in group.runs]
    per_run = [d for d in per_run if d]
    if not per_run:
        return [], [], [], []
    common = sorted(set.intersection(*(set(d) for d in per_run)))
    xs, means, stds, ns = [], [], [], []
    for v in common:
        st = stats([d[v] for d in per_run])
        xs.append(v)
        means.append(st.mean)
        stds.append(0.0 if math.isnan(st.std) else st.std)
        ns.append(st.n)
    return xs, means, stds, ns


def plot_curves(groups: Sequence[Group], out_dir: Path) -> list[Path]:
    """val_ppl vs tokens (mean and ± std band over seeds) and train loss vs step, one line per group."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    keys = varying_keys(groups)
    written = []
    specs = [("val_ppl", "tokens", "validation perplexity", "tokens", "val_ppl_vs_tokens.png", True),
             ("loss", "step", "training loss", "step", "train_loss_vs_step.png", False)]
    for key, x, ylabel, xlabel, name, log_y in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for g in groups:
            xs, mean, std, ns = curve(g, key, x)
            if not xs:
                continue
            drawn = True
            line, = ax.plot(xs, mean, marker="o" if len(xs) < 30 else None, ms=3,
                            label=f"{label(g, keys)} (n={max(ns)})")
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if log_y and drawn:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + " (mean ± std over seeds)")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(groups: Sequence[Group], metric: str, out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """table.md (groups + paired differences), table.csv, pairs.csv and the PNG plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = paired_differences(groups, metric)
    md = markdown_table(groups, metric)
    paired = paired_markdown(pairs, groups, metric)
    if paired:
        md += f"\nPaired by seed (same seed = same init and data order), {metric} of b minus a:\n\n" + paired
    files = {"table.md": out_dir / "table.md", "table.csv": out_dir / "table.csv", "pairs.csv": out_dir / "pairs.csv"}
    files["table.md"].write_text(md)
    files["table.csv"].write_text(csv_text(groups, metric))
    files["pairs.csv"].write_text(pairs_csv_text(pairs, groups, metric))
    if plots:
        for p in plot_curves(groups, out_dir):
            files[p.name] = p
    return files
