"""The library side of dlr-scaling: finished runs -> one fitted law per group -> predictions,
differences between groups, tables, fit.json and plots (the command parses and prints)."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dlr.errors import ConfigError

# What a law is fitted over, so it does not split groups: the size and the budget.
SIZE_AND_BUDGET = ("model", "rank", "steps", "tokens")
# A size's recipe values (configs/model/*.yaml) belong to the size.
RECIPE_KEYS = ("lr", "global_batch")


@dataclass(frozen=True)
class ScalingRequest:
    """What to fit: the run directories (globs, folders) and how."""

    runs: list
    metric: str = "val_loss"
    bootstrap: int = 200
    seed: int = 0
    level: float = 0.95
    plots: bool = True


def _shown_path(path: Path) -> str:
    """Relative to the working directory where it lies below it: fit.json then reads the same elsewhere."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _point(run, metric: str) -> dict:
    s = run.summary
    keys = ("train_non_embedding_params", "tokens", "train_flops_per_token")
    missing = [k for k in (*keys, metric) if s.get(k) is None]
    if missing:
        raise ConfigError(f"{str(run.path)!r} has no {', '.join(missing)} in summary.json; accepted: runs written by "
                          "dlr-train, with a metric= their summary.json holds (val_loss, folded_val_loss, ...)")
    values = {}
    for k in (*keys, metric):
        try:
            values[k] = float(s[k])
        except (TypeError, ValueError):
            values[k] = math.nan
        if not (math.isfinite(values[k]) and values[k] > 0):
            raise ConfigError(f"{str(run.path)!r} has {k}={s[k]!r} in summary.json; accepted: a positive finite number "
                              "(leave out a run that diverged)")
    n, d, fpt = (values[k] for k in keys)
    return {"run": _shown_path(run.path), "N": n, "D": d, "C": fpt * d, "flops_per_token": fpt, "loss": values[metric]}


def _size_free_settings(run) -> dict:
    from . import compare

    flat = compare.settings(run, SIZE_AND_BUDGET)
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    # The size's own recipe value (e.g. the per-size lr) belongs to the size, not to the group.
    recipe = _recipe(model.get("name"))
    return {k: ("recipe" if k.rpartition(".")[2] in RECIPE_KEYS and recipe.get(k.rpartition(".")[2]) == v else v)
            for k, v in flat.items()}


def _recipe(name: str | None) -> dict:
    """The recipe of the run's size (configs/model/<name>.yaml); none for a name the zoo lacks."""
    from ..model.sizes import recipe, size_names

    return recipe(name) if name in size_names() else {}


def group_for_scaling(runs: list) -> list:
    """compare.Group per setting, over sizes and budgets; order as dlr-compare's."""
    from . import compare

    groups: dict[tuple, compare.Group] = {}
    for run in runs:
        s = _size_free_settings(run)
        key = tuple(sorted((k, repr(v)) for k, v in s.items()))
        groups.setdefault(key, compare.Group(key, s, [])).runs.append(run)
    return sorted(groups.values(), key=lambda g: (compare.method_order(g.method), str(g.key)))


def _check_counts(groups: list, labels: list[str], points: list[list[dict]]) -> None:
    from .scaling import MIN_POINTS, unidentified

    for g, name, pts in zip(groups, labels, points):
        distinct = len({(p["N"], p["D"]) for p in pts})
        if distinct < MIN_POINTS:
            raise ConfigError(f"group {name!r} has {distinct} distinct (N, D) point(s) ({len(pts)} run(s)); a fit of "
                              f"{MIN_POINTS} parameters needs at least {MIN_POINTS}: add sizes or token budgets")
        why = unidentified([p["N"] for p in pts], [p["D"] for p in pts])
        if why:
            raise ConfigError(f"group {name!r}: {why}")


# ---------------------------------------------------------------- predictions

def default_budgets(points: list[list[dict]]) -> list[float]:
    top = max(p["C"] for pts in points for p in pts)
    k = math.ceil(math.log10(top))
    return [10.0 ** (k + i) for i in range(3)]


def predictions(laws: list, labels: list[str], budgets: list[float], level: float) -> list[dict]:
    import numpy as np

    rows = []
    tail = (1 - level) / 2 * 100
    for law, name in zip(laws, labels):
        for c in budgets:
            n, d = law.optimal(c)
            loss = law.loss_at(c)
            samples = law.sample_losses_at(c)
            lo, hi = (np.percentile(samples, [tail, 100 - tail]) if len(samples) else (math.nan, math.nan))
            rows.append({"group": name, "flops": c, "N_opt": n, "D_opt": d, "loss": loss, "loss_lo": float(lo),
                         "loss_hi": float(hi), "ppl": math.exp(loss), "ppl_lo": math.exp(lo), "ppl_hi": math.exp(hi)})
    return rows


def differences(groups: list, laws: list, labels: list[str], budgets: list[float], level: float) -> list[dict]:
    """b - a for every two groups (a the simpler method), with the reading of its interval."""
    from . import compare
    from .scaling import difference_at

    rows = []
    order = sorted(range(len(groups)), key=lambda i: (compare.method_order(groups[i].method), i))
    for x, i in enumerate(order):
        for j in order[x + 1:]:
            for c in budgets:
                diff, lo, hi = difference_at(laws[i], laws[j], c, level)
                reading = "no difference" if not (lo > 0 or hi < 0) else ("higher" if lo > 0 else "lower")
                rows.append({"a": labels[i], "b": labels[j], "flops": c, "diff": diff, "lo": lo, "hi": hi,
                             "reading": reading if math.isfinite(lo) else "—"})
    return rows


# ---------------------------------------------------------------- text

def _g(v: float, digits: int = 3) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def params_markdown(laws: list, labels: list[str], level: float) -> str:
    head = ["group", "points", "E", "A", "alpha", "B", "beta", "residual rms (log)", "converged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for law, name in zip(laws, labels):
        cells = [name, str(len(law.points))]
        for k in ("E", "A", "alpha", "B", "beta"):
            lo, hi = law.intervals.get(k, (math.nan, math.nan))
            cells.append(f"{_g(getattr(law, k))} [{_g(lo)}, {_g(hi)}]")
        rms = math.sqrt(sum(r * r for r in law.residuals) / len(law.residuals))
        cells += [f"{rms:.3g}", "yes" if law.converged else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return f"Fitted L(N, D) = E + A N^-alpha + B D^-beta, [{level:.0%} bootstrap interval]:\n\n" + "\n".join(lines) + "\n"


def predictions_markdown(rows: list[dict], level: float) -> str:
    head = ["group", "budget (FLOPs)", "N (non-emb)", "D (tokens)", f"loss [{level:.0%}]", f"perplexity [{level:.0%}]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['group']} | {r['flops']:.3g} | {r['N_opt']:.3g} | {r['D_opt']:.3g} "
                     f"| {r['loss']:.3f} [{r['loss_lo']:.3f}, {r['loss_hi']:.3f}] "
                     f"| {r['ppl']:.4g} [{_g(r['ppl_lo'], 4)}, {_g(r['ppl_hi'], 4)}] |")
    return "\n".join(lines) + "\n"


def differences_markdown(rows: list[dict], level: float) -> str:
    if not rows:
        return ""
    head = ["b − a", "budget (FLOPs)", f"loss difference [{level:.0%}]", "reading"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['b']} − {r['a']} | {r['flops']:.3g} | {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] "
                     f"| {r['reading']} |")
    return ("Predicted loss of b minus a, each at its compute-optimal (N, D); 'no difference' = the interval "
            "contains 0:\n\n" + "\n".join(lines) + "\n")


def table_csv(rows: list[dict], diffs: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "vs", "flops", "N_opt", "D_opt", "loss", "loss_lo", "loss_hi", "ppl", "ppl_lo", "ppl_hi"])
    for r in rows:
        writer.writerow([r["group"], "", r["flops"], r["N_opt"], r["D_opt"], r["loss"], r["loss_lo"], r["loss_hi"],
                         r["ppl"], r["ppl_lo"], r["ppl_hi"]])
    for r in diffs:  # a difference row: loss columns hold b - a and its interval
        writer.writerow([r["b"], r["a"], r["flops"], "", "", r["diff"], r["lo"], r["hi"], "", "", ""])
    return buf.getvalue()


# ---------------------------------------------------------------- the command

def fit_runs(req: ScalingRequest, say: Callable[[str], None] = lambda text: None
             ) -> tuple[list, list[str], list[list[dict]], list]:
    """Load the runs, group them over size and budget, and fit one law per group; `say` hears
    what is being fitted (a fit with its bootstrap takes seconds to minutes per group)."""
    from . import compare
    from .scaling import fit_law

    runs = compare.load_runs(req.runs)
    groups = group_for_scaling(runs)
    labels = [compare.label(g, compare.varying_keys(groups)) for g in groups]
    points = [[_point(r, req.metric) for r in g.runs] for g in groups]
    _check_counts(groups, labels, points)
    laws = []
    for i, (name, pts) in enumerate(zip(labels, points), 1):
        say(f"fitting group {i}/{len(groups)} {name!r}: {len(pts)} run(s), then {req.bootstrap} bootstrap refit(s)")
        laws.append(fit_law([p["N"] for p in pts], [p["D"] for p in pts], [p["loss"] for p in pts],
                            flops_per_token=[p["flops_per_token"] for p in pts], bootstrap=req.bootstrap,
                            seed=req.seed, level=req.level))
    return groups, labels, points, laws


def fit_json(req: ScalingRequest, res: dict) -> dict:
    """What fit.json holds: the settings of the fit, each group's law and points, predictions, gaps."""
    return {"metric": req.metric, "level": req.level, "bootstrap": req.bootstrap, "seed": req.seed,
            "N": "non-embedding parameters (train_non_embedding_params)", "D": "training tokens",
            "C": "train_flops_per_token x tokens",
            "groups": [{"label": name, "method": g.method, "settings": g.settings, "law": law.as_dict(), "points": pts}
                       for g, name, law, pts in zip(res["groups"], res["labels"], res["laws"], res["points"])],
            "predictions": res["rows"], "differences": res["diffs"]}


def write_outputs(out: Path, req: ScalingRequest, res: dict) -> list[Path]:
    """fit.json, table.md, table.csv and (unless req.plots is false) the plots, atomically."""
    from dlr.atomic import check_writable, write_atomic
    from .scaling_plots import plot_isoflops, plot_loss_vs_compute

    check_writable(out, "out")
    out.mkdir(parents=True, exist_ok=True)
    written = [write_atomic(out / "fit.json", json.dumps(fit_json(req, res), indent=2, default=str) + "\n"),
               write_atomic(out / "table.md", res["text"]),
               write_atomic(out / "table.csv", table_csv(res["rows"], res["diffs"]))]
    if req.plots:
        budgets = sorted({r["flops"] for r in res["rows"]})
        written.append(plot_loss_vs_compute(res["laws"], res["labels"], res["points"], budgets, out / "loss_vs_compute.png"))
        iso = plot_isoflops(res["laws"], res["labels"], res["points"], out / "isoflop.png")
        if iso is None:
            print("no IsoFLOP plot: no 3 runs of one group share a budget within 10% (a size x tokens grid rarely does)")
        else:
            written.append(iso)
    return written
