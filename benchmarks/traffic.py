"""The bytes a compiled training step moves outside its GEMMs, from inductor's own count.

roofline.py bounds a step by its GEMMs and attention alone. What that leaves out (the norms,
rotary, the SwiGLU and latent SiLU products, residual and gradient adds, casts, the loss's
softmax) runs in kernels inductor generates, each bound by memory, and none of it shrinks
with the rank. Inductor counts the bytes every kernel it schedules reads and writes
(GraphLowering.count_bytes, what its own cost model uses). This script compiles what the
trainer compiles (the decoder as one graph under bf16 autocast, the chunked loss compiled
per chunk), runs one forward + backward, and sums those counts by kind: generated kernels,
GEMMs (extern mm) and the rest of the extern calls (attention).

The counts are linear in the depth and in the tokens, so a size is compiled at its real width
with 1 and 2 layers and 1 and 2 sequences, and extrapolated to its depth and recipe
micro-batch. The GEMM bytes per layer and token come out exactly as roofline.py counts them,
6 (d_in + d_out) bf16 bytes per map (tests/test_traffic.py). It runs on the CPU, whose code
generator fuses like the GPU's in the large (pointwise chains into one kernel, pointwise into
reductions) but not in every detail: the figures say where the bytes are, not what a GPU
kernel list would show. A generated kernel does not run at the same time as a GEMM on the
training stream, so its time at full bandwidth adds to the GEMM roofline: `roofline.py
--traffic FILE`.

    python -m benchmarks.traffic --json traffic.json   # benchmarks/results/traffic_cpu.json: this run
    python -m benchmarks.traffic --sizes llama_350m,llama_1b --methods full,lowrank --bf16-weights  # + these rows
    python -m benchmarks.traffic --sizes llama_350m --methods lowrank --kernels   # one layer, by kernel
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch._inductor import metrics
from torch._inductor.scheduler import ExternKernelSchedulerNode

from dlr.model.fused_loss import make_loss_fn
from dlr.model.llama import build_model
from dlr.train.layer_paths import apply_training_paths
from dlr.train.objective import TrainingObjective
from dlr.train.compile import compile_decoder
from dlr.model.sizes import VOCAB_SIZE, get_size

from .recipe import SEQ, recipe_micro_batch

KINDS = ("generated", "gemm", "other_extern")


def kernel_key(node) -> tuple[str, str]:
    """(kind, name) of a scheduled kernel: a generated one is named by the aten ops it fuses."""
    if isinstance(node, ExternKernelSchedulerNode):
        name = str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)
        return ("gemm" if name.endswith((".mm", ".addmm", ".bmm")) else "other_extern"), name
    ops = {getattr(o.target, "__name__", str(o.target)) for n in node.get_nodes() for o in n.node.origins}
    return "generated", ",".join(sorted(ops))


@contextlib.contextmanager
def counting_kernels():
    """Inductor counts bytes as it compiles while its metrics log is on; off again on exit."""
    quiet = lambda record: False  # noqa: E731 - on for its counts, not its text: records stop here
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    log.addFilter(quiet)
    torch._logging.set_logs(inductor_metrics=True)
    try:
        with inductor_config.patch(fx_graph_cache=False):  # a cache hit skips the lowering that counts
            yield
    finally:
        torch._logging.set_logs()
        log.removeFilter(quiet)


def step_bytes(size: str, method: str, layers: int, sequences: int, bf16_weights: bool = False) -> collections.Counter:
    """Inductor's byte count, by (kind, kernel), of one compiled forward + backward of `size`
    cut to `layers` layers on `sequences` sequences. bf16_weights: the weights cast to bf16 and
    no autocast (what parallelism=fsdp2's MixedPrecisionPolicy computes with), in place of
    fp32 weights under autocast, whose residual stream and norms stay fp32."""
    torch._dynamo.reset()
    metrics.reset()
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(get_size(size), num_hidden_layers=layers), method)
    apply_training_paths(model)  # what dlr-train runs
    if bf16_weights:
        model.to(torch.bfloat16)
    compile_decoder(model)
    objective = TrainingObjective(model, make_loss_fn("chunked", compiled=True))
    ids = torch.randint(0, VOCAB_SIZE, (sequences, SEQ), generator=torch.Generator().manual_seed(0))
    with counting_kernels():  # the backward graph compiles at the first backward
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16_weights):
            loss = objective(input_ids=ids, labels=ids).loss
        loss.backward()
    counted = collections.Counter()
    for node, words in metrics.nodes_num_elem:  # every graph compiled since the reset: (node, bytes // 4)
        counted[kernel_key(node)] += 4 * words
    return counted


def _combine(terms: list[tuple[float, collections.Counter]]) -> dict:
    out = collections.defaultdict(float)
    for weight, counter in terms:
        for key, value in counter.items():
            out[key] += weight * value
    return out


def extrapolate(size: str, method: str, micro_batch: int, bf16_weights: bool = False) -> dict:
    """Bytes per step by kind at the size's depth and `micro_batch`, from four compiled steps,
    and one layer's bytes per token by kernel."""
    m = {(l, s): step_bytes(size, method, l, s, bf16_weights) for l in (1, 2) for s in (1, 2)}
    # bytes(L, S) = fixed + L per_layer + S per_seq + L S per_layer_seq, so
    # bytes(D, B) = m11 + (D - 1)(m21 - m11) + (B - 1)(m12 - m11) + (D - 1)(B - 1) per_layer_seq.
    per_layer_seq = _combine([(1, m[2, 2]), (-1, m[2, 1]), (-1, m[1, 2]), (1, m[1, 1])])
    depth = get_size(size).num_hidden_layers
    step = _combine([(1, m[1, 1]), (depth - 1, _combine([(1, m[2, 1]), (-1, m[1, 1])])),
                     (micro_batch - 1, _combine([(1, m[1, 2]), (-1, m[1, 1])])),
                     ((depth - 1) * (micro_batch - 1), per_layer_seq)])
    by_kind = {kind: sum(v for (k, _), v in step.items() if k == kind) for kind in KINDS}
    layer = {kind: sum(v for (k, _), v in per_layer_seq.items() if k == kind) / SEQ for kind in KINDS}
    kernels = sorted(((v / SEQ, kind, name) for (kind, name), v in per_layer_seq.items() if abs(v) >= SEQ), reverse=True)
    return {"size": size, "method": method, "bf16_weights": bf16_weights,
            "micro_batch": micro_batch, "layers": depth,
            **{f"{kind}_bytes": round(v) for kind, v in by_kind.items()},
            **{f"layer_{kind}_bytes_per_token": round(v) for kind, v in layer.items()},
            "layer_kernels_bytes_per_token": [[round(v), kind, name] for v, kind, name in kernels]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="llama_60m,llama_130m,llama_350m,llama_1b")
    ap.add_argument("--methods", default="full,lowrank,dlr")
    ap.add_argument("--bf16-weights", action="store_true", help="bf16 weights without autocast (fsdp2's compute "
                    "dtypes) in place of fp32 weights under autocast (the trainer's ddp path)")
    ap.add_argument("--kernels", action="store_true", help="print one layer's bytes per token, kernel by kernel")
    ap.add_argument("--json", type=Path, help="write the rows here (roofline.py --traffic reads them)")
    args = ap.parse_args()
    rows, start = [], time.time()
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            row = extrapolate(size, method, recipe_micro_batch(size), bf16_weights=args.bf16_weights)
            rows.append(row)
            label = f"{size} {method}{' bf16 weights' if args.bf16_weights else ''} (micro-batch {row['micro_batch']})"
            print(f"{label}: per step {row['generated_bytes'] / 1e9:.1f} GB in generated kernels, "
                  f"{row['gemm_bytes'] / 1e9:.1f} GB in GEMMs, {row['other_extern_bytes'] / 1e9:.1f} GB in other extern calls; a layer: {row['layer_generated_bytes_per_token']} + "
                  f"{row['layer_gemm_bytes_per_token']} + {row['layer_other_extern_bytes_per_token']} B/token "
                  f"[{time.time() - start:.0f} s]", flush=True)
            if args.kernels:
                for value, kind, name in row["layer_kernels_bytes_per_token"]:
                    print(f"  {value:8d} B/token  {kind:12s} {name}")
    if args.json:
        args.json.write_text(json.dumps({"seq": SEQ, "torch": torch.__version__, "device": "cpu", "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
