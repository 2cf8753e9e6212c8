#!/usr/bin/env bash
# Training-step benchmarks on one GPU (benchmarks/README.md, "Training step"): bf16, every method,
# eager at micro-batch 128 and 32; lowrank vs dlr under torch.compile; then the trainer itself.
# Writes under ${OUT:-gpu_out} (7 files).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
# Run outside the checkout: with dlr installed non-editable, the source tree's dlr/
# (which has no dlr.configs) must not shadow it. Only the benchmarks package is linked in.
cd "$(mktemp -d)" && ln -s "$REPO/benchmarks" benchmarks
export PYTHONUNBUFFERED=1
BENCH="python3 -m benchmarks.bench_train --device cuda --dtype bf16"
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
# The trainer end to end at the recipe micro-batch (data, logging, eval and fold included),
# each method twice, alternating: summary.json of every run, gathered into one file.
# TRAINER_EXTRA adds dlr-train overrides, e.g. "compile=false loss=plain" for the eager trainer.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
for i in 1 2; do
  for m in lowrank dlr; do
    python3 -m dlr.cli.train model=llama_60m data=c4_sample method=$m steps=60 global_batch=128 micro_batch=128 \
        eval_every=1000 save_every=1000 ${TRAINER_EXTRA:-} out_dir=trainer/$m-$i > trainer-$m-$i.log 2>&1 || tail -5 trainer-$m-$i.log
  done
done
python3 - "$OUT/trainer_mb128.json" <<'PY'
import json, pathlib, sys
runs = {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(pathlib.Path("trainer").iterdir())}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=2))
for name, r in runs.items():
    print(f"{name}: {r['mean_tokens_per_s']:,.0f} tokens/s, peak {r['peak_mem_gib']:.3f} GiB, val ppl {r['val_ppl']:.2f}")
PY
ls -la "$OUT"
