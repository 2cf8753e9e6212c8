#!/usr/bin/env bash
# The GPU-throughput figures of docs/benchmarks.md ("Default run"), on one GPU, in one call:
#   1. the CUDA tests (flash attention, no host sync in a step, fused loss);
#   2. the loss alone: plain vs chunked (eager, compiled) vs Liger -> the faster fused one is used below;
#   3. the isolated training step, today's default (compiled, fused loss) and the old eager
#      default (plain loss) side by side, at each size's recipe micro-batch;
#   4. dlr-train end to end, default vs compile=false loss=plain;
#   5. larger sizes while the time budget lasts.
# Sections past BUDGET_S seconds are skipped (their files say so); each writes under $OUT.
# Usage: OUT=gpu_out BUDGET_S=400 SECTIONS="tests loss small trainer large" bash scripts/gpu_throughput.sh
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
BUDGET_S=${BUDGET_S:-400}
SECTIONS=${SECTIONS:-"tests loss small trainer large"}
START=$(date +%s)
# Run outside the checkout: with dlr installed non-editable, the source tree's dlr/
# (which has no dlr.configs) must not shadow it.
cd "$(mktemp -d)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
want() { [[ " $SECTIONS " == *" $1 "* ]] && { [ "$(left)" -gt "${2:-30}" ] || { echo "skipped $1: $(left) s left" | tee -a "$OUT/skipped.txt"; false; }; }; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if want tests 30; then
  timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_gpu_path.py" "$REPO/tests/test_loss.py" \
    2>&1 | tail -15 | tee "$OUT/tests.txt"
fi

LOSS=chunked
if want loss 60; then
  timeout $(( $(left) - 10 )) python3 "$REPO/scripts/bench_loss.py" --device cuda --tokens 32768 --hidden 512,1024,2048 \
    --repeats 10 --warmup 3 --json "$OUT/loss.json" 2>/dev/null | tee "$OUT/loss.md"
  # The faster fused implementation over the three widths (sum of medians) is what the rest uses.
  LOSS=$(python3 - "$OUT/loss.json" <<'PY' 2>/dev/null || echo chunked
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
total = {}
for r in rows:
    if r["impl"] in ("chunked_compiled", "liger") and r["fp32_rel_loss"] < 1e-4:
        total[r["impl"]] = total.get(r["impl"], 0) + r["ms"]
best = min(total, key=total.get)
print("liger" if best == "liger" else "chunked")
PY
)
fi
echo "fused loss used below: $LOSS" | tee "$OUT/loss_choice.txt"

BENCH="python3 $REPO/scripts/bench_train.py --device cuda --dtype bf16 --micro-batch 0"
if want small 120; then
  # Today's default (compiled layers + fused loss) and the old eager default (plain loss), back to back.
  timeout $(( $(left) - 5 )) $BENCH --sizes llama_60m,llama_130m --methods full,lowrank,dlr --compile --loss $LOSS \
    --repeats 10 --warmup 3 --json "$OUT/step_default_small.json" 2>&1 | grep -v "^llama.*done" | tee "$OUT/step_small.md"
  timeout $(( $(left) - 5 )) $BENCH --sizes llama_60m,llama_130m --methods full,lowrank,dlr --loss plain \
    --repeats 10 --warmup 3 --json "$OUT/step_eager_small.json" 2>&1 | grep -v "^llama.*done" | tee -a "$OUT/step_small.md"
fi

if want trainer 90; then
  mkdir -p trainer
  for size in llama_60m llama_130m; do
    for variant in default eager; do
      extra=""; [ $variant = eager ] && extra="compile=false loss=plain"
      [ $variant = default ] && extra="loss=$LOSS"
      [ "$(left)" -gt 25 ] || { echo "skipped trainer $size $variant" >> "$OUT/skipped.txt"; continue; }
      timeout $(( $(left) - 5 )) python3 -m dlr.cli.train model=$size data=c4_sample method=lowrank steps=16 log_every=5 \
        eval_every=1000 save_every=1000 data.num_workers=6 data.val_tokens=20000 $extra out_dir=trainer/$size-$variant \
        > trainer-$size-$variant.log 2>&1 || tail -5 trainer-$size-$variant.log
    done
  done
  python3 - "$OUT/trainer.json" <<'PY'
import json, pathlib, sys
runs = {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(pathlib.Path("trainer").iterdir())
        if (d / "summary.json").exists()}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=2))
for name, r in runs.items():
    print(f"{name}: {r['mean_tokens_per_s'] or 0:,.0f} tokens/s, first step {r['first_step_s']:.1f} s, "
          f"peak {r['peak_mem_gib']:.2f} GiB, loss {r['loss_impl']}, val ppl {r['val_ppl']:.2f}")
PY
  tail -3 trainer-*.log > "$OUT/trainer_logs.txt" 2>&1
fi

if want large 100; then
  timeout $(( $(left) - 5 )) $BENCH --sizes llama_350m,llama_1b --methods full,lowrank --compile --loss $LOSS \
    --repeats 6 --warmup 2 --json "$OUT/step_default_large.json" 2>&1 | grep -v "^llama.*done" | tee "$OUT/step_large.md"
fi
echo "elapsed $(( $(date +%s) - START )) s"
ls -la "$OUT"
