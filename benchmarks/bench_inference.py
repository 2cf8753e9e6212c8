"""Inference cost of a dense model against the folded DLR model (and plain low-rank), side by side.

    python -m benchmarks.bench_inference --sizes llama_60m,llama_130m --threads 2 --repeats 5

Random weights (speed does not depend on them). Per size and method: parameters, weight
memory, prefill tokens/s (`generate` of one token: batch x prompt tokens) and decode tokens/s (the
further tokens of greedy HF `generate` with the KV cache) at each batch
size; the median of --repeats runs and their spread (min-max). Folded DLR and lowrank have the
same graph and parameters, so they cost the same. With --vllm-python (a venv holding vLLM),
the same models are also served by vLLM's Transformers backend (decode tokens/s, batch as
given). Prints a Markdown table and writes --out JSON with the machine named.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("full", "lowrank", "folded")
VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
path, batch, prompt, new, repeats = sys.argv[1], *map(int, sys.argv[2:6])
llm = LLM(model=path, model_impl="transformers", trust_remote_code=True, dtype="float32", max_model_len=prompt + new,
          enforce_eager=True, gpu_memory_utilization=0.1, seed=0)
prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 30000 + 5 for j in range(prompt)]) for i in range(batch)]
params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True)
times = []
for _ in range(repeats + 1):
    t = time.perf_counter(); llm.generate(prompts, params, use_tqdm=False); times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times[1:]}))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(size: str, method: str) -> torch.nn.Module:
    import dlr

    torch.manual_seed(0)
    model = dlr.build_model(size, "dlr" if method == "folded" else method)
    if method == "folded":
        dlr.fold_model(model)
    return model.eval()


def weights(model: torch.nn.Module) -> tuple[int, int]:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(p.numel() for p in model.parameters()), sum(t.numel() * t.element_size() for t in tensors)


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


@torch.inference_mode()
def hf_speed(model: torch.nn.Module, *, batch: int, prompt: int, new: int, repeats: int) -> dict:
    ids = torch.randint(5, 30000, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    prefill, decode = [], []

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    for i in range(repeats + 1):  # the first run warms up (allocator, thread pool)
        first, full = timed(1), timed(new)  # first: the prefill (and one token); full: plus new - 1 decode steps
        if i:
            prefill.append(batch * prompt / first)
            if full > first:  # a noisy machine can invert the pair; such a repeat says nothing
                decode.append(batch * (new - 1) / (full - first))
    return {"prefill_tok_s": spread(prefill), "decode_tok_s": spread(decode)}


def vllm_speed(python: str, model: torch.nn.Module, *, batch: int, prompt: int, new: int, repeats: int) -> dict:
    from dlr.data import load_tokenizer
    from dlr.model_dir import save_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model, load_tokenizer("t5"), Path(tmp) / "m")
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": ""}
        proc = subprocess.run([python, "-c", VLLM_SCRIPT, str(Path(tmp) / "m"), str(batch), str(prompt), str(new),
                               str(repeats)], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"}
    seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    return {"generate_tok_s": spread([batch * new / s for s in seconds])}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            model = build(size, method)
            params, nbytes = weights(model)
            for batch in map(int, args.batches.split(",")):
                row = {"size": size, "method": method, "batch": batch, "params": params, "weight_bytes": nbytes,
                       **hf_speed(model, batch=batch, prompt=args.prompt, new=args.new, repeats=args.repeats)}
                if args.vllm_python:
                    row["vllm"] = vllm_speed(args.vllm_python, model, batch=batch, prompt=args.prompt, new=args.new,
                                             repeats=args.repeats)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            del model
    return {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "prompt": args.prompt,
            "new_tokens": args.new, "repeats": args.repeats, "dtype": "fp32", "rows": rows}


def table(result: dict) -> str:
    out = ["| size | method | batch | params | weights MiB | prefill tok/s | decode tok/s |" +
           (" vLLM tok/s |" if any("vllm" in r for r in result["rows"]) else ""), ""]
    out[1] = "|" + "---|" * (out[0].count("|") - 1)

    def cell(s: dict) -> str:
        return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

    for r in result["rows"]:
        line = (f"| {r['size']} | {r['method']} | {r['batch']} | {r['params'] / 1e6:.1f}M | {r['weight_bytes'] / 2**20:.0f} "
                f"| {cell(r['prefill_tok_s'])} | {cell(r['decode_tok_s'])} |")
        if "vllm" in r:
            v = r["vllm"]
            line += f" {cell(v['generate_tok_s']) if 'generate_tok_s' in v else v.get('error', '')} |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="llama_60m,llama_130m,llama_350m,llama_1b")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=32, help="generated tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (pinned)")
    ap.add_argument("--vllm-python", default=None, help="a Python with vLLM installed: also measure vLLM")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        sys.exit(f"--methods: unknown {bad}; accepted: {', '.join(METHODS)}")
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"CPU: {result['cpu']}, {result['threads']} thread(s), torch {result['torch']}, fp32, prompt {result['prompt']}, "
          f"{result['new_tokens']} new tokens, median (min-max) of {result['repeats']}")
    print(table(result))


if __name__ == "__main__":
    main()
