"""Measured peak GPU memory next to dlr's estimate, for DDP and FSDP2 (docs/training.md, "Memory").

    python -m benchmarks.measure_memory --model llama_1b --micro-batch 16 --steps 3
    python -m benchmarks.measure_memory --model llama_7b --nproc 8 --micro-batch 8 --parallelism fsdp2

Runs `dlr-train` (through torchrun when --nproc > 1) for a few steps on the bundled C4 sample
(no network) with each parallelism asked for, then prints, per run, the estimate that
`dry_run` prints for this geometry (`memory_estimate_per_process_gib` in summary.json) beside
the measured `peak_mem_gib` (torch.cuda.max_memory_allocated of process 0; host RSS on CPU).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dlr.config import PARALLELISMS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--parallelism", nargs="+", default=list(PARALLELISMS), choices=PARALLELISMS)
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("extra", nargs="*", help="more dlr-train overrides, e.g. gradient_checkpointing=true")
    args = ap.parse_args()

    root = Path(args.out or tempfile.mkdtemp(prefix="dlr-mem-"))
    launcher = [sys.executable, "-m", "dlr.cli.train"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                    "-m", "dlr.cli.train"]
    rows = []
    for parallelism in args.parallelism:
        out = root / f"{args.model}-{parallelism}-{args.nproc}p"
        overrides = [f"model={args.model}", "data=c4_sample", f"steps={args.steps}", f"micro_batch={args.micro_batch}",
                     f"global_batch={args.micro_batch * args.nproc}", f"parallelism={parallelism}", "resume=never",
                     "data.val_tokens=20000", "eval_every=1000000", "save_every=1000000", "keep_last=1",
                     f"out_dir={out}", *args.extra]
        subprocess.run([*launcher, *overrides], check=True)
        summary = json.loads((out / "summary.json").read_text())
        rows.append((parallelism, summary["memory_estimate_per_process_gib"], summary["peak_mem_gib"]))
    print(f"\n{args.model}, {args.nproc} process(es), micro_batch={args.micro_batch}, {' '.join(args.extra)}")
    print(f"{'parallelism':<12}{'estimate GiB':>14}{'peak GiB':>10}{'peak/est':>10}   estimate parts")
    for parallelism, parts, peak in rows:
        est = parts["total_gib"]
        print(f"{parallelism:<12}{est:>14.2f}{peak:>10.2f}{peak / est:>10.2f}   {json.dumps(parts)}")


if __name__ == "__main__":
    main()
