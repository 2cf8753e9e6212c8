"""Inference cost of a dense model against the folded DLR model (and plain low-rank), side by
side, unquantized and quantized.

    python -m benchmarks.bench_inference --dtype bf16 --quant none,w8a8,w4a16 --vllm-python .venv-vllm/bin/python
    python -m benchmarks.bench_inference --tables RESULT.json [MORE.json]   # the tables of saved results

Random weights (speed does not depend on them). Per size, method and quantization: parameters,
the weight bytes the engine holds, prefill tokens/s (`generate` of one token: batch x prompt
tokens) and decode tokens/s (the further tokens of greedy `generate` with the KV cache) at each
batch size, through HF `generate` and, with --vllm-python (a venv holding vLLM), through vLLM's
Transformers backend serving the saved model directory (benchmarks/vllm_speed.py). A quantized
row serves the directory `dlr-quantize scheme=...` writes (compressed-tensors: vLLM's CPU int8
and WNA16 kernels); HF runs it through transformers' compressed-tensors layers with --hf-quant.
Both engines see the same prompts on the same pinned cores; each figure is the median of
--repeats runs after a warm-up, with the spread (min-max); the HF runs of a size's models take
turns, and so do the vLLM engines of dense and folded, so a slow spell hits them alike.
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

from dlr.config.choices import QUANT_SCHEMES

METHODS = ("full", "lowrank", "folded")
QUANTS = ("none", *QUANT_SCHEMES)  # unquantized, and what dlr-quantize writes
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
    """(parameters, bytes of every tensor): a quantized layer's scales count in its bytes, not as parameters."""
    tensors = [*model.parameters(), *model.buffers()]
    params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("_scale", "_zero_point")))
    return params, sum(t.numel() * t.element_size() for t in tensors)


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
    """Every model of one size in memory (key: method, or method/quant), timed round-robin (the first
    round warms up), so a slow spell of a shared machine hits every model alike."""
    ids = {b: torch.tensor(prompt_ids(b, args.prompt), device=args.device) for b in args.batch_sizes}
    pairs: dict[tuple[str, int], list[list[float]]] = {(k, b): [] for k in models for b in args.batch_sizes}
    for _ in range(args.repeats + 1):
        for (key, batch), runs in pairs.items():
            runs.append(hf_pair(models[key], ids[batch], args.new))
    rows = []
    for (key, batch), runs in pairs.items():
        method, _, quant = key.partition("/")
        params, nbytes = weights(models[key])
        rows.append({"size": name, "method": method, "quant": quant or "none", "batch": batch, "params": params,
                     "weight_bytes": nbytes, **rates(runs, batch=batch, prompt=args.prompt, new=args.new)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def vllm_run(python: str, model_dir: Path, args: argparse.Namespace, cores: list[int]) -> dict:
    """Time a saved model directory in vLLM at every batch size, in one engine (its own process)."""
    spec = {"prompts": {b: prompt_ids(b, args.prompt) for b in args.batch_sizes}, "new": args.new,
            "repeats": args.repeats, "dtype": str(DTYPES[args.dtype]).removeprefix("torch."), "device": args.device,
            "eager": args.vllm_eager}
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


def served_bytes(model_dir: Path, dtype: str) -> tuple[int, int]:
    """(parameters, bytes the engine holds) of a saved directory served in `dtype`: integer tensors
    (quantized weights, packed 4-bit) as stored, floating ones (embeddings, norms, the LM head,
    scales) in `dtype`, as vLLM loads them."""
    import math

    from safetensors import safe_open

    itemsize = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    float_size = torch.finfo(DTYPES[dtype]).bits // 8
    params = nbytes = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                n, kind = math.prod(sl.get_shape()), sl.get_dtype()
                nbytes += n * itemsize.get(kind, float_size)
                if key.endswith(("_scale", "_zero_point", "weight_shape")):  # quantization metadata
                    continue
                # A packed int32 holds 8 4-bit weights (compressed-tensors' pack-quantized).
                params += n * 8 if key.endswith("weight_packed") else n
    return params, nbytes


def amx_int8_misfits(model_dir: Path) -> list[str]:
    """Layers of a dlr directory that vLLM 0.32's CPU int8 path sends to its AMX kernel but that the
    kernel then refuses: an output size that is a multiple of 16 but not of 32 (its N block), with an
    input size that is a multiple of 32 (e.g. llama_350m's gate and up B factors, 2736 outputs).
    They are kept unquantized (`dlr-quantize ignore=`); other shapes run int8 (AMX or oneDNN)."""
    from dlr.artifacts.model_dir import read_config
    from dlr.model.llama import build_from_config

    model = build_from_config(read_config(model_dir), device="meta")
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"
            and m.out_features % 16 == 0 and m.out_features % 32 and m.in_features % 32 == 0]


def quantized_dir(src: Path, scheme: str) -> Path:
    """`dlr-quantize scheme=...` of a saved directory, as a user runs it. The weights are random, so
    its perplexity and greedy-agreement bounds (there for trained models) are lifted."""
    from dlr.artifacts.quantize import quantize_and_verify

    out = src.with_name(f"{src.name}-{scheme}")
    dlr_dir = json.loads((src / "config.json").read_text()).get("model_type") == "dlr_llama"
    ignore = amx_int8_misfits(src) if scheme == "w8a8" and dlr_dir else []
    report = quantize_and_verify(src, out, scheme=scheme, eval_tokens=256, batch_size=1, max_ppl_ratio=1e9,
                                 min_agreement=0.0, verify=False, ignore=ignore)
    if not report.passed or report.linears == 0:
        raise RuntimeError(f"dlr-quantize {scheme} of {src.name}: {report.to_dict()}")
    return out


def save_for_serving(model: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    """Dense: a plain LLaMA directory (the dense export), which vLLM serves with its own LLaMA, fused
    q/k/v and gate/up included: the baseline a deployer has. Low-rank: the dlr model directory,
    served through vLLM's Transformers backend."""
    from dlr.artifacts.export import export_dense, save_dense_dir
    from dlr.artifacts.model_dir import save_model_dir

    model = model.to("cpu", torch.float32)
    if model.config.dlr_method == "full":
        return save_dense_dir(export_dense(model), tokenizer, out)
    return save_model_dir(model, tokenizer, out)


def saved_dirs(name: str, models: dict[str, torch.nn.Module], tmp: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Save each unquantized model (and free it), then quantize each with every --quant scheme;
    key: method, or method/scheme."""
    from dlr.data import load_tokenizer

    dirs = {}
    for method in [k for k in models if "/" not in k]:
        dirs[method] = save_for_serving(models.pop(method), load_tokenizer("t5"), tmp / method)
    models.clear()
    release_freed_memory()
    for scheme in (q for q in args.quants if q != "none"):
        for method in list(dirs):
            if "/" not in method:
                dirs[f"{method}/{scheme}"] = quantized_dir(dirs[method], scheme)
                release_freed_memory()
    return dirs


def hf_quantized(dirs: dict[str, Path], args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The quantized directories loaded the way dlr-eval loads them (transformers' compressed-tensors layers)."""
    from dlr.artifacts.model_dir import load_model_dir

    return {k: load_model_dir(d, device=args.device, dtype=DTYPES[args.dtype], verify=False, dense=True)[0].eval()
            for k, d in dirs.items() if "/" in k}


def vllm_rows(name: str, dirs: dict[str, Path], rows: list[dict], args: argparse.Namespace, cores: list[int]) -> dict:
    """Serve every directory with vLLM, dense and folded in turns within each quantization; the rates
    join the rows of the same (method, quant, batch), made here where HF did not run that model.
    Returns what vLLM ran, per model."""
    served = {}
    for key, path in dirs.items():
        method, quant = key.partition("/")[0], quant_of(key)
        vllm = vllm_run(args.vllm_python, path, args, cores)
        served[f"{name}/{key}"] = {k: v for k, v in vllm.items() if k != "rates"}
        print(json.dumps(served[f"{name}/{key}"]), file=sys.stderr, flush=True)
        params, nbytes = served_bytes(path, args.dtype)
        for batch in args.batch_sizes:
            row = next((r for r in rows if (r["method"], r["quant"], r["batch"]) == (method, quant, batch)), None)
            if row is None:
                row = {"size": name, "method": method, "quant": quant, "batch": batch, "params": params,
                       "weight_bytes": nbytes}
                rows.append(row)
            row["vllm"] = vllm.get("rates", {}).get(batch, {"error": vllm.get("error", "no result")})
    return served


def quant_of(key: str) -> str:
    return key.partition("/")[2] or "none"


def run(args: argparse.Namespace, sizes: list[Any] | None = None) -> dict:
    """Every (size, method, quant, batch) row; `sizes` overrides --sizes with LlamaSize objects (tests)."""
    rows, served = [], {}
    with pinned_threads(args.threads) if args.device == "cpu" else contextlib.nullcontext([]) as cores:
        for size in sizes or args.sizes.split(","):
            name = size if isinstance(size, str) else size.name
            models = {m: build(size, m, args.device, args.dtype) for m in args.methods.split(",")}
            size_rows = hf_rows(name, models, args) if "none" in args.quants else []
            with tempfile.TemporaryDirectory() as tmp:
                dirs = saved_dirs(name, models, Path(tmp), args) if args.vllm_python or args.hf_quant else {}
                if args.hf_quant:
                    size_rows += hf_rows(name, hf_quantized(dirs, args), args)
                    release_freed_memory()
                if args.vllm_python:
                    served.update(vllm_rows(name, {k: d for k, d in dirs.items() if quant_of(k) in args.quants},
                                            size_rows, args, cores))
            rows += size_rows
            del models
            release_freed_memory()
    return {"device": device_name(args.device), "cores": cores, "threads": len(cores) or None,
            "torch": torch.__version__, "dtype": args.dtype, "prompt": args.prompt, "new_tokens": args.new,
            "repeats": args.repeats, "vllm_eager": args.vllm_eager, "date": time.strftime("%Y-%m-%d"),
            "vllm_served": served, "rows": rows}


def figure(x: float) -> str:
    """Whole numbers from 100 up, three significant digits below (1034, 18.7, 2.81)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def cell(s: dict) -> str:
    if "error" in s:
        return "fails (the JSON has why)"
    return f"{figure(s['median'])} ({figure(s['min'])}-{figure(s['max'])})" if s.get("n") else "-"


def table(result: dict) -> str:
    vllm = any("vllm" in r for r in result["rows"])
    head = ["size", "method", "quant", "batch", "params", "weights MiB", "prefill tok/s", "decode tok/s"]
    head += ["vLLM prefill tok/s", "vLLM decode tok/s"] if vllm else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result["rows"], key=_order(result)):
        cells = [r["size"], r["method"], r["quant"], str(r["batch"]), f"{r['params'] / 1e6:.1f}M",
                 f"{r['weight_bytes'] / 2**20:.0f}", cell(r.get("prefill_tok_s", {})), cell(r.get("decode_tok_s", {}))]
        if vllm:
            v = r.get("vllm", {"error": "not run"})
            cells += [cell(v), cell(v)] if "error" in v else [cell(v["prefill_tok_s"]), cell(v["decode_tok_s"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _order(result: dict):
    sizes = list(dict.fromkeys(r["size"] for r in result["rows"]))
    return lambda r: (sizes.index(r["size"]), QUANTS.index(r["quant"]), METHODS.index(r["method"]), r["batch"])


def _median(row: dict | None, key: str) -> float | None:
    for part in key.split("."):
        row = (row or {}).get(part, {})
    return (row or {}).get("median")


def ratio_table(result: dict, of: str = "folded", to: str = "full") -> str:
    """Per size, quantization and batch: how many times fewer weight bytes `of` holds than `to`, and
    its median tok/s over `to`'s (> 1: `of` is faster). `share`: the vLLM decode speed-up as a share
    of the bytes ratio (1: decoding got all of the byte saving)."""
    by = {(r["size"], r["method"], r["quant"], r["batch"]): r for r in result["rows"]}
    engines = [("prefill_tok_s", "HF prefill"), ("decode_tok_s", "HF decode")]
    vllm = any("vllm" in r for r in result["rows"])
    engines += [("vllm.prefill_tok_s", "vLLM prefill"), ("vllm.decode_tok_s", "vLLM decode")] if vllm else []
    out = [f"| size | quant | batch | weights {to}/{of} | " + " | ".join(f"{label} {of}/{to}" for _, label in engines)
           + (" | vLLM decode share of bytes |" if vllm else " |"), "|" + "---|" * (4 + len(engines) + vllm)]
    for (size, method, quant, batch), a in sorted(by.items(), key=lambda kv: _order(result)(kv[1])):
        b = by.get((size, to, quant, batch))
        if method != of or b is None:
            continue
        bytes_ratio = b["weight_bytes"] / a["weight_bytes"]
        cells = [f"{bytes_ratio:.2f}"]
        for key, _ in engines:
            x, y = _median(a, key), _median(b, key)
            cells.append(f"{x / y:.2f}" if x and y else "-")
        if vllm:
            x, y = _median(a, "vllm.decode_tok_s"), _median(b, "vllm.decode_tok_s")
            cells.append(f"{x / y / bytes_ratio:.2f}" if x and y else "-")
        out.append(f"| {size} | {quant} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(out) if len(out) > 2 else ""


def gain_table(result: dict, batch: int = 8) -> str:
    """What quantizing buys, dense against folded, through vLLM at one batch size: each model's weight
    bytes and decode tok/s relative to the unquantized dense model of its size."""
    by = {(r["size"], r["method"], r["quant"]): r for r in result["rows"] if r["batch"] == batch and "vllm" in r}
    out = ["| size | model | weights MiB | dense's bytes / its bytes | vLLM decode tok/s | decode over dense |",
           "|---|---|---|---|---|---|"]
    for (size, method, quant), r in sorted(by.items(), key=lambda kv: _order(result)({**kv[1], "batch": batch})):
        base = by.get((size, "full", "none"))
        speed, ref = _median(r, "vllm.decode_tok_s"), _median(base, "vllm.decode_tok_s")
        if base is None or method not in ("full", "folded"):
            continue
        rel = f"{speed / ref:.2f}x" if speed and ref else "-"
        model = ("dense" if method == "full" else "folded") + ("" if quant == "none" else f" {quant}")
        out.append(f"| {size} | {model} | {r['weight_bytes'] / 2**20:.0f} | {base['weight_bytes'] / r['weight_bytes']:.2f} | "
                   f"{figure(speed) if speed else 'not served'} | {rel} |")
    return "\n".join(out) if len(out) > 2 else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="llama_60m,llama_130m,llama_350m,llama_1b")
    ap.add_argument("--methods", default="full,folded", help=f"any of {', '.join(METHODS)} (lowrank: folded's graph)")
    ap.add_argument("--quant", default="none", help=f"comma-separated, any of {', '.join(QUANTS)}; quantized rows "
                    "need --vllm-python or --hf-quant")
    ap.add_argument("--hf-quant", action="store_true", help="also time the quantized directories through HF")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: fp32 on the CPU, bf16 on a GPU")
    ap.add_argument("--batches", default=None, help="comma-separated; default: 1,8 on the CPU, 1,8,32 on a GPU")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=16, help="generated tokens per sequence (>= 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads, each pinned to a core")
    ap.add_argument("--vllm-python", default=None, help="a Python with vLLM installed: also measure vLLM")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM runs the model as written (enforce_eager), "
                    "not compiled (its default)")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    for flag, given, accepted in (("--methods", args.methods, METHODS), ("--quant", args.quant, QUANTS)):
        bad = [m for m in given.split(",") if m not in accepted]
        if bad:
            ap.error(f"{flag}: unknown {', '.join(bad)}; accepted: {', '.join(accepted)}")
    args.quants = args.quant.split(",")
    if any(q != "none" for q in args.quants) and not (args.vllm_python or args.hf_quant):
        ap.error(f"--quant {args.quant}: quantized rows are timed through vLLM or HF; add --vllm-python or --hf-quant")
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


def merged(paths: list[str]) -> dict:
    """Results of several runs on one machine (e.g. the small sizes with 4-bit, the large without),
    as one: their rows joined, the run settings of the first (they must agree)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("device", "dtype", "prompt", "new_tokens", "repeats", "vllm_eager")
    for r in results[1:]:
        differ = [k for k in keys if r.get(k) != results[0].get(k)]
        if differ:
            raise SystemExit(f"--tables: {paths[0]} and another file differ in {', '.join(differ)}; tables join one setting")
    return {**results[0], "rows": [row for r in results for row in r["rows"]],
            "vllm_served": {k: v for r in results for k, v in r.get("vllm_served", {}).items()}}


def main() -> None:
    if sys.argv[1:2] == ["--tables"]:  # print the tables of saved results (the docs cite these)
        result = merged(sys.argv[2:])
    else:
        args = parse_args()
        result = run(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    where = f"{len(result['cores'])} pinned core(s) {result['cores']}" if result["cores"] else "GPU"
    print(f"{result['device']}, {where}, torch {result['torch']}, {result['dtype']}, prompt {result['prompt']}, "
          f"{result['new_tokens']} new tokens, median (min-max) of {result['repeats']}")
    print(table(result))
    for extra in (ratio_table(result), ratio_table(result, "folded", "lowrank"), gain_table(result)):
        if extra:
            print(f"\n{extra}")


if __name__ == "__main__":
    main()
