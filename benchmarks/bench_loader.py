"""Loader throughput, streaming vs token shards, side by side in one run (bundled C4 sample).

    python -m benchmarks.bench_loader [--modes paper packed] [--workers 0 2] [--batch-size 64] [--batches 200]
    python -m benchmarks.bench_loader --tokens-dir DIR       # shards already written by dlr-prepare
    python -m benchmarks.bench_loader --formats json.gz jsonl.zst parquet --modes paper --workers 0
                                                             # the streaming loader per file format

1. dlr-prepare of the sample (unless --tokens-dir): tokens/s of the one-time tokenization.
2. Throughput: positions/s (B*T per batch, what the GPU consumes) and real (non-pad) tokens/s of
   the streaming loader (`data=c4_sample`, for each --workers) and of the shard loader
   (`data=tokens`, built in the caller: prefetch=0, i.e. its cost without the thread), all in one
   process, one after the other, so the ratio is fair on a shared machine. The first batches
   (worker start-up, file open, page cache) are excluded.
3. Critical path: a simulated training step (`--step-ms`) after each next(); reports how long
   next() blocked per step. 'device' steps wait on the accelerator for 90% of the step (GIL
   released, as in a CUDA sync): there the prefetch thread builds the next batch unseen. 'host'
   steps keep the interpreter busy throughout (CPU training): a thread then still costs its GIL time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from dlr.config import MODES  # noqa: E402
from dlr.data import data_spec, load_tokenizer, train_batches  # noqa: E402


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def _sample_spec():
    from importlib import resources

    return data_spec(OmegaConf.load(str(resources.files("dlr.configs").joinpath("data", "c4_sample.yaml"))))


def throughput(it, warmup: int, batches: int) -> tuple[float, float, float]:
    """(positions/s, real tokens/s, positions per CPU second of this process) after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    t0, c0, pos, real = time.perf_counter(), time.process_time(), 0, 0
    for _ in range(batches):
        b = next(it)
        pos += b["input_ids"].numel()
        real += int((b["labels"] != -100).sum())
    dt, ct = time.perf_counter() - t0, time.process_time() - c0
    return pos / dt, real / dt, pos / ct


def _busy(seconds: float, a: torch.Tensor) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def _step(kind: str, seconds: float, a: torch.Tensor) -> None:
    """A simulated training step. 'device': the host launches for 10% of the step, then waits on the
    device (GIL released, as in a CUDA sync). 'host': the interpreter is busy all the time (CPU training)."""
    if kind == "host":
        _busy(seconds, a)
    else:
        _busy(seconds * 0.1, a)
        time.sleep(seconds * 0.9)


def stalls(it, kind: str, step_s: float, steps: int, warmup: int = 5) -> tuple[float, float]:
    """Median and max time next() blocked per step while a simulated step runs between calls."""
    a = torch.randn(192, 192)
    for _ in range(warmup):
        next(it)
        _step(kind, step_s, a)
    waits = []
    for _ in range(steps):
        t0 = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - t0)
        _step(kind, step_s, a)
    return statistics.median(waits), max(waits)


def _format_spec(base, fmt: str, root: str):
    """The sample's train split rewritten as `fmt` (same documents, same order) under root."""
    import gzip
    import json
    from importlib import resources

    if fmt == "json.gz":
        return base
    src = str(resources.files("dlr.assets").joinpath("c4_sample", "c4-train.00000-of-00001.json.gz"))
    with gzip.open(src, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    path = os.path.join(root, f"c4-train.{fmt}")
    if fmt == "jsonl.zst":
        import zstandard

        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records).encode()))
        return dataclasses.replace(base, train_files=(path,))
    import pyarrow as pa
    import pyarrow.parquet as pq

    # FineWeb's layout: the text beside other columns, row groups of about 1000 documents.
    pq.write_table(pa.table({k: [r[k] for r in records] for k in ("text", "timestamp", "url")}), path,
                   row_group_size=1000)
    return dataclasses.replace(base, source="parquet", train_files=(path,))


def formats(base, tok, args) -> None:
    """The streaming loader's throughput for each file format of the same documents, side by side."""
    print("\n| format | mode | setting | positions/s (B*T) | real tokens/s | positions per CPU-s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="dlr-bench-formats-") as root:
        specs = {fmt: _format_spec(base, fmt, root) for fmt in args.formats}
        for mode in args.modes:
            for w in args.workers:
                for fmt, spec in specs.items():
                    spec = dataclasses.replace(spec, num_workers=w, mode=mode, seq_len=args.seq_len)
                    it = train_batches(spec, tok, args.batch_size, 0, 1, seed=0)
                    pos, real, cpu = throughput(it, args.warmup, args.batches)
                    it.close()
                    cpu_s = f"{cpu:,.0f}" if w == 0 else "n/a (workers)"
                    print(f"| {fmt} | {mode} | num_workers={w} | {pos:,.0f} | {real:,.0f} | {cpu_s} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="streaming loader's DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=200, help="timed batches of the streaming loader")
    ap.add_argument("--token-batches", type=int, default=2000, help="timed batches of the shard loader")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=20.0, help="simulated training step for the stall check")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tokens-dir", default=None, help="default: prepare the bundled sample into a temporary directory")
    ap.add_argument("--formats", nargs="+", choices=["json.gz", "jsonl.zst", "parquet"], default=None,
                    help="only the streaming loader, once per file format of the sample's train split")
    args = ap.parse_args()
    torch.set_num_threads(1)

    base = _sample_spec()
    tok = load_tokenizer(base.tokenizer)
    print(f"# {_cpu()}; torch {torch.__version__}; seq_len={args.seq_len} batch={args.batch_size}; one process")
    if args.formats:
        return formats(base, tok, args)
    tmp = None
    tokens_dir = args.tokens_dir
    if tokens_dir is None:
        from dlr.data.prepare import prepare

        tmp = tempfile.TemporaryDirectory(prefix="dlr-bench-tokens-")
        tokens_dir = os.path.join(tmp.name, "c4_sample")
        t0 = time.perf_counter()
        m = prepare(base, tokens_dir, progress=False)
        dt = time.perf_counter() - t0
        n = sum(s["tokens"] for s in m["splits"].values())
        print(f"\ndlr-prepare data=c4_sample (num_proc=1): {n:,} tokens in {dt:.2f} s = {n / dt:,.0f} tokens/s "
              f"(includes reading, the tokenizer's own threads, writing)")

    print("\n| mode | loader | setting | positions/s (B*T) | real tokens/s | positions per CPU-s | vs streaming (best) |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for mode in args.modes:
        best = 0.0
        for w in args.workers:
            spec = dataclasses.replace(base, num_workers=w, mode=mode, seq_len=args.seq_len)
            it = train_batches(spec, tok, args.batch_size, 0, 1, seed=0)
            pos, real, cpu = throughput(it, args.warmup, args.batches)
            it.close()
            best = max(best, pos)
            # With workers the CPU time is spent in other processes: only wall-clock rates count.
            cpu_s = f"{cpu:,.0f}" if w == 0 else "n/a (workers)"
            print(f"| {mode} | stream | num_workers={w} | {pos:,.0f} | {real:,.0f} | {cpu_s} | reference |", flush=True)
        tspec = data_spec({"source": "tokens", "path": tokens_dir, "mode": mode, "seq_len": args.seq_len,
                           "prefetch": 0, "val_tokens": None})
        it = train_batches(tspec, tok, args.batch_size, 0, 1, seed=0)
        pos, real, cpu = throughput(it, args.warmup, args.token_batches)
        it.close()
        results[mode] = (pos, best)
        print(f"| {mode} | tokens | prefetch=0 | {pos:,.0f} | {real:,.0f} | {cpu:,.0f} | {pos / best:.1f}x |", flush=True)

    print(f"\nStall check: after each next(), a {args.step_ms:.0f} ms simulated step; time next() blocked, over "
          f"{args.steps} steps. Step 'device': 10% host launches (torch matmuls), 90% waiting on the device "
          f"(GIL released); 'host': torch matmuls the whole step (CPU training, the worst case for a thread).\n")
    print("| mode | step | loader | setting | median wait per step | max wait | median wait / step |")
    print("|---|---|---|---|---|---|---|")
    step_s = args.step_ms / 1000
    for mode in args.modes:
        for kind in ("device", "host"):
            cases = [("stream", f"num_workers={max(args.workers)}",
                      lambda: train_batches(dataclasses.replace(base, num_workers=max(args.workers), mode=mode,
                                                                seq_len=args.seq_len), tok, args.batch_size, 0, 1, seed=0))]
            for pf in (0, 4):
                cases.append(("tokens", f"prefetch={pf}", lambda pf=pf: train_batches(
                    data_spec({"source": "tokens", "path": tokens_dir, "mode": mode, "seq_len": args.seq_len,
                               "prefetch": pf, "val_tokens": None}), tok, args.batch_size, 0, 1, seed=0)))
            for loader, setting, make in cases:
                it = make()
                med, worst = stalls(it, kind, step_s, args.steps)
                it.close()
                print(f"| {mode} | {kind} | {loader} | {setting} | {med * 1e3:.2f} ms | {worst * 1e3:.2f} ms | "
                      f"{med / step_s:.1%} |", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
