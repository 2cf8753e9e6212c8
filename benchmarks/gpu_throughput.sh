#!/usr/bin/env bash
# The GPU figures of docs/performance.md and benchmarks/README.md ("Default run", "Memory"), on one
# GPU, in one call. Sections, in priority order (run those named in SECTIONS):
#   tests    the CUDA tests (flash attention, no host sync in a compiled step, the compiled loss
#            chunk against the plain loss)
#   inference dense vs folded DLR vs lowrank at inference, llama_60m..llama_1b, bf16, HF generate at
#            batch 1, 8, 32 (bench_inference; vLLM only where a CUDA vLLM venv is given as VLLM_PYTHON)
#   memory   llama_1b: dlr-train's memory estimate vs the measured peak, ddp and fsdp2
#   fsdp2    dlr-train parallelism=fsdp2 under torchrun (nccl, bf16 mixed precision), train + eval + fold
#   small    the isolated step, the default (compiled decoder, chunked loss) vs eager with the plain
#            loss, side by side at each size's recipe micro-batch: $SMALL_SIZES (llama_60m,llama_130m)
#   loss     the loss alone (bench_loss: the compiled chunk against Liger), then the step at llama_60m
#            with loss=liger in place of the default chunked loss, the decoder compiled the same way:
#            which fused loss is faster inside the whole step, host sync included
#   trainer  dlr-train end to end, default vs compile=false loss=plain, on token shards
#   gemm     every GEMM of a llama_350m full and lowrank step timed alone at its shape, against its
#            roofline, with weight gradients also split-K (bench_gemm; seconds)
#   large    the default step at $LARGE_SIZES (llama_350m,llama_1b): $LARGE_METHODS (full,lowrank), with a
#            kernel profile. Each model compiles its decoder as one graph, about 5 s per layer on an
#            H200, so LARGE_SIZES=llama_350m fits a short call
#   scopes   llama_60m compiled per layer (with Liger) and as a whole model (with the plain loss), each
#            with a kernel profile: where a compiled step spends its time outside the GPU
#   autotune llama_350m lowrank under other compile settings (max-autotune)
# Sections past BUDGET_S seconds are skipped. Text goes to $OUT/report.txt, figures to $OUT/*.json
# (and kernel profiles); past 7 files they are packed into $OUT/figures.tgz.
# Usage: OUT=gpu_out BUDGET_S=500 SECTIONS="tests memory fsdp2 small trainer" bash benchmarks/gpu_throughput.sh
# Token shards for the trainer runs: TOKENS=DIR (dlr-prepare data=c4_sample out=DIR), else prepared here.
# On a GPU machine without network (torch and transformers installed): carry a git-ignored .whl/ with
# wheels of hydra-core, omegaconf, antlr4-python3-runtime, datasets, dill, multiprocess,
# liger-kernel and dlr itself (`pip wheel --no-deps --no-build-isolation -w .whl .`), and start with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
BUDGET_S=${BUDGET_S:-500}
SECTIONS=${SECTIONS:-"tests inference memory fsdp2 small loss trainer gemm large scopes autotune"}
START=$(date +%s)
TOKENS=${TOKENS:+$(cd "$TOKENS" && pwd)}
# Run outside the checkout: with dlr installed non-editable, the source tree's dlr/
# (which has no dlr.configs) must not shadow it. Only the benchmarks package is linked in.
cd "$(mktemp -d)" && ln -s "$REPO/benchmarks" benchmarks
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
want() { [[ " $SECTIONS " == *" $1 "* ]] && { [ "$(left)" -gt "${2:-30}" ] || { echo "skipped $1: $(left) s left" | tee -a "$OUT/report.txt"; false; }; }; }
stamp() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/report.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  2>&1 | tee -a "$OUT/report.txt"
TRAIN="python3 -m dlr.cli.train"
COMMON="data.val_tokens=20000 log_every=5 eval_every=1000 save_every=1000 resume=never"

if want tests 40; then
  stamp tests
  timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_gpu_path.py" 2>&1 | tail -8 \
    | tee -a "$OUT/report.txt"
fi

if want inference 200; then
  stamp inference
  timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_inference --device cuda --repeats 5 ${VLLM_PYTHON:+--quant none,w8a8} \
    ${VLLM_PYTHON:+--vllm-python "$VLLM_PYTHON"} --out "$OUT/inference_gpu.json" 2>"$OUT/inference.log" \
    | tee -a "$OUT/report.txt"
fi

if want memory 150; then
  stamp memory
  timeout $(( $(left) - 10 )) python3 -m benchmarks.measure_memory --model llama_1b --micro-batch 16 --steps 3 --parallelism ${MEM_PAR:-ddp fsdp2} \
    --out mem 2>&1 | tee "$OUT/memory.log" | grep -v "it/s\]" | tail -6 | tee -a "$OUT/report.txt"
  python3 - "$OUT/memory.json" <<'PY'
import json, pathlib, sys
runs = {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(pathlib.Path("mem").iterdir())
        if (d / "summary.json").exists()}
keep = ("method", "parallelism", "processes", "wall_s", "peak_mem_gib", "memory_estimate_per_process_gib",
        "compile", "loss_impl", "first_step_s", "mean_tokens_per_s", "val_ppl")
pathlib.Path(sys.argv[1]).write_text(json.dumps({k: {f: v.get(f) for f in keep} for k, v in runs.items()}, indent=2))
PY
fi

if [ -z "$TOKENS" ] && [[ " $SECTIONS " == *" trainer "* || " $SECTIONS " == *" fsdp2 "* ]]; then
  python3 -m dlr.cli.prepare data=c4_sample out=c4tok > /dev/null 2>&1 && TOKENS=$PWD/c4tok
fi
DATA="data=tokens data.path=$TOKENS"

if want fsdp2 70; then
  stamp fsdp2
  # The trainer section's llama_60m default run (method dlr), here sharded by FSDP2 over nccl.
  timeout $(( $(left) - 5 )) python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m dlr.cli.train \
    model=llama_60m $DATA method=dlr steps=16 $COMMON parallelism=fsdp2 out_dir=trainer/llama_60m-fsdp2 \
    > fsdp2.log 2>&1 || tail -20 fsdp2.log
  grep -iE "nccl|fsdp|error" fsdp2.log | head -5 | tee -a "$OUT/report.txt"
  ls trainer/llama_60m-fsdp2 trainer/llama_60m-fsdp2/folded 2>&1 | tee -a "$OUT/report.txt"
fi

BENCH="python3 -m benchmarks.bench_train --device cuda --dtype bf16 --micro-batch 0"
if want small 120; then
  stamp small
  timeout $(( $(left) - 5 )) $BENCH --sizes "${SMALL_SIZES:-llama_60m,llama_130m}" --methods full,lowrank,dlr --compile --loss chunked \
    --repeats 10 --warmup 3 --json "$OUT/step_default_small.json" 2>&1 | grep -v "^llama.*done" | tee -a "$OUT/report.txt"
  stamp small-eager
  timeout $(( $(left) - 5 )) $BENCH --sizes "${SMALL_SIZES:-llama_60m,llama_130m}" --methods full,lowrank,dlr --loss plain \
    --repeats 10 --warmup 3 --json "$OUT/step_eager_small.json" 2>&1 | grep -v "^llama.*done" | tee -a "$OUT/report.txt"
fi

if want loss 90; then
  stamp loss-alone
  timeout 60 python3 -m benchmarks.bench_loss --device cuda --hidden 512,1024 --impls chunked_compiled,liger \
    --json "$OUT/loss_alone.json" 2>&1 | tail -6 | tee -a "$OUT/report.txt"
  stamp loss
  timeout $(( $(left) - 5 )) $BENCH --sizes llama_60m --methods full,lowrank --compile --loss liger \
    --repeats 10 --warmup 3 --json "$OUT/step_liger_60m.json" 2>&1 | grep -v "^llama.*done" | tee -a "$OUT/report.txt"
fi

if want trainer 90; then
  for size in llama_60m llama_130m; do
    for variant in default eager; do
      extra=""; [ $variant = eager ] && extra="compile=false loss=plain"
      [ "$(left)" -gt 25 ] || { echo "skipped trainer $size $variant" >> "$OUT/report.txt"; continue; }
      stamp "trainer $size $variant"
      timeout $(( $(left) - 5 )) $TRAIN model=$size $DATA method=dlr steps=16 $COMMON $extra \
        out_dir=trainer/$size-$variant > trainer-$size-$variant.log 2>&1 || tail -5 trainer-$size-$variant.log
    done
  done
fi
if [ -d trainer ]; then
  python3 - "$OUT/trainer.json" <<'PY' | tee -a "$OUT/report.txt"
import json, pathlib, sys
runs = {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(pathlib.Path("trainer").iterdir())
        if (d / "summary.json").exists()}
for d in pathlib.Path("trainer").iterdir():
    m = d / "metrics.jsonl"
    if d.name in runs and m.exists():
        runs[d.name]["train_losses"] = [r["loss"] for r in map(json.loads, m.read_text().splitlines()) if "loss" in r]
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=2))
for name, r in runs.items():
    print(f"{name}: {r['mean_tokens_per_s'] or 0:,.0f} tokens/s, first step {r['first_step_s']:.1f} s, "
          f"peak {r['peak_mem_gib']:.2f} GiB, loss {r['loss_impl']}, {r['parallelism']}, val ppl {r['val_ppl']:.2f}, "
          f"losses {[round(x, 4) for x in r.get('train_losses', [])]}")
PY
fi

if want gemm 40; then
  stamp gemm
  timeout $(( $(left) - 5 )) python3 -m benchmarks.bench_gemm --device cuda --sizes llama_350m --methods full,lowrank \
    --split-k 8 --json "$OUT/gemm_350m.json" 2>&1 | tail -6 | tee -a "$OUT/report.txt"
fi

if want large 100; then
  stamp large
  timeout $(( $(left) - 5 )) $BENCH --sizes "${LARGE_SIZES:-llama_350m,llama_1b}" --methods "${LARGE_METHODS:-full,lowrank}" --compile --loss chunked \
    --repeats 6 --warmup 2 --profile "$OUT/profile_large.txt" --json "$OUT/step_default_large.json" 2>&1 \
    | grep -v "^llama.*done" | tee -a "$OUT/report.txt"
fi

if want scopes 150; then
  stamp scopes
  timeout $(( $(left) - 5 )) $BENCH --sizes llama_60m --methods lowrank --compile --loss liger --compile-scope layers \
    --repeats 8 --warmup 3 --profile "$OUT/profile_scopes.txt" --json "$OUT/step_scope_layers.json" 2>&1 \
    | grep -v "^llama.*done" | tee -a "$OUT/report.txt"
  timeout $(( $(left) - 5 )) $BENCH --sizes llama_60m --methods full,lowrank --compile --loss plain --compile-scope model \
    --repeats 8 --warmup 3 --profile "$OUT/profile_scopes.txt" --json "$OUT/step_scope_model.json" 2>&1 \
    | grep -v "^llama.*done" | tee -a "$OUT/report.txt"
fi

if want autotune 100; then
  stamp autotune
  timeout $(( $(left) - 5 )) $BENCH --sizes llama_350m --methods full,lowrank --compile --loss chunked \
    --compile-mode max-autotune-no-cudagraphs --repeats 6 --warmup 2 --json "$OUT/step_autotune_350m.json" 2>&1 \
    | grep -v "^llama.*done" | tee -a "$OUT/report.txt"
fi
stamp done
cd "$OUT" && if [ "$(ls | wc -l)" -gt 8 ]; then
  tar czf figures.tgz --exclude report.txt --exclude figures.tgz ./* && find . -type f ! -name report.txt ! -name figures.tgz -delete
fi
ls -la "$OUT"
