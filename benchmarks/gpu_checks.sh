#!/usr/bin/env bash
# Reproduces the GPU figures of benchmarks/README.md ("Training step"), docs/results.md and
# docs/spectron.md on one GPU: training-step benchmarks in bf16, the 3-seed full/lowrank/dlr
# comparison, and the AdamW vs Spectron runs. Writes under ${OUT:-gpu_out}.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
mkdir -p "$OUT/logs"
# Run outside the checkout: with dlr installed non-editable, the source tree's dlr/
# (which has no dlr.configs) must not shadow it. Only the experiments package is linked in.
cd "$(mktemp -d)" && ln -s "$REPO/experiments" experiments
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

OUT="$OUT/bench_train" bash "$REPO/benchmarks/gpu_bench_train.sh"

# AdamW vs Spectron on the same setting as the results runs (seed 0); AdamW runs come from above.
for lr in 0.02 0.05; do
  for method in lowrank dlr; do
    python3 -m dlr.cli.train model=llama_demo data=c4_sample method=$method seed=0 steps=300 global_batch=32 \
      micro_batch=32 eval_every=50 save_every=300 optimizer=spectron lr=$lr optimizer.adamw_lr=3e-3 \
      out_dir=/tmp/spectron/runs/$method-lr$lr > "$OUT/logs/spectron-$method-$lr.log" 2>&1 &
  done
done
python3 -m experiments.run_results --device cuda --jobs ${JOBS:-3} --out /tmp/results > "$OUT/logs/run_results.log" 2>&1
cp /tmp/results/results_bundle.tar.gz "$OUT/" 2>/dev/null
wait
python3 -m dlr.cli.compare /tmp/spectron/runs /tmp/results/runs/lowrank-s0 /tmp/results/runs/dlr-s0 \
    --out /tmp/spectron/compare > "$OUT/logs/spectron_compare.txt" 2>&1
tar czf "$OUT/spectron_bundle.tar.gz" -C /tmp --exclude='*.safetensors' --exclude='checkpoints' spectron 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
ls -la "$OUT"
