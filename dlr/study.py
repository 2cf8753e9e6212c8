"""Named sensitivity studies: a grid of one setting x seeds, lowrank beside dlr, resumable.

    python scripts/study.py alpha                                  # CPU, the documented budget
    python scripts/study.py all --device cuda --jobs 10            # every study, 10 runs at once on one GPU
    python scripts/study.py alpha --model llama_tiny --steps 4 --seeds 0 --values 0.5,2 --out /tmp/s   # smoke

A study sweeps one config key (STUDIES): every value runs as `method=dlr` with everything
else at the base setting (alpha 1, variance correction on, scope all, uniform expansion,
the model's default rank), and lowrank runs once per seed as the baseline; the rank study
runs lowrank and dlr at every rank. A run is named by its whole setting, so a run shared by
two studies (dlr at alpha 1 is the base of all of them) trains once. Finished runs (with a
summary.json) are skipped and interrupted ones resume from their last checkpoint, so the
command can be repeated after a time limit cut it short.

Under --out: runs/<setting>-s<seed>/ (run dirs), logs/, studies/<study>/ (the dlr-compare
--by sweep: by_<key>.md/.csv/.png, table.md), manifest.json, and a bundle (tar.gz of
every small file, no weights) rewritten each time a study completes.
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

from .errors import ConfigError, bad_value

REPO = Path(__file__).resolve().parent.parent
# The base setting every study varies one key of (the trainer's defaults, written out).
BASE = {"alpha": 1.0, "variance_correction": True, "scope": "all", "expand": "uniform"}


@dataclass(frozen=True)
class Study:
    name: str
    key: str  # the config key swept (dlr-compare --by)
    values: tuple
    both_methods: bool = False  # the key matters to lowrank too (rank): lowrank at every value
    doc: str = ""


STUDIES = {s.name: s for s in (
    Study("alpha", "alpha", (0.25, 0.5, 1.0, 2.0, 4.0), doc="residual strength"),
    Study("variance_correction", "variance_correction", (True, False), doc="alpha / sqrt(K) vs plain alpha"),
    Study("scope", "scope", ("all", "attn", "mlp"), doc="which projections carry the residual"),
    Study("expand", "expand", ("uniform", "random_reuse", "permuted"), doc="which latent feeds which output"),
    Study("rank", "rank", (16, 32, 64), both_methods=True, doc="lowrank vs dlr at each rank"),
)}
ORDER = tuple(STUDIES)  # alpha first: the one to have if time is short


@dataclass(frozen=True)
class RunSpec:
    method: str
    rank: int
    settings: tuple  # ((key, value), ...) of the dlr knobs; () for lowrank
    seed: int

    @property
    def name(self) -> str:
        rank = f"-r{self.rank}"
        if self.method != "dlr":
            return f"{self.method}{rank}-s{self.seed}"
        s = dict(self.settings)
        vc = "vc1" if s["variance_correction"] else "vc0"
        return f"dlr{rank}-a{s['alpha']:g}-{vc}-{s['scope']}-{s['expand']}-s{self.seed}"

    def overrides(self) -> list[str]:
        out = [f"method={self.method}", f"seed={self.seed}", f"rank={self.rank}"]
        for k, v in self.settings:
            out.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
        return out


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
    from .zoo import get_size

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
                    runs.append(RunSpec("lowrank", int(v), (), seed))
                    runs.append(RunSpec("dlr", int(v), tuple(BASE.items()), seed))
            else:
                runs.append(RunSpec("lowrank", base_rank, (), seed))
                for v in grid:
                    runs.append(RunSpec("dlr", base_rank, tuple({**BASE, st.key: v}.items()), seed))
        out[name] = runs
    return out


# ---------------------------------------------------------------- running


def train_command(args: argparse.Namespace, run: RunSpec) -> list[str]:
    micro = args.micro_batch or args.global_batch
    cmd = [sys.executable, "-m", "dlr.cli.train", f"model={args.model}", "data=c4_sample", *run.overrides(),
           f"steps={args.steps}", f"global_batch={args.global_batch}", f"micro_batch={micro}", f"lr={args.lr}",
           f"eval_every={args.eval_every}",
           # A checkpoint at every eval: an interrupted run resumes instead of restarting.
           f"save_every={args.eval_every}", "keep_last=1", "log_every=1", f"precision={args.precision}",
           f"data.num_workers={args.num_workers}", f"out_dir={args.out / 'runs' / run.name}",
           # Many small runs share one GPU: compiling each would cost more than it saves.
           "compile=false"]
    if args.val_tokens is not None:
        cmd.append(f"data.val_tokens={args.val_tokens}")
    return cmd


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
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(args), cwd=REPO)
        f.write(f"# exit {proc.returncode} after {time.perf_counter() - t0:.1f}s\n")
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-12:])
        raise RuntimeError(f"{run.name} failed (exit {proc.returncode}); see {log}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    return f"{run.name}: val_ppl {summary['val_ppl']:.2f} in {time.perf_counter() - t0:.0f}s"


def render_study(args: argparse.Namespace, name: str, runs: list[RunSpec]) -> Path:
    """dlr-compare --by KEY over this study's runs, into studies/<name>/."""
    from . import compare

    out = args.out / "studies" / name
    loaded = compare.load_runs([str(args.out / "runs" / r.name) for r in runs])
    groups = compare.group_runs(loaded)
    compare.write_outputs(groups, "val_ppl", out, plots=False)
    compare.write_sweep(groups, STUDIES[name].key, "val_ppl", out)
    return out


def manifest(args: argparse.Namespace, planned: dict[str, list[RunSpec]], wall: float) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None
    return {"args": {k: str(v) for k, v in vars(args).items()}, "git_commit": commit or None, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "gpu": gpu, "wall_s": round(wall, 1),
            "studies": {n: {"key": STUDIES[n].key, "runs": [r.name for r in rs]} for n, rs in planned.items()},
            "finished": sorted(p.parent.name for p in (args.out / "runs").glob("*/summary.json")),
            "train_command_example": " ".join(train_command(args, next(iter(planned.values()))[0]))}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+", help=f"all, or any of: {', '.join(STUDIES)} (run in that order)")
    ap.add_argument("--out", type=Path, default=Path("runs/studies"), help="default: runs/studies (git-ignored)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings at the same time (one GPU holds many llama_demo runs)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--values", default=None, help="comma-separated grid replacing the study's own (one study only)")
    ap.add_argument("--model", default="llama_demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--global-batch", type=int, default=32, help="sequences of 256 tokens per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the global batch (no accumulation)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-tokens", type=int, default=None, help="default: the whole ~88k-token validation split")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--bundle", type=Path, default=None, help="default: OUT/study_bundle.tar.gz")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and their count, run nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(ORDER) if args.studies == ["all"] else args.studies
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise bad_value("--seeds", args.seeds, "comma-separated integers, e.g. 0,1,2") from None
    if args.jobs < 1:
        raise bad_value("--jobs", args.jobs, "an integer >= 1")
    planned = plan(names, seeds, args.values, args.model)
    unique = list(dict.fromkeys(r for runs in planned.values() for r in runs))
    args.out = args.out.resolve()
    if args.dry_run:
        for name, runs in planned.items():
            print(f"{name} (--by {STUDIES[name].key}): {len(runs)} runs")
        print(f"{len(unique)} distinct runs (shared ones train once)")
        for r in unique:
            print("  " + r.name)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    bundle_path = (args.bundle or args.out / "study_bundle.tar.gz").resolve()
    t0 = time.perf_counter()
    done: set[str] = set()
    rendered: set[str] = set()
    failed: list[str] = []

    def finish_ready() -> None:
        for name, runs in planned.items():
            if name not in rendered and all(r.name in done for r in runs):
                path = render_study(args, name, runs)
                rendered.add(name)
                print((path / f"by_{STUDIES[name].key}.md").read_text(), flush=True)
                (args.out / "manifest.json").write_text(json.dumps(manifest(args, planned, time.perf_counter() - t0), indent=2))
                print(f"study {name}: {path}; bundle {bundle(args.out, bundle_path)}", flush=True)

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
            finish_ready()
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
