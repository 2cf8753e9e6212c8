"""Every GEMM of a training step, timed alone at its real shape, against its roofline.

roofline.py bounds a step by FLOPs and bytes. A GEMM can still miss that bound by far:
a weight gradient dW = dY^T X of a low-rank factor reduces over all the micro-batch's tokens
(K = 16,384 at llama_350m) into a [r, d] output of only 16 tiles of 128 x 128, so without
split-K most of an H100/H200's 132 SMs idle. This script times each distinct GEMM of a step
(forward, input gradient, weight gradient, with the operand layouts autograd uses), counts it
as often as a step runs it, and prints achieved TFLOP/s and time / roofline per shape. With
--split-k S it also times the weight gradients as S partial products summed (what split-K
does), to see whether that layout would pay.

    python -m benchmarks.bench_gemm --device cuda --sizes llama_350m --methods full,lowrank --split-k 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from dlr.model.llama import build_model

from .recipe import SEQ, recipe_micro_batch
from .roofline import GPUS, gemm_seconds, linear_maps


def timeit(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def gemms(tokens: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype, split_k: int):
    """{kind: (m, k, n, fn)} for the three GEMMs of y = x W^T, laid out as autograd runs them."""
    x = torch.randn(tokens, d_in, device=device, dtype=dtype)
    w = torch.randn(d_out, d_in, device=device, dtype=dtype)
    dy = torch.randn(tokens, d_out, device=device, dtype=dtype)
    out = {"fwd": (tokens, d_in, d_out, lambda: torch.mm(x, w.t())),
           "dX": (tokens, d_out, d_in, lambda: torch.mm(dy, w)),
           "dW": (d_out, tokens, d_in, lambda: torch.mm(dy.t(), x))}
    if split_k > 1 and tokens % split_k == 0:
        xs, dys = x.view(split_k, tokens // split_k, d_in), dy.view(split_k, tokens // split_k, d_out)
        out[f"dW split-K {split_k}"] = (d_out, tokens, d_in,
                                        lambda: torch.bmm(dys.transpose(1, 2), xs).sum(0, dtype=torch.float32))
    return out


def bench(size: str, method: str, device: torch.device, dtype: torch.dtype, micro_batch: int, repeats: int,
          split_k: int, gpu: str | None) -> list[dict]:
    peak, bandwidth = GPUS[gpu] if gpu else (None, None)
    tokens = micro_batch * SEQ
    shapes = Counter(linear_maps(build_model(size, method, device="meta")))
    rows = []
    for (d_in, d_out), count in sorted(shapes.items()):
        for kind, (m, k, n, fn) in gemms(tokens, d_in, d_out, device, dtype, split_k).items():
            seconds = timeit(fn, device, repeats)
            bound = gemm_seconds(m, k, n, peak, bandwidth) if peak else None
            rows.append({"size": size, "method": method, "d_in": d_in, "d_out": d_out, "kind": kind, "m": m, "k": k,
                         "n": n, "count": count, "ms": seconds * 1e3, "tflops": 2 * m * k * n / seconds / 1e12,
                         "x_roofline": seconds / bound if bound else None})
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| size | method | map d_in x d_out | GEMM | m x k x n | per step | ms each | TFLOP/s | x roofline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = f"{r['x_roofline']:.1f}" if r["x_roofline"] is not None else "—"
        lines.append(f"| {r['size']} | {r['method']} | {r['d_in']} x {r['d_out']} | {r['kind']} | "
                     f"{r['m']} x {r['k']} x {r['n']} | {r['count']} | {r['ms']:.3f} | {r['tflops']:.1f} | {x} |")
    lines += ["", "| size | method | GEMM ms per step (measured, unsplit) | of which dW | dW with split-K |", "|---|---|---|---|---|"]
    for key in dict.fromkeys((r["size"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["size"], r["method"]) == key]
        total = sum(r["ms"] * r["count"] for r in mine if not r["kind"].startswith("dW split"))
        dw = sum(r["ms"] * r["count"] for r in mine if r["kind"] == "dW")
        split = [r for r in mine if r["kind"].startswith("dW split")]
        split_ms = f"{sum(r['ms'] * r['count'] for r in split):.2f}" if split else "—"
        lines.append(f"| {key[0]} | {key[1]} | {total:.2f} | {dw:.2f} | {split_ms} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--sizes", default="llama_350m")
    ap.add_argument("--methods", default="full,lowrank")
    ap.add_argument("--micro-batch", type=int, default=0, help="0: each size's recipe micro-batch")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--split-k", type=int, default=0, help="also time each weight gradient as S partial products")
    ap.add_argument("--gpu", default=None, choices=tuple(GPUS), help="roofline of this GPU (default: from the device name)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = args.gpu
    if gpu is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        gpu = next((g for g in GPUS if g in name), None)
    rows = []
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            rows += bench(size, method, device, dtype, args.micro_batch or recipe_micro_batch(size), args.repeats,
                          args.split_k, gpu)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{hw}, torch {torch.__version__}, {dtype}, roofline: {gpu or 'none'}\n")
    print(summary(rows))
    if args.json:
        args.json.write_text(json.dumps({"hardware": hw, "torch": torch.__version__, "args": vars(args) | {"json": None},
                                         "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
