#!/usr/bin/env python
"""Time optimizer.step() for AdamW vs Spectron on lowrank models; prints a markdown table.

    python -m benchmarks.bench_optimizer --sizes llama_tiny llama_60m

Gradients are fixed random tensors (the step cost does not depend on their values), so
only the optimizer is timed. Reported: median wall time of `--repeats` steps after
`--warmup` steps (the first steps allocate state), and, for scale, the median forward +
backward time of one batch of `--batch` x `--seq` tokens on the same model.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

import dlr
from dlr.optim import build_optimizer, find_factor_pairs

CONFIGS = {
    "adamw": ({"name": "adamw", "weight_decay": 0.01}, 1e-3),
    "spectron": ({"name": "spectron", "weight_decay": 0.01}, 1e-2),
    "spectron-bf16": ({"name": "spectron", "weight_decay": 0.01, "ns_dtype": "bfloat16"}, 1e-2),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_step(size: str, optimizer: str, device: torch.device, warmup: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = dlr.build_model(size, method="lowrank").to(device)
    cfg, lr = CONFIGS[optimizer]
    opt = build_optimizer(cfg, model, "lowrank", lr=lr)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return _median_ms(opt.step, device, warmup, repeats)


def bench_fwd_bwd(size: str, device: torch.device, batch: int, seq: int, warmup: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = dlr.build_model(size, method="lowrank").to(device)
    ids = torch.randint(2, model.config.vocab_size, (batch, seq), device=device)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return _median_ms(fwd_bwd, device, warmup, repeats)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["llama_tiny", "llama_60m"])
    parser.add_argument("--optimizers", nargs="+", default=list(dlr.config.OPTIMIZERS), choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--no-fwd-bwd", action="store_true", help="skip the forward+backward reference timing")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"hardware: {hardware(device)}; torch {torch.__version__}; median of {args.repeats} steps after {args.warmup} warm-up")
    header = ["size", "factor pairs", "params (M)"] + [f"{o} step (ms)" for o in args.optimizers]
    if "adamw" in args.optimizers:
        header += [f"{o} / adamw" for o in args.optimizers if o != "adamw"]
    if not args.no_fwd_bwd:
        header.append(f"fwd+bwd {args.batch}x{args.seq} tok (ms)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in args.sizes:
        model = dlr.build_model(size, method="lowrank")
        pairs = len(find_factor_pairs(model))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        del model
        times = {o: bench_step(size, o, device, args.warmup, args.repeats) for o in args.optimizers}
        row = [size, str(pairs), f"{params:.1f}"] + [f"{times[o]:.1f}" for o in args.optimizers]
        if "adamw" in times:
            row += [f"{times[o] / times['adamw']:.2f}x" for o in args.optimizers if o != "adamw"]
        if not args.no_fwd_bwd:
            row.append(f"{bench_fwd_bwd(size, device, args.batch, args.seq, args.warmup, args.repeats):.1f}")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
