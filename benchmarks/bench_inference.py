"""Inference cost of a dense model against the folded DLR model (and plain low-rank), side by side.

    python -m benchmarks.bench_inference --threads 1 --repeats 3 --vllm-python .venv-vllm/bin/python

Random weights (speed does not depend on them). Per size and method: parameters, weight
memory, prefill tokens/s (`generate` of one token: batch x prompt tokens) and decode tokens/s
(the further tokens of greedy `generate` with the KV cache) at each batch size, through HF
`generate` and, with --vllm-python (a venv holding vLLM), through vLLM's Transformers backend
serving the saved model directory (benchmarks/vllm_speed.py). Both see the same prompts on the
same pinned cores; each figure is the median of --repeats runs after a warm-up, with the spread
(min-max); the HF runs of a size's methods take turns, so the machine's slow spells hit them alike.
Folded DLR and lowrank have the same graph and parameters, so they cost the same.
Prints Markdown tables and writes --out JSON with the machine named.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

METHODS = ("full", "lowrank", "folded")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VLLM_SCRIPT = Path(__file__).with_name("vllm_speed.py")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[list[int]]:
    """Run on the first `threads` allowed cores only, one torch thread each; vLLM's subprocess
    inherits the mask and is bound to the same cores, so both engines get the same CPU.
    The caller's mask and thread count come back afterwards."""
    mask, before = os.sched_getaffinity(0), torch.get_num_threads()
    cores = sorted(mask)[:threads]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    try:
        yield cores
    finally:
        os.sched_setaffinity(0, mask)
        torch.set_num_threads(before)


def build(size: Any, method: str, device: str, dtype: str) -> torch.nn.Module:
    """`size`: a zoo name or a LlamaSize. Built and folded in fp32, then cast: the fold is exact in fp32."""
    import dlr

    torch.manual_seed(0)
    model = dlr.build_model(size, "dlr" if method == "folded" else method)
    if method == "folded":
        dlr.fold_model(model)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def weights(model: torch.nn.Module) -> tuple[int, int]:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(p.numel() for p in model.parameters()), sum(t.numel() * t.element_size() for t in tensors)


def prompt_ids(batch: int, prompt: int) -> list[list[int]]:
    """Fixed token ids, the same for HF and vLLM (a row per sequence, no padding)."""
    return [[(7919 * i + 104729 * j) % 30000 + 5 for j in range(prompt)] for i in range(batch)]


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {"n": 0}


def rates(pairs: list[list[float]], *, batch: int, prompt: int, new: int) -> dict:
    """(first, full) seconds per run, a warm-up pair first: `first` generates one token (the prefill),
    `full` `new` tokens. Prefill tok/s = batch x prompt / first; decode = batch x (new - 1) / (full - first)."""
    timed = pairs[1:]
    return {"prefill_tok_s": spread([batch * prompt / first for first, _ in timed]),
            # A noisy machine can invert a pair; such a repeat says nothing about decoding.
            "decode_tok_s": spread([batch * (new - 1) / (full - first) for first, full in timed if full > first])}


@torch.inference_mode()
def hf_pair(model: torch.nn.Module, ids: torch.Tensor, new: int) -> list[float]:
    """Seconds of `generate` of one token (the prefill) and of `new` tokens, greedy, with the KV cache."""

    def timed(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return [timed(1), timed(new)]


def hf_rows(name: str, models: dict[str, torch.nn.Module], args: argparse.Namespace) -> list[dict]:
    """Every method of one size in memory, timed round-robin (the first round warms up), so a slow
    spell of a shared machine hits every method alike instead of one method's whole series."""
    ids = {b: torch.tensor(prompt_ids(b, args.prompt), device=args.device) for b in args.batch_sizes}
    pairs: dict[tuple[str, int], list[list[float]]] = {(m, b): [] for m in models for b in args.batch_sizes}
    for _ in range(args.repeats + 1):
        for (method, batch), runs in pairs.items():
            runs.append(hf_pair(models[method], ids[batch], args.new))
    rows = []
    for (method, batch), runs in pairs.items():
        params, nbytes = weights(models[method])
        rows.append({"size": name, "method": method, "batch": batch, "params": params, "weight_bytes": nbytes,
                     **rates(runs, batch=batch, prompt=args.prompt, new=args.new)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def vllm_run(python: str, model_dir: Path, args: argparse.Namespace, cores: list[int]) -> dict:
    """Time a saved model directory in vLLM at every batch size, in one engine (its own process)."""
    spec = {"prompts": {b: prompt_ids(b, args.prompt) for b in args.batch_sizes}, "new": args.new,
            "repeats": args.repeats, "dtype": str(DTYPES[args.dtype]).removeprefix("torch."), "device": args.device}
    env = {**os.environ, "PYTHONPATH": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process: apply_model
           "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)) or "auto"}
    proc = subprocess.run([python, str(VLLM_SCRIPT), str(model_dir), json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=3600)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["rates"] = {int(b): rates(p, batch=int(b), prompt=args.prompt, new=args.new) for b, p in out.pop("seconds").items()}
    return out


def release_freed_memory() -> None:
    """Hand the freed models' heap back to the OS before vLLM (or the next size) loads its own. glibc
    keeps freed blocks below its mmap threshold (up to 32 MiB: a low-rank factor is one) in the
    process: without this, at llama_1b it still held 13 GiB when vLLM needed 10 of a 24 GiB machine."""
    import ctypes
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def vllm_rows(name: str, models: dict[str, torch.nn.Module], rows: list[dict], args: argparse.Namespace,
              cores: list[int]) -> dict:
    """Save each model (and free it: vLLM loads its own copy), then serve each directory with vLLM;
    the rates join the HF rows of the same (method, batch). Returns what vLLM ran, per method."""
    from dlr.data import load_tokenizer
    from dlr.artifacts.model_dir import save_model_dir

    served = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in list(models):
            save_model_dir(models.pop(method).to("cpu", torch.float32), load_tokenizer("t5"), Path(tmp) / method)
        release_freed_memory()
        for method in args.methods.split(","):
            vllm = vllm_run(args.vllm_python, Path(tmp) / method, args, cores)
            served[f"{name}/{method}"] = {k: v for k, v in vllm.items() if k != "rates"}
            print(json.dumps(served[f"{name}/{method}"]), file=sys.stderr, flush=True)
            for row in rows:
                if row["method"] == method:
                    row["vllm"] = vllm.get("rates", {}).get(row["batch"], {"error": vllm.get("error", "no result")})
    return served


def run(args: argparse.Namespace, sizes: list[Any] | None = None) -> dict:
    """Every (size, method, batch) row; `sizes` overrides --sizes with LlamaSize objects (tests)."""
    rows, served = [], {}
    with pinned_threads(args.threads) if args.device == "cpu" else contextlib.nullcontext([]) as cores:
        for size in sizes or args.sizes.split(","):
            name = size if isinstance(size, str) else size.name
            models = {m: build(size, m, args.device, args.dtype) for m in args.methods.split(",")}
            size_rows = hf_rows(name, models, args)
            if args.vllm_python:
                served.update(vllm_rows(name, models, size_rows, args, cores))
            rows += size_rows
            del models
            release_freed_memory()
    return {"device": device_name(args.device), "cores": cores, "threads": len(cores) or None,
            "torch": torch.__version__, "dtype": args.dtype, "prompt": args.prompt, "new_tokens": args.new,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "vllm_served": served, "rows": rows}


def figure(x: float) -> str:
    """Whole numbers from 100 up, three significant digits below (1034, 18.7, 2.81)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def cell(s: dict) -> str:
    if "error" in s:
        return s["error"][:60]
    return f"{figure(s['median'])} ({figure(s['min'])}-{figure(s['max'])})" if s.get("n") else "-"


def table(result: dict) -> str:
    vllm = any("vllm" in r for r in result["rows"])
    head = ["size", "method", "batch", "params", "weights MiB", "prefill tok/s", "decode tok/s"]
    head += ["vLLM prefill tok/s", "vLLM decode tok/s"] if vllm else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["size"], r["method"], str(r["batch"]), f"{r['params'] / 1e6:.1f}M", f"{r['weight_bytes'] / 2**20:.0f}",
                 cell(r["prefill_tok_s"]), cell(r["decode_tok_s"])]
        if vllm:
            v = r.get("vllm", {"error": "not run"})
            cells += [cell(v), cell(v)] if "error" in v else [cell(v["prefill_tok_s"]), cell(v["decode_tok_s"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def ratio_table(result: dict, of: str = "folded", to: str = "full") -> str:
    """Median tok/s of `of` over `to` for each size and batch (> 1: `of` is faster), and their weight bytes."""
    by = {(r["size"], r["method"], r["batch"]): r for r in result["rows"]}
    engines = [("prefill_tok_s", "HF prefill"), ("decode_tok_s", "HF decode")]
    if any("vllm" in r for r in result["rows"]):
        engines += [("vllm.prefill_tok_s", "vLLM prefill"), ("vllm.decode_tok_s", "vLLM decode")]

    def median(row: dict, key: str) -> float | None:
        for part in key.split("."):
            row = row.get(part, {})
        return row.get("median")

    out = [f"| size | batch | weights {of}/{to} | " + " | ".join(f"{label} {of}/{to}" for _, label in engines) + " |",
           "|" + "---|" * (3 + len(engines))]
    for (size, method, batch), a in by.items():
        b = by.get((size, to, batch))
        if method != of or b is None:
            continue
        cells = [f"{a['weight_bytes'] / b['weight_bytes']:.2f}"]
        for key, _ in engines:
            x, y = median(a, key), median(b, key)
            cells.append(f"{x / y:.2f}" if x and y else "-")
        out.append(f"| {size} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(out) if len(out) > 2 else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="llama_60m,llama_130m,llama_350m,llama_1b")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: fp32 on the CPU, bf16 on a GPU")
    ap.add_argument("--batches", default=None, help="comma-separated; default: 1,8 on the CPU, 1,8,32 on a GPU")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=16, help="generated tokens per sequence (>= 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads, each pinned to a core")
    ap.add_argument("--vllm-python", default=None, help="a Python with vLLM installed: also measure vLLM")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {', '.join(bad)}; accepted: {', '.join(METHODS)}")
    try:
        args.batch_sizes = [int(b) for b in (args.batches or ("1,8,32" if args.device == "cuda" else "1,8")).split(",")]
    except ValueError:
        ap.error(f"--batches: {args.batches!r} is not a comma-separated list of integers")
    for name, value, low in (("--batches", min(args.batch_sizes), 1), ("--prompt", args.prompt, 1),
                             ("--new", args.new, 2), ("--repeats", args.repeats, 1), ("--threads", args.threads, 1)):
        if value < low:
            ap.error(f"{name}: {value} is below {low}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible; accepted here: cpu")
    if args.vllm_python and not Path(args.vllm_python).is_file():
        ap.error(f"--vllm-python: {args.vllm_python!r} is not a file")
    return args


def main() -> None:
    args = parse_args()
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    where = f"{len(result['cores'])} pinned core(s) {result['cores']}" if result["cores"] else "GPU"
    print(f"{result['device']}, {where}, torch {result['torch']}, {result['dtype']}, prompt {result['prompt']}, "
          f"{result['new_tokens']} new tokens, median (min-max) of {result['repeats']}")
    print(table(result))
    for ratios in (ratio_table(result), ratio_table(result, "folded", "lowrank")):
        if ratios:
            print(f"\n{ratios}")


if __name__ == "__main__":
    main()
