"""Named sensitivity studies: a grid of one setting x seeds, lowrank beside dlr, resumable.

    python -m experiments.study alpha                                  # CPU, the documented budget
    python -m experiments.study all --device cuda --jobs 10            # every study, 10 runs at once on one GPU
    python -m experiments.study alpha --model llama_tiny --steps 4 --seeds 0 --values 0.5,2 --out /tmp/s   # smoke

A study sweeps one config key (STUDIES): every value runs as `method=dlr` with everything
else at the base setting (alpha 1, variance correction on, scope all, uniform expansion,
the model's default rank), and lowrank runs once per seed as the baseline; the rank study
runs lowrank and dlr at every rank. A run is named by its whole setting, so a run shared by
two studies (dlr at alpha 1 is the base of all of them) trains once. Finished runs (with a
summary.json) are skipped and interrupted ones resume from their last checkpoint, so the
command can be repeated after a time limit cut it short.

The `scaling` study is a grid instead: zoo sizes (--sizes) x token budgets (--tokens) x
methods (--methods: full, lowrank, dlr, and spectron = lowrank trained with Spectron), one
evaluation at the end of each run, then dlr-scaling fits one law per method. It prints the
grid's total training compute and an estimate of the time left before it starts (the FLOP
rate of the finished runs under --out, else an assumed one), and runs on its own:

    python -m experiments.study scaling --device cpu --global-batch 8 --val-tokens 16384   # docs/scaling.md
    python -m experiments.study scaling --dry-run --sizes llama_60m,llama_130m --tokens 1e8,4e8   # plan only

Under --out: runs/<setting>-s<seed>/ (run dirs), logs/, studies/<study>/ (the dlr-compare
by= sweep: by_<key>.md/.csv/.png, table.md; for scaling, dlr-scaling's fit.json, table.md,
table.csv and plots), manifest.json, and a bundle (tar.gz of every small file, no weights)
rewritten each time a study completes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlr.config import DLR, EXPAND_MODES, LOWRANK, METHODS, PRECISIONS, SCOPES, FactorizationConfig
from dlr.errors import ConfigError, bad_value

# The base setting every study varies one key of (the trainer's defaults, written out).
# The settings a one-knob study holds fixed: each at its declared default.
BASE = {k: getattr(FactorizationConfig(), k) for k in ("alpha", "variance_correction", "scope", "expand")}


@dataclass(frozen=True)
class Study:
    name: str
    key: str  # the config key swept (dlr-compare by=)
    values: tuple
    both_methods: bool = False  # the key matters to lowrank too (rank): lowrank at every value
    doc: str = ""


STUDIES = {s.name: s for s in (
    Study("alpha", "alpha", (0.25, 0.5, 1.0, 2.0, 4.0), doc="residual strength"),
    Study("variance_correction", "variance_correction", (True, False), doc="alpha / sqrt(K) vs plain alpha"),
    Study("scope", "scope", SCOPES, doc="which projections carry the residual"),
    Study("expand", "expand", EXPAND_MODES, doc="which latent feeds which output"),
    Study("rank", "rank", (16, 32, 64), both_methods=True, doc="lowrank vs dlr at each rank"),
)}
ORDER = tuple(STUDIES)  # alpha first: the one to have if time is short
SCALING = "scaling"  # the size x token budget x method grid (ScalingRun), fitted by dlr-scaling
# The scaling grid's default axes: CPU-sized (docs/scaling.md); a GPU takes the larger zoo sizes.
SCALING_SIZES = ("llama_n100k", "llama_n300k", "llama_n800k")
SCALING_TOKENS = (16_384, 32_768, 65_536)
SCALING_METHODS = tuple(METHODS)
# A scaling "method" beyond the trainer's: the low-rank model trained with Spectron.
SCALING_OPTIMIZERS = {"spectron": (LOWRANK.name, "spectron")}


@dataclass(frozen=True)
class RunSpec:
    method: str
    rank: int
    settings: tuple  # ((key, value), ...) of the dlr knobs; () for lowrank
    seed: int

    @property
    def name(self) -> str:
        rank = f"-r{self.rank}"
        if self.method != DLR.name:
            return f"{self.method}{rank}-s{self.seed}"
        s = dict(self.settings)
        vc = "vc1" if s["variance_correction"] else "vc0"
        return f"dlr{rank}-a{s['alpha']:g}-{vc}-{s['scope']}-{s['expand']}-s{self.seed}"

    def overrides(self) -> list[str]:
        out = [f"method={self.method}", f"seed={self.seed}", f"rank={self.rank}"]
        for k, v in self.settings:
            out.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
        return out


@dataclass(frozen=True)
class ScalingRun:
    """One point of the scaling grid: a zoo size at its default rank, trained for `tokens` tokens."""

    size: str
    method: str  # full, lowrank, dlr or spectron (lowrank with optimizer=spectron)
    tokens: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.size}-{self.method}-t{self.tokens}-s{self.seed}"

    def overrides(self) -> list[str]:
        method, optimizer = SCALING_OPTIMIZERS.get(self.method, (self.method, None))
        out = [f"model={self.size}", f"method={method}", f"seed={self.seed}", f"tokens={self.tokens}"]
        return out + ([f"optimizer={optimizer}"] if optimizer else [])

    def steps(self, global_batch: int, seq_len: int = 256) -> int:
        return -(-self.tokens // (global_batch * seq_len))  # the trainer's ceil(tokens / tokens per step)


def _csv(flag: str, text: str, kind: type, accepted: str) -> list:
    try:
        out = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise bad_value(flag, text, accepted) from None
    if not out:
        raise bad_value(flag, text, accepted)
    return out


def _count(text: str) -> int:
    """An integer written plainly or as 1e8 (a token budget)."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def plan_scaling(sizes: str, tokens: str, methods: str, seeds: list[int]) -> list[ScalingRun]:
    """The grid, seed-major then size, budget and method: a cut-short study has whole seeds."""
    from dlr.model.sizes import size_names

    names = size_names()
    sizes_l = _csv("--sizes", sizes, str, ", ".join(names))
    for s in sizes_l:
        if s not in names:
            raise bad_value("--sizes", s, names)
    tokens_l = _csv("--tokens", tokens, _count, "comma-separated token budgets, e.g. 16384,65536 or 1e8,4e8")
    if any(t < 1 for t in tokens_l):
        raise bad_value("--tokens", tokens, "positive integers")
    accepted = (*SCALING_METHODS, *SCALING_OPTIMIZERS)
    methods_l = _csv("--methods", methods, str, ", ".join(accepted))
    for m in methods_l:
        if m not in accepted:
            raise bad_value("--methods", m, accepted)
    return [ScalingRun(size, m, t, seed) for seed in seeds for size in sizes_l for t in tokens_l for m in methods_l]


def _parse_value(study: Study, text: str) -> Any:
    kind = type(study.values[0])
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return kind(text)
    except ValueError:
        raise bad_value(f"--values for {study.name}", text, ", ".join(map(str, study.values))) from None


def plan(studies: list[str], seeds: list[int], values: str | None = None, model: str = "llama_demo") -> dict[str, list[RunSpec]]:
    """{study: its runs}, in ORDER; `values` (comma-separated) replaces the grid of a single study.

    The rank is always explicit (the model's default outside the rank study), so the rank
    study's runs at the default rank are the other studies' runs, trained once.
    """
    from dlr.model.sizes import get_size

    base_rank = get_size(model).default_rank
    for name in studies:
        if name not in STUDIES:
            raise bad_value("study", name, ", ".join(("all", *STUDIES)))
    if values is not None and len(studies) != 1:
        raise ConfigError("--values replaces the grid of one study; name exactly one study")
    out: dict[str, list[RunSpec]] = {}
    for name in (n for n in ORDER if n in studies):
        st = STUDIES[name]
        grid = st.values if values is None else tuple(_parse_value(st, v) for v in values.split(",") if v)
        runs = []
        for seed in seeds:  # seed-major: a study cut short still has whole seeds
            if st.both_methods:
                for v in grid:
                    runs.append(RunSpec(LOWRANK.name, int(v), (), seed))
                    runs.append(RunSpec(DLR.name, int(v), tuple(BASE.items()), seed))
            else:
                runs.append(RunSpec(LOWRANK.name, base_rank, (), seed))
                for v in grid:
                    runs.append(RunSpec(DLR.name, base_rank, tuple({**BASE, st.key: v}.items()), seed))
        out[name] = runs
    return out


# ---------------------------------------------------------------- running


def train_command(args: argparse.Namespace, run: RunSpec | ScalingRun) -> list[str]:
    micro = args.micro_batch or args.global_batch
    if isinstance(run, ScalingRun):
        # One evaluation and one checkpoint at the end: the fit reads final losses only, and a
        # run this short restarts cheaply.
        every = run.steps(args.global_batch)
        schedule = run.overrides()
    else:
        every = args.eval_every
        schedule = [f"model={args.model}", *run.overrides(), f"steps={args.steps}"]
    lr = [f"lr={args.lr}"] if args.lr is not None else []  # else the size's recipe lr
    cmd = [sys.executable, "-m", "dlr.cli.train", f"data={args.data}", *schedule,
           f"global_batch={args.global_batch}", f"micro_batch={micro}", *lr, f"eval_every={every}",
           # A checkpoint at every eval: an interrupted run resumes instead of restarting.
           f"save_every={every}", "keep_last=1", "log_every=1", f"precision={args.precision}",
           f"data.num_workers={args.num_workers}", f"out_dir={args.out / 'runs' / run.name}",
           # Many small runs share one GPU: compiling each would cost more than it saves.
           "compile=false"]
    if args.val_tokens is not None:
        cmd.append(f"data.val_tokens={args.val_tokens}")
    return cmd + list(args.train_arg)


def _env(args: argparse.Namespace) -> dict:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks CUDA whenever it sees one
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // max(1, args.jobs)))
    return env


def train_one(args: argparse.Namespace, run: RunSpec) -> str:
    out = args.out / "runs" / run.name
    if (out / "summary.json").exists():
        return f"{run.name}: finished before, skipped"
    log = args.out / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command(args, run)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(args))
        f.write(f"# exit {proc.returncode} after {time.perf_counter() - t0:.1f}s\n")
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-12:])
        raise RuntimeError(f"{run.name} failed (exit {proc.returncode}); see {log}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    return f"{run.name}: val_ppl {summary['val_ppl']:.2f} in {time.perf_counter() - t0:.0f}s"


def render_study(args: argparse.Namespace, name: str, runs: list[RunSpec]) -> Path:
    """dlr-compare by=KEY over this study's runs, into studies/<name>/."""
    from dlr.analysis import compare

    out = args.out / "studies" / name
    loaded = compare.load_runs([str(args.out / "runs" / r.name) for r in runs])
    groups = compare.group_runs(loaded)
    compare.write_outputs(groups, "val_ppl", out, plots=False)
    compare.write_sweep(groups, STUDIES[name].key, "val_ppl", out)
    return out


def render_scaling(args: argparse.Namespace, runs: list[ScalingRun]) -> Path:
    """dlr-scaling over the grid's runs, into studies/scaling/ (fit.json, table, plots): the
    command itself, as the runs are dlr-train's."""
    out = args.out / "studies" / SCALING
    budgets = ",".join(f"{c:.3g}" for c in args.at) if args.at else None
    argv = [str(args.out / "runs" / r.name) for r in runs] + [f"out={out}"] + ([f"at={budgets}"] if budgets else [])
    proc = subprocess.run([sys.executable, "-m", "dlr.cli.scaling", *argv])
    if proc.returncode:
        raise ConfigError(f"dlr-scaling over the grid's runs exited {proc.returncode} (its error is above); "
                          f"rerun it alone: dlr-scaling {' '.join(argv)}")
    return out


def _study_key(name: str) -> str:
    return STUDIES[name].key if name in STUDIES else "model.name, tokens, method"


def manifest(args: argparse.Namespace, planned: dict[str, list], wall: float) -> dict:
    import torch

    from importlib.metadata import version

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None
    return {"args": {k: str(v) for k, v in vars(args).items()}, "dlr": version("dlr"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "gpu": gpu, "wall_s": round(wall, 1),
            "studies": {n: {"key": _study_key(n), "runs": [r.name for r in rs]} for n, rs in planned.items()},
            "finished": sorted(p.parent.name for p in (args.out / "runs").glob("*/summary.json")),
            "train_command_example": " ".join(train_command(args, next(iter(planned.values()))[0]))}


# ---------------------------------------------------------------- the compute estimate

# FLOP/s assumed before any run of the study has finished: about what 2 CPU cores reach on the
# smallest sizes (docs/scaling.md), and a modest fraction of a recent GPU's bf16 peak. A guess
# either way; the rate the finished runs under --out reached replaces it.
ASSUMED_FLOPS_PER_S = {"cpu": 1e10, "cuda": 1e14}
RUN_OVERHEAD_S = 20.0  # process start, data set-up, final/ and folded/ writes


def run_flops(run: ScalingRun) -> tuple[int, int]:
    """(training FLOPs, FLOPs per token) of a grid point, counted on the meta device."""
    from dlr.model.counting import model_stats
    from dlr.model.llama import build_model

    method = SCALING_OPTIMIZERS.get(run.method, (run.method,))[0]
    per_token = model_stats(build_model(run.size, method, device="meta")).train_flops_per_token
    return per_token * run.tokens, per_token


def measured_rate(out: Path) -> tuple[float | None, int]:
    """Median training FLOP/s of the finished runs under `out`/runs, and how many there are."""
    rates = []
    for p in (out / "runs").glob("*/summary.json"):
        try:
            s = json.loads(p.read_text())
            rates.append(s["train_flops_per_token"] * s["tokens"] / s["wall_s"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
    rates.sort()
    return (rates[len(rates) // 2] if rates else None), len(rates)


def estimate(args: argparse.Namespace, runs: list[ScalingRun]) -> str:
    """One line: the grid's total training compute and the time the unfinished part should take."""
    todo = [r for r in runs if not (args.out / "runs" / r.name / "summary.json").exists()]
    total = sum(run_flops(r)[0] for r in runs)
    left = sum(run_flops(r)[0] for r in todo)
    rate, n = measured_rate(args.out)
    device = "cpu" if args.device == "cpu" else ("cuda" if _cuda(args) else "cpu")
    source = f"measured on {n} finished run(s)" if rate else f"assumed for {device}; no run has finished yet"
    rate = rate or ASSUMED_FLOPS_PER_S[device]
    # Runs on one GPU overlap; on a CPU they share the same cores.
    parallel = args.jobs if device == "cuda" else 1
    seconds = (left / rate + RUN_OVERHEAD_S * len(todo)) / parallel
    return (f"scaling: {len(runs)} runs, {total:.3g} training FLOPs in all; {len(todo)} to train ({left:.3g} FLOPs), "
            f"about {_duration(seconds)} at {rate:.3g} FLOP/s ({source})")


def _duration(seconds: float) -> str:
    if seconds < 120 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:.1f} days"


def _cuda(args: argparse.Namespace) -> bool:
    if args.device != "auto":
        return args.device == "cuda"
    import torch

    return torch.cuda.is_available()


def bundle(out: Path, path: Path, root: str = "study", token_shards: bool = True) -> Path:
    """A .tar.gz at `path` of every small file under `out` (sweeps, tables, plots, eval JSONs,
    summaries, metrics, configs, logs), under the folder `root` in the archive; no weights.

    Of a run (runs/<run>/) only summary.json, metrics.jsonl and config.yaml go in:
    final/, folded/ and checkpoints/ are weights. `token_shards=False` leaves out `tokens/`
    (dlr-prepare's shards and tokenizer: data, not results) except its manifest.json.
    Written to a temporary file and renamed: a reader never sees half an archive.
    """
    keep = {"summary.json", "metrics.jsonl", "config.yaml"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(out.rglob("*")):
            if not p.is_file() or p.resolve() == path.resolve() or p.name.endswith(".tmp"):
                continue
            rel = p.relative_to(out)
            if rel.parts[0] == "runs" and (len(rel.parts) != 3 or p.name not in keep):
                continue  # final/, folded/, checkpoints/: weights
            if not token_shards and rel.parts[0] == "tokens" and p.name != "manifest.json":
                continue
            tar.add(p, arcname=str(Path(root) / rel))
    tmp.replace(path)
    return path


def _budgets(text: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of FLOP budgets, e.g. 1e15,1e17")
    if not out or any(not c > 0 for c in out):
        raise argparse.ArgumentTypeError(f"{text!r}: budgets must be positive FLOP counts, e.g. 1e15,1e17")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+", help=f"all, {SCALING}, or any of: {', '.join(STUDIES)} (run in that order)")
    ap.add_argument("--out", type=Path, default=Path("runs/studies"), help="default: runs/studies (git-ignored)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings at the same time (one GPU holds many llama_demo runs)")
    ap.add_argument("--seeds", default=None, help=f"default: 0,1,2 (the {SCALING} study: 0)")
    ap.add_argument("--values", default=None, help="comma-separated grid replacing the study's own (one study only)")
    ap.add_argument("--model", default="llama_demo")
    ap.add_argument("--steps", type=int, default=300)
    scaling = ap.add_argument_group(f"the {SCALING} study (sizes x token budgets x methods)")
    scaling.add_argument("--sizes", default=",".join(SCALING_SIZES), help="zoo sizes (default %(default)s)")
    scaling.add_argument("--tokens", default=",".join(map(str, SCALING_TOKENS)), help="token budgets (default %(default)s)")
    scaling.add_argument("--methods", default=",".join(SCALING_METHODS),
                         help=f"any of {', '.join((*SCALING_METHODS, *SCALING_OPTIMIZERS))} (default %(default)s)")
    scaling.add_argument("--at", type=_budgets, default=None, help="dlr-scaling --at: FLOP budgets to predict at")
    ap.add_argument("--global-batch", type=int, default=32, help="sequences of 256 tokens per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the global batch (no accumulation)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=None, help="default: the size's recipe lr (llama_demo: 3e-3)")
    ap.add_argument("--data", default="c4_sample", help="dlr-train data= (default %(default)s, the bundled sample)")
    ap.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="one more dlr-train override for every run, e.g. data.path=/data/c4_t5; repeatable")
    ap.add_argument("--val-tokens", type=int, default=None, help="default: the whole ~88k-token validation split")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--bundle", type=Path, default=None, help="default: OUT/study_bundle.tar.gz")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and their count, run nothing")
    return ap.parse_args(argv)


def _planned(args: argparse.Namespace) -> dict[str, list]:
    """{study: its runs} from the command line; the scaling grid runs on its own."""
    names = list(ORDER) if args.studies == ["all"] else args.studies
    default_seeds = "0" if names == [SCALING] else "0,1,2"
    seeds_text = args.seeds if args.seeds is not None else default_seeds
    try:
        seeds = [int(s) for s in seeds_text.split(",") if s]
    except ValueError:
        raise bad_value("--seeds", seeds_text, "comma-separated integers, e.g. 0,1,2") from None
    if args.jobs < 1:
        raise bad_value("--jobs", args.jobs, "an integer >= 1")
    if SCALING in names:
        if len(names) != 1:
            raise ConfigError(f"the {SCALING} study runs alone; name it without {', '.join(n for n in names if n != SCALING)}")
        return {SCALING: plan_scaling(args.sizes, args.tokens, args.methods, seeds)}
    return plan(names, seeds, args.values, args.model)


def _print_plan(planned: dict[str, list], unique: list) -> None:
    for name, runs in planned.items():
        print(f"{name} (--by {_study_key(name)}): {len(runs)} runs")
    print(f"{len(unique)} distinct runs (shared ones train once)")
    for r in unique:
        print("  " + r.name)


def _train_all(args: argparse.Namespace, unique: list, on_done) -> tuple[set[str], list[str]]:
    """Train every run (args.jobs at once, in order), calling on_done(done) after each finishes."""
    done: set[str] = set()
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {pool.submit(train_one, args, r): r for r in unique}  # submitted in order: alpha's runs first
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                run = pending.pop(fut)
                try:
                    print(fut.result(), flush=True)
                    done.add(run.name)
                except RuntimeError as err:
                    failed.append(run.name)
                    print(f"FAILED {err}", file=sys.stderr, flush=True)
            on_done(done)
    return done, failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    planned = _planned(args)
    unique = list(dict.fromkeys(r for runs in planned.values() for r in runs))
    args.out = args.out.resolve()
    if SCALING in planned:
        print(estimate(args, planned[SCALING]), flush=True)
    if args.dry_run:
        _print_plan(planned, unique)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    bundle_path = (args.bundle or args.out / "study_bundle.tar.gz").resolve()
    t0 = time.perf_counter()
    rendered: set[str] = set()

    def finish_ready(done: set[str]) -> None:
        for name, runs in planned.items():
            if name not in rendered and all(r.name in done for r in runs):
                rendered.add(name)
                if name == SCALING:
                    path = render_scaling(args, runs)
                else:
                    path = render_study(args, name, runs)
                    print((path / f"by_{STUDIES[name].key}.md").read_text(), flush=True)
                (args.out / "manifest.json").write_text(json.dumps(manifest(args, planned, time.perf_counter() - t0), indent=2))
                print(f"study {name}: {path}; bundle {bundle(args.out, bundle_path)}", flush=True)

    done, failed = _train_all(args, unique, finish_ready)
    (args.out / "manifest.json").write_text(json.dumps(manifest(args, planned, time.perf_counter() - t0), indent=2))
    bundle(args.out, bundle_path)
    print(f"wrote {bundle_path} ({bundle_path.stat().st_size / 1024:.0f} KiB); {len(done)}/{len(unique)} runs finished "
          f"in {time.perf_counter() - t0:.0f}s", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def cli(argv: list[str] | None = None) -> None:
    try:
        code = main(argv)
    except ConfigError as err:
        print(f"study.py: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    cli()
