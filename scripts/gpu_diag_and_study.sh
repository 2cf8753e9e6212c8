#!/usr/bin/env bash
# Second H200 call of the session (docs/benchmarks.md, docs/ablations.md): where the compiled
# low-rank step spends its time (per-layer vs whole-model compile, kernel profiles), then the
# alpha sensitivity study. Writes at most 8 files under $OUT.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
BENCH="python3 $REPO/scripts/bench_train.py --device cuda --dtype bf16 --micro-batch 0 --compile --repeats 8 --warmup 3"
cd "$(mktemp -d)"
timeout 55 $BENCH --sizes llama_60m --methods lowrank --loss liger --compile-scope layers --profile "$OUT/profile.txt" \
  --json "$OUT/diag_layers.json" 2>&1 | grep "^| llama" | tee "$OUT/diag.md"
timeout 90 $BENCH --sizes llama_60m --methods full,lowrank --loss plain --compile-scope model --profile "$OUT/profile.txt" \
  --json "$OUT/diag_model.json" 2>&1 | grep "^| llama" | tee -a "$OUT/diag.md"
cd "$REPO"
# The study runs `python -m dlr.cli.train` from the checkout: give the source tree its dlr.configs.
[ -e dlr/configs ] || ln -s ../configs dlr/configs
timeout ${STUDY_S:-270} python3 scripts/study.py alpha --device cuda --jobs 18 --bundle "$OUT/study_bundle.tar.gz" 2>&1 | tail -25 > "$OUT/study.txt"
tail -8 "$OUT/study.txt"
ls -la "$OUT"
