"""Loader throughput on the bundled C4 sample: tokens/s in total and per worker.

    python scripts/bench_loader.py [--workers 0 1 2] [--batch-size 64] [--batches 200] [--mode paper]

Counts both positions delivered (B*T per batch, what the GPU consumes) and real (non-pad)
tokens. The first batches (worker start-up, file open) are excluded from the timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from omegaconf import OmegaConf  # noqa: E402

from dlr.data import data_spec, load_tokenizer, train_batches  # noqa: E402


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--mode", choices=["paper", "packed"], default="paper")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    from importlib import resources

    cfg_path = resources.files("dlr.configs").joinpath("data", "c4_sample.yaml") if _has_configs_pkg() else None
    cfg = OmegaConf.load(str(cfg_path)) if cfg_path else OmegaConf.load(
        os.path.join(os.path.dirname(__file__), "..", "configs", "data", "c4_sample.yaml"))
    base = data_spec(cfg)
    tok = load_tokenizer(base.tokenizer)
    print(f"# {_cpu()}; mode={args.mode} seq_len={args.seq_len} batch={args.batch_size} batches={args.batches}")
    print("| workers | positions/s (B*T) | real tokens/s | positions/s per worker |")
    print("|---|---|---|---|")
    for w in args.workers:
        spec = dataclasses.replace(base, num_workers=w, mode=args.mode, seq_len=args.seq_len)
        it = train_batches(spec, tok, args.batch_size, 0, 1, seed=0)
        for _ in range(args.warmup):
            next(it)
        t0, pos, real = time.perf_counter(), 0, 0
        for _ in range(args.batches):
            b = next(it)
            pos += b["input_ids"].numel()
            real += int((b["labels"] != -100).sum())
        dt = time.perf_counter() - t0
        it.close()
        print(f"| {w} | {pos / dt:,.0f} | {real / dt:,.0f} | {pos / dt / max(w, 1):,.0f} |", flush=True)


def _has_configs_pkg() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("dlr.configs") is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    main()
