"""The LM loss alone: plain (lm_head + fp32 logits + CE) vs chunked (eager / compiled) vs Liger.

    python -m benchmarks.bench_loss --device cuda --tokens 32768 --hidden 512,768
    python -m benchmarks.bench_loss --device cpu --tokens 2048 --hidden 256 --repeats 3

One measurement = forward + backward of the loss from hidden states [tokens, hidden] and the
lm_head weight [32000, hidden], under bf16 autocast on CUDA (as the trainer runs it). Reports
the median time, the peak memory above the inputs, and each implementation's relative error
against the plain loss in fp32 (loss and both gradients), which must stay under 1e-4.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dlr.model.fused_loss import chunked_linear_cross_entropy, liger_available, liger_linear_cross_entropy, shift_labels

VOCAB = 32000


def plain(h, w, y):
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), shift_labels(y).reshape(-1), ignore_index=-100)


IMPLS = {
    "plain": plain,
    "chunked": lambda h, w, y: chunked_linear_cross_entropy(h, w, y),
    "chunked_compiled": lambda h, w, y: chunked_linear_cross_entropy(h, w, y, compiled=True),
    "liger": lambda h, w, y: liger_linear_cross_entropy(h, w, y),
}


def inputs(tokens: int, hidden: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(1, tokens, hidden, generator=g) * 2).to(device).requires_grad_()
    w = (torch.randn(VOCAB, hidden, generator=g) / hidden**0.5).to(device).requires_grad_()
    y = torch.randint(0, VOCAB, (1, tokens), generator=g)
    y[0, ::17] = -100  # some ignored positions, as padding gives
    return h, w, y.to(device)


def run(fn, h, w, y, autocast: bool):
    h.grad = w.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, y)
    loss.backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def accuracy(name: str, device: torch.device) -> dict:
    """fp32, no autocast: the implementation against the plain loss on the same inputs."""
    h, w, y = inputs(4096, 256, device, seed=1)
    ref = run(plain, h, w, y, autocast=False)
    out = run(IMPLS[name], h, w, y, autocast=False)
    return {"fp32_rel_loss": rel(out[0], ref[0]), "fp32_rel_grad_h": rel(out[1], ref[1]), "fp32_rel_grad_w": rel(out[2], ref[2])}


def timed(name: str, tokens: int, hidden: int, device: torch.device, repeats: int, warmup: int) -> dict:
    h, w, y = inputs(tokens, hidden, device)
    autocast = device.type == "cuda"
    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        run(IMPLS[name], h, w, y, autocast)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 1024**3 if cuda else None
    return {"impl": name, "tokens": tokens, "hidden": hidden, "ms": statistics.median(times) * 1e3,
            "ms_min": min(times) * 1e3, "peak_extra_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=32768, help="micro-batch x seq (llama_60m recipe: 128 x 256)")
    ap.add_argument("--hidden", default="512,768")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    impls = [i for i in args.impls.split(",") if i != "liger" or (device.type == "cuda" and liger_available())]
    rows = []
    for name in impls:
        acc = accuracy(name, device)
        for hidden in (int(x) for x in args.hidden.split(",")):
            rows.append({**timed(name, args.tokens, hidden, device, args.repeats, args.warmup), **acc})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    hw = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{hw}, torch {torch.__version__}; {args.tokens} tokens x vocab {VOCAB}; fwd+bwd, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; median of {args.repeats}\n")
    print("| impl | hidden | ms | peak extra GiB | fp32 rel. err loss / grad h / grad w |\n|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_extra_gib']:.2f}" if r["peak_extra_gib"] is not None else "—"
        print(f"| {r['impl']} | {r['hidden']} | {r['ms']:.2f} | {peak} | "
              f"{r['fp32_rel_loss']:.1e} / {r['fp32_rel_grad_h']:.1e} / {r['fp32_rel_grad_w']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"hardware": hw, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
