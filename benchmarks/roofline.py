"""The matmul roofline of a training step: how fast full and low-rank could be on a given GPU.

Every GEMM of a step (forward y = x W^T, backward dX = dY W and dW = dY^T X, for every
projection and the lm_head), with its shape read from the real model (built on the meta
device), is timed at max(FLOPs / peak, bytes / bandwidth), bytes being its bf16 operands and
output; attention adds its PaLM FLOPs at the same peak. Norms, activations, residual adds,
casts, the optimizer and the host are left out, so the result is a lower bound on the step
time and an upper bound on MFU. What it answers: whether a time ratio such as lowrank/full
<= FLOP ratio + 0.10 is reachable at all at a size's rank and micro-batch, and how far a
measured step (--measured, bench_train.py's JSON) is from its bound. With --traffic (the
JSON of traffic.py) the bytes of the kernels inductor generates for the compiled
step (norms, activations, adds, casts, the loss's softmax) join it at full bandwidth: still a
lower bound, for the step as the trainer compiles it.

Low-rank projections are two GEMMs whose inner dimension is the rank, so their arithmetic
intensity is about r (d_in + d_out) / (d_in + d_out + 2r) FLOPs per byte: near or below the
GPU's ridge point (peak / bandwidth, ~206 on an H200) at the zoo's ranks up to llama_350m.

    python -m benchmarks.roofline --gpu h200 --measured benchmarks/results/h200_default/step_default_60m.json \
        --traffic benchmarks/results/traffic_cpu.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from dlr.model.llama import build_model
from dlr.train.telemetry import PEAK_BF16
from dlr.model.sizes import get_size

from .recipe import SEQ, recipe_micro_batch

# Dense bf16 peak (the one MFU is reported against) and HBM bandwidth (SXM parts, vendor figures).
GPUS = {"h100": (PEAK_BF16["H100"], 3.35e12), "h200": (PEAK_BF16["H200"], 4.8e12), "a100": (PEAK_BF16["A100"], 2.04e12)}


@dataclass
class Bound:
    flops: float = 0.0  # per step, what MFU counts (PaLM: 6 x matmul params + attention, x tokens)
    seconds: float = 0.0  # the roofline time of those FLOPs and their bytes

    def add(self, flops: float, seconds: float) -> None:
        self.flops += flops
        self.seconds += seconds


def gemm_seconds(m: int, k: int, n: int, peak: float, bandwidth: float) -> float:
    """One [m, k] x [k, n] GEMM in bf16 at its roofline."""
    return max(2 * m * k * n / peak, 2 * (m * k + k * n + m * n) / bandwidth)


def linear_step(tokens: int, d_in: int, d_out: int, peak: float, bandwidth: float) -> tuple[float, float]:
    """(FLOPs, seconds) of one linear map's forward, input-gradient and weight-gradient GEMMs."""
    seconds = (gemm_seconds(tokens, d_in, d_out, peak, bandwidth)  # y = x W^T
               + gemm_seconds(tokens, d_out, d_in, peak, bandwidth)  # dX = dY W
               + gemm_seconds(d_out, tokens, d_in, peak, bandwidth))  # dW = dY^T X
    return 6 * tokens * d_in * d_out, seconds


def linear_maps(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every GEMM-shaped map a forward runs: a LowRankLinear is two of them,
    its factors A and B (nn.Linear children)."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def step_bound(size: str, method: str, micro_batch: int, gpu: str) -> Bound:
    peak, bandwidth = GPUS[gpu]
    model = build_model(size, method, device="meta")
    tokens = micro_batch * SEQ
    bound = Bound()
    for d_in, d_out in linear_maps(model):
        bound.add(*linear_step(tokens, d_in, d_out, peak, bandwidth))
    cfg = model.config
    attention = 3 * 4 * cfg.num_hidden_layers * SEQ * cfg.hidden_size * tokens  # PaLM's term, forward + backward
    bound.add(attention, attention / peak)
    return bound


def table(sizes: list[str], gpu: str, measured: dict[tuple[str, str], float],
          traffic: dict[tuple[str, str], float] | None = None) -> str:
    """traffic: (size, method) -> bytes per step of the generated kernels (traffic.py), added at full bandwidth."""
    peak, bandwidth = GPUS[gpu]
    traffic = traffic or {}
    with_traffic = all((size, m) in traffic for size in sizes for m in ("full", "lowrank"))
    extra = " | + generated kernels: full ms (MFU ceiling), lowrank ms (MFU ceiling), lowrank/full" if with_traffic else ""
    lines = [f"GEMM + attention roofline, {gpu.upper()} ({peak / 1e12:.0f} TFLOP/s bf16, "
             f"{bandwidth / 1e12:.2f} TB/s), seq {SEQ}, recipe micro-batch; a lower bound on the step time\n",
             "| size | rank | micro-batch | full ms (MFU ceiling) | lowrank ms (MFU ceiling) | "
             f"lowrank/full: FLOPs, roofline{extra} | measured full ms (x bound) | measured lowrank ms (x bound) |",
             "|---|---|---|---|---|---|" + ("---|" if with_traffic else "") + "---|---|"]
    for size in sizes:
        mb = recipe_micro_batch(size)
        full, low = step_bound(size, "full", mb, gpu), step_bound(size, "lowrank", mb, gpu)
        bound = {"full": full.seconds, "lowrank": low.seconds}
        cell = ""
        if with_traffic:
            bound = {m: bound[m] + traffic[(size, m)] / bandwidth for m in bound}
            cell = (f" | {bound['full'] * 1e3:.1f} ({full.flops / bound['full'] / peak:.0%}), "
                    f"{bound['lowrank'] * 1e3:.1f} ({low.flops / bound['lowrank'] / peak:.0%}), "
                    f"{bound['lowrank'] / bound['full']:.2f}")
        cells = []
        for method in ("full", "lowrank"):
            ms = measured.get((size, method))
            cells.append(f"{ms:.1f} ({ms / (bound[method] * 1e3):.1f}x)" if ms else "—")
        lines.append(
            f"| {size} | {get_size(size).default_rank} | {mb} | {full.seconds * 1e3:.1f} ({full.flops / full.seconds / peak:.0%}) | "
            f"{low.seconds * 1e3:.1f} ({low.flops / low.seconds / peak:.0%}) | "
            f"{low.flops / full.flops:.2f}, {low.seconds / full.seconds:.2f}{cell} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="h200", choices=tuple(GPUS))
    ap.add_argument("--sizes", default="llama_60m,llama_130m,llama_350m,llama_1b")
    ap.add_argument("--measured", type=Path, action="append", default=[],
                    help="bench_train.py --json output(s): their median step times go next to the bound")
    ap.add_argument("--traffic", type=Path, help="traffic.py --json output: its generated-kernel bytes join the "
                    "bound at full bandwidth, and the measured steps are set against that bound")
    args = ap.parse_args()
    measured = {}
    for path in args.measured:
        for row in json.loads(path.read_text())["rows"]:
            if row["micro_batch"] == recipe_micro_batch(row["size"]):  # the bound is at the recipe's
                measured[(row["size"], row["method"])] = row["ms_per_step"]
    traffic = {}
    if args.traffic:
        for row in json.loads(args.traffic.read_text())["rows"]:
            if not row.get("bf16_weights") and row["micro_batch"] == recipe_micro_batch(row["size"]):
                traffic[(row["size"], row["method"])] = row["generated_bytes"]
    print(table(args.sizes.split(","), args.gpu, measured, traffic))


if __name__ == "__main__":
    main()
