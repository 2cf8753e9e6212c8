#!/usr/bin/env bash
# Training-step benchmarks on one GPU, as in docs/benchmarks.md ("GPU"): bf16, every method,
# eager at micro-batch 128 and 32; lowrank vs dlr under torch.compile. Writes under ${OUT:-gpu_out}
# (6 files).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
# Run outside the checkout: with dlr installed non-editable, the source tree's dlr/
# (which has no dlr.configs) must not shadow it.
cd "$(mktemp -d)"
export PYTHONUNBUFFERED=1
BENCH="python3 $REPO/scripts/bench_train.py --device cuda --dtype bf16"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/gpu.txt"
# The zoo recipe's micro-batch (what `dlr-train model=llama_60m` runs), then the
# host-overhead-bound micro-batch 32, then the same two under torch.compile.
$BENCH --sizes llama_60m,llama_130m --micro-batch 128 --repeats 10 --warmup 3 \
    --json "$OUT/train_mb128.json" 2>&1 | tee -a "$OUT/train.md"
$BENCH --sizes llama_60m,llama_130m --micro-batch 32 --repeats 20 --warmup 5 \
    --json "$OUT/train_mb32.json" 2>&1 | tee -a "$OUT/train.md"
$BENCH --sizes llama_60m --methods lowrank,dlr --compile --micro-batch 32 --repeats 20 --warmup 5 \
    --json "$OUT/train_mb32_compile.json" 2>&1 | tee -a "$OUT/train.md"
$BENCH --sizes llama_60m --methods lowrank,dlr --compile --micro-batch 128 --repeats 10 --warmup 3 \
    --json "$OUT/train_mb128_compile.json" 2>&1 | tee -a "$OUT/train.md"
ls -la "$OUT"
