"""Multi-seed comparison of finished runs: grouping, statistics, tables and plots.

A group is every run whose resolved config.yaml agrees on everything but the seed, the
out_dir and the runtime keys that `dlr.artifacts.run_dir` already treats as "same run" (logging,
checkpoint cadence, micro_batch, ...). Keys a method does not use (rank for `full`, alpha /
expand / scope for `lowrank`) are dropped too, so e.g. two `full` runs launched with
different `rank=` land in one group. Everything here is a plain function so that
`dlr-compare`, `experiments/run_results.py` and the tests share one implementation.
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


from ..atomic import check_writable, write_atomic
from ..errors import ConfigError
from ..config import LOWRANK, METHODS, display_key, short_form
from ..artifacts.run_dir import RUNTIME_KEYS as _RUNTIME_KEYS, read_run_config

RUNTIME_KEYS = {display_key("train", k) for k in _RUNTIME_KEYS}

# Beyond the runtime keys: what makes a run one sample of a group rather than another group.
SAMPLE_KEYS = {"seed", "out_dir"}


def unused_by(method: str) -> set[str]:
    """Config keys `method` does not read, so they must not split groups or block pairing."""
    return METHODS[method].unused() if method in METHODS else set()


def method_order(method: str) -> int:
    """Simpler methods first, as declared (full < lowrank < dlr < registered ones); unknown last."""
    return list(METHODS).index(method) if method in METHODS else len(METHODS)


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
    config = short_form("train", read_run_config(path))
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(path)!r} has an unreadable summary.json ({type(err).__name__}); accepted: "
                          "the summary.json dlr-train wrote") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{str(path / 'summary.json')!r} holds a JSON {type(summary).__name__}, not an object; "
                          "accepted: the summary.json dlr-train wrote")
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


def matches(key: str, names: Iterable[str]) -> bool:
    """`key` (dotted, e.g. schedule.steps) is one of `names`, lies below one, or has one as its leaf."""
    return any(key == n or key.startswith(n + ".") or key.rpartition(".")[2] == n for n in names)


def settings(run: Run, ignore: Iterable[str] = ()) -> dict:
    """The flattened config that identifies the run's group (no seed, out_dir, runtime keys).

    `ignore` names more keys to leave out (matched as `matches` does), e.g. the size and the
    budget, which dlr-scaling fits over instead of grouping by.
    """
    flat = _flatten(run.config)
    ignored = SAMPLE_KEYS | RUNTIME_KEYS
    ignored |= unused_by(run.method)
    extra = tuple(ignore)
    return {k: v for k, v in flat.items()
            if k not in ignored and k.split(".")[0] not in ignored and not matches(k, extra)}


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def group_runs(runs: Iterable[Run], ignore: Iterable[str] = ()) -> list[Group]:
    """Runs that differ only in the seed (and runtime keys) form one group; order: model, method, rank."""
    ignore = tuple(ignore)
    groups: dict[tuple, Group] = {}
    for run in runs:
        s = settings(run, ignore)
        key = tuple(sorted((k, _freeze(v)) for k, v in s.items()))
        groups.setdefault(key, Group(key, s, [])).runs.append(run)
    for g in groups.values():
        g.runs.sort(key=lambda r: r.seed)
    return sorted(groups.values(), key=lambda g: (str(g.settings.get("model.name")), method_order(g.method),
                                                  str(g.settings.get("rank", "")), str(g.key)))


def varying_keys(groups: Sequence[Group]) -> list[str]:
    """Settings that differ between groups: what a reader needs to tell the rows apart."""
    keys = sorted(set().union(*(g.settings for g in groups))) if groups else []
    # Among the groups that use the key: lowrank has no alpha, which is no reason to print dlr's.
    return [k for k in keys if len({repr(g.settings[k]) for g in groups if k in g.settings}) > 1]


def label_names(keys: Sequence[str]) -> dict[str, str]:
    """{key: the name a label shows}, shortest first: what a reader needs to tell groups apart.

    A leaf name stands for its dotted key when no other shown key has that leaf (alpha, not
    factorization.alpha); `x.name` is shown as `x` (the model's or optimizer's name); the
    method leads every label and is not repeated. A differing model name implies its
    dimensions and default rank, and `optimizer.lr` repeats `lr`, so neither is shown.
    """
    shown = [k for k in keys if k.rpartition(".")[2] != "method"]
    names = {k for k in shown if k.endswith(".name")}
    shown = [k for k in shown if not any(k.startswith(n[: -len("name")]) and k != n for n in names)]
    if any(k.rpartition(".")[2] == "lr" and not k.startswith("optimizer.") for k in shown):
        shown = [k for k in shown if k != "optimizer.lr"]
    leaves = [k.rpartition(".")[2] for k in shown]
    out = {}
    for k, leaf in zip(shown, leaves):
        if leaf == "name" and "." in k:
            out[k] = k.rpartition(".")[0].rpartition(".")[2]
        else:
            out[k] = leaf if leaves.count(leaf) == 1 else k
    return dict(sorted(out.items(), key=lambda kv: (len(kv[1]), kv[1])))


def _value_text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def label(group: Group, keys: Sequence[str]) -> str:
    parts = [group.method] + [f"{name}={_value_text(group.settings[k])}" for k, name in label_names(keys).items()
                              if k in group.settings]
    return " ".join(parts)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one line naming the extra that brings it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib, which is not installed; accepted: pip install 'dlr[plots]', "
                          "or plots=false") from None
    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """PNG with the legend outside the axes kept whole (bbox_inches='tight' grows the canvas)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    fig.clear()
    return write_atomic(Path(path), buf.getvalue())


def outside_legend(ax, **kw) -> None:
    """Legend to the right of the axes: long labels never cover the data or get cut."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=kw.pop("fontsize", 8), **kw)


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
    unused = unused_by(a.method) | unused_by(b.method) | {"method"}
    keys = (set(a.settings) | set(b.settings)) - unused
    return all(a.settings.get(k) == b.settings.get(k) for k in keys)


def paired_differences(groups: Sequence[Group], metric: str) -> list[Paired]:
    """Every pair of groups that differ only in method, paired by seed (same seed = same data order)."""
    out = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if not _pairable(a, b):
                continue
            if method_order(a.method) > method_order(b.method):
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


def _reads(method: str, knob: str) -> bool:
    return method in METHODS and METHODS[method].reads(knob)


def table_rows(groups: Sequence[Group], metric: str) -> list[dict]:
    keys = varying_keys(groups)
    rows = []
    for g in groups:
        st = group_stats(g, metric)
        tps = stats([r.summary.get("mean_tokens_per_s") for r in g.runs])
        rows.append({
            "group": label(g, keys), "method": g.method, "size": g.settings.get("model.name", _first(g, "model")),
            "rank": _first(g, "rank") if _reads(g.method, "rank") else None,
            "alpha": g.settings.get("alpha") if _reads(g.method, "alpha") else None,
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
    plt = pyplot()
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
            outside_legend(ax)
        written.append(save_png(fig, Path(out_dir) / name))
        plt.close(fig)
    return written


def write_outputs(groups: Sequence[Group], metric: str, out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """table.md (groups + paired differences), table.csv, pairs.csv and the PNG plots."""
    out_dir = Path(out_dir)
    check_writable(out_dir, "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = paired_differences(groups, metric)
    md = markdown_table(groups, metric)
    paired = paired_markdown(pairs, groups, metric)
    if paired:
        md += f"\nPaired by seed (same seed = same init and data order), {metric} of b minus a:\n\n" + paired
    files = {"table.md": out_dir / "table.md", "table.csv": out_dir / "table.csv", "pairs.csv": out_dir / "pairs.csv"}
    write_atomic(files["table.md"], md)
    write_atomic(files["table.csv"], csv_text(groups, metric))
    write_atomic(files["pairs.csv"], pairs_csv_text(pairs, groups, metric))
    if plots:
        for p in plot_curves(groups, out_dir):
            files[p.name] = p
    return files


# ---------------------------------------------------------------- sensitivity (by=KEY)

def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half width of the two-sided `level` t-interval, n); the half width is nan for n < 2."""
    st = stats(values)
    if st.n < 2:
        return st.mean, math.nan, st.n
    from scipy.stats import t

    return st.mean, float(t.ppf(0.5 + level / 2, st.n - 1)) * st.std / math.sqrt(st.n), st.n


def _paired(a: Group, b: Group, metric: str) -> Paired:
    va = {r.seed: metric_value(r, metric) for r in a.runs}
    vb = {r.seed: metric_value(r, metric) for r in b.runs}
    seeds = tuple(s for s in sorted(set(va) & set(vb)) if va[s] is not None and vb[s] is not None)
    diffs = tuple(vb[s] - va[s] for s in seeds)
    st = stats(diffs)
    return Paired(a, b, seeds, diffs, st.mean, st.std / math.sqrt(st.n) if st.n > 1 else math.nan)


@dataclass(frozen=True)
class SweepPoint:
    """One group of a sweep: its swept value, mean ± 95% t-interval, and the paired difference to lowrank."""

    group: Group
    value: Any  # the swept setting's value; None for a group that does not use it (a baseline)
    series: str  # the group's other distinguishing settings ("" when there is one series)
    mean: float
    half: float
    n: int
    baseline: Paired | None  # metric of this group minus lowrank's, by seed
    diff_half: float

    @property
    def verdict(self) -> str:
        """Read honestly: a difference whose 95% interval contains 0 is no difference."""
        if self.baseline is None or math.isnan(self.diff_half):
            return "—"
        if self.baseline.mean + self.diff_half < 0:
            return "lower"
        if self.baseline.mean - self.diff_half > 0:
            return "higher"
        return "no difference"


def _sort_key(v: Any) -> tuple:
    if isinstance(v, bool):
        return (1, int(v), "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (2, 0.0, str(v))


def sweep_points(groups: Sequence[Group], key: str, metric: str) -> list[SweepPoint]:
    """Every group as a point of the sweep over `key` (a flattened config key, e.g. alpha, rank).

    Groups that do not use `key` (lowrank for alpha) are baselines with value None. Each
    non-lowrank group is paired by seed with the lowrank group it differs from in method only
    (the keys lowrank does not read are ignored), so dlr at alpha=0.5 and at alpha=2 are both
    compared with the same lowrank runs, and dlr at rank 16 with lowrank at rank 16.
    """
    if not any(key in g.settings for g in groups):
        accepted = ", ".join(varying_keys(groups)) or "(no setting varies between these runs)"
        raise ConfigError(f"by={key!r} is a setting of none of the runs; accepted (settings that vary): {accepted}")
    swept = [g for g in groups if key in g.settings]
    series_keys = [k for k in varying_keys(swept) if k != key]
    lowrank = [g for g in groups if g.method == LOWRANK.name]
    points = []
    for g in groups:
        mean, half, n = t_interval([metric_value(r, metric) for r in g.runs])
        base = next((lg for lg in lowrank if lg is not g and _pairable(lg, g)), None) if g.method != LOWRANK.name else None
        paired = _paired(base, g, metric) if base is not None else None
        diff_half = math.nan
        if paired is not None and len(paired.diffs) > 1:
            diff_half = t_interval(paired.diffs)[1]
        value = g.settings.get(key) if key in g.settings else None
        points.append(SweepPoint(g, value, label(g, series_keys), mean, half, n, paired, diff_half))
    # Baselines first, then by value, lowrank before dlr at the same value (rank: 16 lowrank, 16 dlr, 32 ...).
    return sorted(points, key=lambda p: (p.value is not None, _sort_key(p.value) if p.value is not None else (),
                                         method_order(p.group.method), p.series))


def _pm(mean: float, half: float, digits: int = 2, signed: bool = False) -> str:
    if math.isnan(mean):
        return "—"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return m if math.isnan(half) else f"{m} ± {half:.{digits}f}"


def sweep_markdown(points: Sequence[SweepPoint], key: str, metric: str) -> str:
    head = [key, "group", "n", f"{metric} mean ± 95% CI", "minus lowrank, paired by seed (mean ± 95% CI)",
            "per-seed differences", "reading"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in zip(p.baseline.seeds, p.baseline.diffs)) if p.baseline else "—"
        diff = _pm(p.baseline.mean, p.diff_half, signed=True) if p.baseline else "—"
        cells = ["(not used)" if p.value is None else str(p.value), p.series, str(p.n), _pm(p.mean, p.half), diff,
                 per_seed, p.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_csv(points: Sequence[SweepPoint], key: str, metric: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key, "group", "method", "n", "seeds", f"{metric}_mean", f"{metric}_ci95",
                     "diff_to_lowrank_mean", "diff_to_lowrank_ci95", "diff_n", "reading"])
    nan = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
    for p in points:
        b = p.baseline
        writer.writerow(["" if p.value is None else p.value, p.series, p.group.method, p.n,
                         " ".join(map(str, p.group.seeds)), nan(p.mean), nan(p.half),
                         nan(b.mean if b else None), nan(p.diff_half), len(b.seeds) if b else "", p.verdict])
    return buf.getvalue()


def plot_sweep(points: Sequence[SweepPoint], key: str, metric: str, path: Path) -> Path:
    """metric vs the swept value: mean ± 95% t-interval per series, lowrank as a band."""
    plt = pyplot()
    values = sorted({p.value for p in points if p.value is not None}, key=_sort_key)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    log_x = numeric and values and min(values) > 0 and max(values) / min(values) >= 8
    pos = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    lo_x, hi_x = (min(pos.values()), max(pos.values())) if pos else (0.0, 1.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[SweepPoint]] = {}
    for p in points:
        series.setdefault((p.group.method, p.series), []).append(p)
    n_swept = sum(1 for (m, _), ps in series.items() if m != LOWRANK.name and ps[0].value is not None)
    i_swept = 0
    for (method, name), ps in series.items():
        text = f"{name} (n={max(p.n for p in ps)})"
        if ps[0].value is None:  # does not use the key: a horizontal band over the whole range
            for p in ps:
                half = 0.0 if math.isnan(p.half) else p.half
                line = ax.axhline(p.mean, ls="--", lw=1, color="grey" if method != LOWRANK.name else "black", label=f"{text}, mean ± 95% CI")
                ax.axhspan(p.mean - half, p.mean + half, color=line.get_color(), alpha=0.15, lw=0)
            continue
        ps = sorted(ps, key=lambda p: _sort_key(p.value))
        xs = [pos[p.value] for p in ps]
        means = [p.mean for p in ps]
        halves = [0.0 if math.isnan(p.half) else p.half for p in ps]
        if method == LOWRANK.name:  # a baseline that depends on the key (e.g. rank): a band along x
            line, = ax.plot(xs, means, ls="--", color="black", lw=1, label=f"{text}, mean ± 95% CI")
            ax.fill_between(xs, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                            color="black", alpha=0.12, lw=0)
            continue
        # A small horizontal offset per series keeps overlapping error bars readable.
        shift = (i_swept - (n_swept - 1) / 2) * 0.06
        i_swept += 1
        xs_plot = [x * (2 ** shift) if log_x else x + shift * (1 if not numeric else (hi_x - lo_x or 1) / 4) for x in xs]
        ax.errorbar(xs_plot, means, yerr=halves, marker="o", ms=4, capsize=3, label=f"{text}, mean ± 95% CI")
    if log_x:
        ax.set_xscale("log", base=2)
    if pos:
        ax.set_xticks(list(pos.values()), [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (mean ± 95% t-interval over seeds)")
    ax.grid(True, alpha=0.3)
    outside_legend(ax, fontsize=7)
    written = save_png(fig, path)
    plt.close(fig)
    return written


def write_sweep(groups: Sequence[Group], key: str, metric: str, out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """by_<key>.md, by_<key>.csv and by_<key>.png in out_dir."""
    points = sweep_points(groups, key, metric)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "by_" + key.replace(".", "_").replace("/", "_")
    files = {f"{stem}.md": out_dir / f"{stem}.md", f"{stem}.csv": out_dir / f"{stem}.csv"}
    write_atomic(files[f"{stem}.md"], sweep_markdown(points, key, metric))
    write_atomic(files[f"{stem}.csv"], sweep_csv(points, key, metric))
    if plots:
        files[f"{stem}.png"] = plot_sweep(points, key, metric, out_dir / f"{stem}.png")
    return files
