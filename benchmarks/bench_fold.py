"""Benchmark dlr-fold (and load / eval throughput) on a zoo size, on this machine.

    python -m benchmarks.bench_fold --size llama_1b [--workdir /tmp/dlr_bench] [--keep]

Builds a random `method=dlr` model of that size, saves it with save_model_dir, then runs
`dlr-fold` in a fresh process under /usr/bin/time -v (wall time, peak RSS of the fold
alone, not of this script) and one short `dlr-eval`; prints a markdown block for
benchmarks/README.md. The few-GB checkpoints are deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of cmd in its own process."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return wall, rss, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="llama_1b")
    ap.add_argument("--workdir", default="/tmp/dlr_bench")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import dlr
    from dlr.artifacts.model_dir import save_model_dir
    from dlr.data import load_tokenizer

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    try:
        t = time.perf_counter()
        model = dlr.build_model(args.size, method="dlr")
        stats = dlr.model_stats(model)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        final = save_model_dir(model, load_tokenizer("t5"), work / "final")
        t_save = time.perf_counter() - t
        del model
        size_gb = sum(p.stat().st_size for p in final.iterdir()) / 1e9
        fold_wall, fold_rss, fold_out = timed([str(bin_dir / "dlr-fold"), f"ckpt={final}"])
        report = json.loads((work / "folded" / "fold_report.json").read_text())
        eval_wall, eval_rss, eval_out = timed([str(bin_dir / "dlr-eval"), f"ckpt={work / 'folded'}", "data=c4_sample",
                                               f"eval_tokens={args.eval_tokens}", "batch_size=8", "progress=false",
                                               "--json"])
        ev = json.loads(eval_out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    c = report["check"]
    print(f"""
Hardware: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32.
Model: {args.size} method=dlr rank={report['dlr']['dlr_rank']}, {stats.total_params:,} params, checkpoint {size_gb:.2f} GB
(build {t_build:.1f} s, save {t_save:.1f} s).

| step | wall time | peak RSS |
|---|---|---|
| dlr-fold (load, {c['batches']}x{c['batch_size']}x{c['seq_len']} logits check twice, fold, save) | {fold_wall:.1f} s | {fold_rss:,.0f} MiB |
| dlr-eval, {ev['tokens']} tokens of c4_sample, batch 8 | {eval_wall:.1f} s ({ev['tokens'] / ev['seconds']:.0f} tok/s in eval) | {eval_rss:,.0f} MiB |

fold check: max abs diff {c['max_abs_diff']:.3e}, max rel diff {c['max_rel_diff']:.3e};
params {report['params']['after']:,} == lowrank reference {report['params']['reference']:,}: {report['params']['equal']}.
""")


if __name__ == "__main__":
    main()
