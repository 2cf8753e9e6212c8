"""Reproduce docs/results.md: full vs lowrank vs dlr on the bundled C4 sample, 3 seeds each.

    python -m experiments.run_results                                  # CPU, the documented budget (slow: hours)
    python -m experiments.run_results --device cuda --jobs 3           # one GPU, 3 trainings at a time
    python -m experiments.run_results --steps 3 --eval-every 3 --seeds 0 --out /tmp/smoke   # smoke test

First `dlr-prepare data=c4_sample out=OUT/tokens`: the sample is tokenized once, not once per
run (and per process). Then for each method and seed: `dlr-train model=llama_demo data=tokens
data.path=OUT/tokens` with the same steps, global batch, schedule and data order (the data order
follows `seed`, identically for every method, so seed s of lowrank and seed s of dlr see the same
batches in the same order and the per-seed paired difference is fair). Then `dlr-eval` on each
deployable model (`folded/` for dlr, `final/` otherwise; dlr's unfolded `final/` too, as a check
of the fold) on the held-out validation split (from the shards: the same rows as streaming it),
then `dlr-compare` over the runs. `--data stream` trains and evaluates on the streamed
`data=c4_sample` instead, as the published table was made (same validation set, other order).

Everything goes under --out (default results/): tokens/ (the shards), runs/<method>-s<seed>/ (run dirs, with
weights), logs/, eval/<run>-<final|folded>.json, compare/ (table.md, table.csv, pairs.csv,
plots), eval_table.md, manifest.json, and results_bundle.tar.gz holding every small file
(no weights, no checkpoints) for copying back from a GPU machine. Finished runs (with a
summary.json) are skipped and interrupted ones resume from their last checkpoint, so the
command can be repeated after a time limit cut it short.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dlr.config import METHODS, PRECISIONS

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--model", default="llama_demo")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--global-batch", type=int, default=32, help="sequences of 256 tokens per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the global batch (no accumulation)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3, help="lowrank and dlr (CoLA's low-rank lr)")
    ap.add_argument("--lr-full", type=float, default=1e-3, help="full-rank models (GaLore's dense lr)")
    ap.add_argument("--rank", type=int, default=None, help="default: the model's default_rank")
    ap.add_argument("--val-tokens", type=int, default=None, help="default: the whole ~88k-token validation split")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto = bf16 on GPU, fp32 on CPU (the trainer's rule)")
    ap.add_argument("--data", default="tokens", choices=("tokens", "stream"),
                    help="tokens: prepare once, train every run from the shards; stream: tokenize in every run")
    ap.add_argument("--num-workers", type=int, default=2, help="--data stream only: DataLoader workers per run")
    ap.add_argument("--jobs", type=int, default=1, help="trainings run at the same time (GPU: 3 fits easily)")
    ap.add_argument("--bundle", type=Path, default=None, help="default: OUT/results_bundle.tar.gz")
    ap.add_argument("--skip-eval", action="store_true")
    return ap.parse_args(argv)


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def env_for(args: argparse.Namespace) -> dict:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks CUDA whenever it sees one
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // (args.jobs * 2)))
    return env


def tokens_dir(args: argparse.Namespace) -> Path:
    return args.out / "tokens"


def data_args(args: argparse.Namespace) -> list[str]:
    """The data overrides every training and evaluation of the sweep shares."""
    if args.data == "tokens":
        return ["data=tokens", f"data.path={tokens_dir(args)}"]
    return ["data=c4_sample"]


def prepare_command(args: argparse.Namespace) -> list[str]:
    # val_tokens=null: the whole validation split, so any --val-tokens is within what was prepared.
    return [sys.executable, "-m", "dlr.cli.prepare", "data=c4_sample", "data.val_tokens=null",
            f"out={tokens_dir(args)}", "progress=false"]


def train_command(args: argparse.Namespace, method: str, seed: int) -> list[str]:
    out = args.out / "runs" / run_name(method, seed)
    micro = args.micro_batch or args.global_batch
    cmd = [sys.executable, "-m", "dlr.cli.train", f"model={args.model}", *data_args(args), f"method={method}",
           f"seed={seed}", f"steps={args.steps}", f"global_batch={args.global_batch}", f"micro_batch={micro}",
           f"lr={args.lr_full if method == 'full' else args.lr}", f"eval_every={args.eval_every}",
           # Checkpoints at every eval: an interrupted run resumes instead of restarting.
           f"save_every={args.eval_every}", "keep_last=1", "log_every=1", f"precision={args.precision}",
           f"out_dir={out}"]
    if args.data == "stream":
        cmd.append(f"data.num_workers={args.num_workers}")
    if args.rank is not None:
        cmd.append(f"rank={args.rank}")
    if args.val_tokens is not None:
        cmd.append(f"data.val_tokens={args.val_tokens}")
    return cmd


def run_logged(cmd: list[str], log: Path, env: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        f.write(f"# exit {proc.returncode} after {time.perf_counter() - t0:.1f}s\n")
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{cmd[2]} failed (exit {proc.returncode}); see {log}:\n{tail}")


def train_one(args: argparse.Namespace, method: str, seed: int) -> str:
    name = run_name(method, seed)
    out = args.out / "runs" / name
    if (out / "summary.json").exists():
        return f"{name}: already finished, skipped"
    t0 = time.perf_counter()
    run_logged(train_command(args, method, seed), args.out / "logs" / f"{name}.train.log", env_for(args))
    summary = json.loads((out / "summary.json").read_text())
    return f"{name}: val_ppl {summary['val_ppl']:.2f} in {time.perf_counter() - t0:.0f}s"


def eval_one(args: argparse.Namespace, method: str, seed: int) -> list[Path]:
    name = run_name(method, seed)
    run_dir = args.out / "runs" / name
    device = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}[args.device]
    written = []
    for kind in (("final", "folded") if method == "dlr" else ("final",)):
        out = args.out / "eval" / f"{name}-{kind}.json"
        if not out.exists():
            cmd = [sys.executable, "-m", "dlr.cli.evaluate", f"ckpt={run_dir / kind}", *data_args(args),
                   f"device={device}", "dtype=fp32", "progress=false", f"out={out}"]
            if args.val_tokens is not None:
                cmd.append(f"eval_tokens={args.val_tokens}")
            run_logged(cmd, args.out / "logs" / f"{name}.eval.log", env_for(args))
        written.append(out)
    return written


def eval_table(args: argparse.Namespace) -> str:
    """Held-out perplexity of each deployable model (dlr-eval, fp32): groups, mean ± std, paired."""
    from dlr.analysis import compare

    runs = compare.load_runs([str(args.out / "runs")])
    for run in runs:
        name = run.path.name
        deploy = args.out / "eval" / f"{name}-{'folded' if run.method == 'dlr' else 'final'}.json"
        if deploy.exists():
            run.summary["eval_ppl"] = json.loads(deploy.read_text())["val_ppl"]
        unfolded = args.out / "eval" / f"{name}-final.json"
        if run.method == "dlr" and unfolded.exists():
            run.summary["eval_unfolded_ppl"] = json.loads(unfolded.read_text())["val_ppl"]
    groups = compare.group_runs(runs)
    text = ["Held-out perplexity of each deployable model through `dlr-eval` (fp32; dlr: the folded model).\n\n",
            compare.markdown_table(groups, "eval_ppl")]
    paired = compare.paired_markdown(compare.paired_differences(groups, "eval_ppl"), groups, "eval_ppl")
    if paired:
        text += ["\nPaired by seed, eval_ppl of b minus a:\n\n", paired]
    fold = [(r.path.name, r.summary["eval_ppl"], r.summary["eval_unfolded_ppl"]) for r in runs
            if "eval_unfolded_ppl" in r.summary and "eval_ppl" in r.summary]
    if fold:
        worst = max(abs(f - u) / u for _, f, u in fold)
        text.append(f"\nFolded vs unfolded dlr (dlr-eval): largest relative perplexity difference {worst:.1e} "
                    f"over {len(fold)} run(s).\n")
    return "".join(text)


def manifest(args: argparse.Namespace, wall: float) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None
    return {"args": {k: str(v) for k, v in vars(args).items()}, "git_commit": commit, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "gpu": gpu, "wall_s": round(wall, 1),
            "prepare_command": " ".join(prepare_command(args)) if args.data == "tokens" else None,
            "train_commands": [" ".join(train_command(args, m, s)) for m in args.methods.split(",")
                               for s in map(int, args.seeds.split(","))]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods):
        sys.exit(f"--methods: accepted {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.data == "tokens":  # once for all runs; a finished prepare is not redone on a repeat
        run_logged(prepare_command(args), args.out / "logs" / "prepare.log", env_for(args))
        print(f"dlr-prepare: {tokens_dir(args)}", flush=True)
    jobs = [(m, s) for s in seeds for m in methods]  # seed-major: a cut-short run still has whole seeds
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for line in pool.map(lambda ms: train_one(args, *ms), jobs):
            print(line, flush=True)
    if not args.skip_eval:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for files in pool.map(lambda ms: eval_one(args, *ms), jobs):
                print("dlr-eval:", ", ".join(f"{p.stem} ppl {json.loads(p.read_text())['val_ppl']:.2f}" for p in files),
                      flush=True)
    compare_cmd = [sys.executable, "-m", "dlr.cli.compare", str(args.out / "runs"), f"out={args.out / 'compare'}"]
    proc = subprocess.run(compare_cmd, capture_output=True, text=True)
    (args.out / "compare").mkdir(exist_ok=True)
    (args.out / "compare" / "stdout.txt").write_text(proc.stdout + proc.stderr)
    print(proc.stdout, proc.stderr, sep="")
    if proc.returncode != 0:
        sys.exit(f"dlr-compare failed (exit {proc.returncode})")
    if not args.skip_eval:
        table = eval_table(args)
        (args.out / "eval_table.md").write_text(table)
        print(table)
    (args.out / "manifest.json").write_text(json.dumps(manifest(args, time.perf_counter() - t0), indent=2))
    from experiments.study import bundle

    # Every small file under the out folder's own name; the token shards are data, not results.
    path = bundle(args.out, args.bundle or args.out / "results_bundle.tar.gz", root=args.out.name, token_shards=False)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
