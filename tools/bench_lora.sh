#!/usr/bin/env bash
# LoRA benchmark, alternating back to back (docs/BENCHMARKS.md "LoRA"): anetrain LoRA,
# anetrain full fine-tuning and PyTorch + PEFT LoRA on the same model shape and batch,
# ROUNDS times in turn, each run a fresh process. Prints one line per run; take medians.
#
#   tools/bench_lora.sh [ROUNDS=2] [MODEL=smollm2-135m] [B=4] [T=256] [RANK=16] [STEPS=3]
#
# anetrain LoRA runs twice per round: f32 (the default) and --base-dtype bf16 --bf16-matmul
# (bf16 GEMMs on AVX-512 BF16); PyTorch + PEFT likewise in f32 and, when tools/bench_pytorch.py
# has --bf16, under bf16 autocast. Compare f32 with f32 and bf16 with bf16.
#
# Then, once, the memory of Qwen3-0.6B LoRA r=RANK at B=1, T=256 with the frozen base in f32
# and in bf16 (--base-dtype bf16): peak RSS is what counts there (target <= 3 GB).
# About 4-5 minutes on a quiet 2-core machine A.
#
# Needs a release build (cargo build --release) and a Python with torch, transformers and
# peft (PYTHON, default /work/venv/bin/python). Random init (timing and memory only: the
# presets have the published shapes; weights do not change the cost).
set -euo pipefail
ROUNDS=${1:-2}; MODEL=${2:-smollm2-135m}; B=${3:-4}; T=${4:-256}; RANK=${5:-16}; STEPS=${6:-3}
PYTHON=${PYTHON:-/work/venv/bin/python}
BIN=${BIN:-target/release/anetrain}
THREADS=${THREADS:-2}
run_anetrain() {
    local label=$1; shift
    local out
    # STEPS + 1 updates: the first is a warm-up that the reported median leaves out, as
    # bench_pytorch.py's --warmup 1 does on the PyTorch side.
    out=$("$BIN" train --model "$MODEL" --data synthetic --batch "$B" --seq "$T" --steps "$((STEPS + 1))" \
        --warmup 0 --eval-every 0 --no-peak --threads "$THREADS" --print-every 1000 "$@")
    local micro rss
    micro=$(grep -o 'median micro-step *[0-9.]* ms' <<<"$out" | grep -o '[0-9.]* ms' | cut -d' ' -f1)
    rss=$(grep -o 'peak RSS *[0-9]* MB' <<<"$out" | grep -o '[0-9]* MB' | cut -d' ' -f1)
    echo "$label median_micro_ms=$micro tokens_per_s=$(awk "BEGIN{printf \"%.1f\", $B*$T/($micro/1000)}") peak_rss_mb=$rss"
}
run_torch() {
    local json
    json=$("$PYTHON" tools/bench_pytorch.py --model "$MODEL" --batch "$B" --seq "$T" --accum 1 \
        --steps "$STEPS" --warmup 1 --min-timed "$STEPS" --threads "$THREADS" --lora-rank "$RANK" --json 2>/dev/null)
    "$PYTHON" -c 'import json,sys; r=json.loads(sys.argv[1]); print("torch+peft median_micro_ms=%.1f tokens_per_s=%.1f peak_rss_mb=%.0f" % (r["micro_step_ms_median"], r["tokens_per_s"], r["peak_rss_mb"]))' "$json"
}
run_torch_bf16() {
    local json
    json=$("$PYTHON" tools/bench_pytorch.py --model "$MODEL" --batch "$B" --seq "$T" --accum 1 \
        --steps "$STEPS" --warmup 1 --min-timed "$STEPS" --threads "$THREADS" --lora-rank "$RANK" --bf16 --json 2>/dev/null) \
        || { echo "torch+peft-bf16 (bench_pytorch.py has no --bf16 here: not measured)"; return; }
    "$PYTHON" -c 'import json,sys; r=json.loads(sys.argv[1]); print("torch+peft-bf16 median_micro_ms=%.1f tokens_per_s=%.1f peak_rss_mb=%.0f" % (r["micro_step_ms_median"], r["tokens_per_s"], r["peak_rss_mb"]))' "$json"
}
for round in $(seq 1 "$ROUNDS"); do
    echo "# round $round"
    run_anetrain "anetrain-lora" --lora-rank "$RANK"
    run_anetrain "anetrain-lora-bf16-matmul" --lora-rank "$RANK" --base-dtype bf16 --bf16-matmul
    run_torch
    run_torch_bf16
    run_anetrain "anetrain-full"
done
echo "# memory: qwen3-0.6b LoRA r=$RANK, B=1, T=256, 1 update"
MODEL=qwen3-0.6b B=1 T=256 STEPS=1 run_anetrain "qwen3-lora-f32-base" --lora-rank "$RANK"
MODEL=qwen3-0.6b B=1 T=256 STEPS=1 run_anetrain "qwen3-lora-bf16-base" --lora-rank "$RANK" --base-dtype bf16
