#!/usr/bin/env bash
# Decoding speed (issue 11): anetrain f32 vs llama2.c run.c on Stories15M and Stories110M,
# anetrain q8_0 vs llama2.c runq.c on Stories110M, prefill tokens/s, and SmolLM2-135M decode
# tokens/s for f32, q8_0 and its own Q4_1 (--quant gguf). 2 threads, greedy, the runs of
# each comparison alternating back to back; prints every run and the medians.
#
# Usage: tools/bench_decode.sh [ROUNDS]   (default 3 rounds; about 4 minutes on an idle
# 2-core machine). Needs a release build (cargo build --release) and:
#   LLAMA2C=/work/llama2c   run and runq built there (gcc -Ofast -march=native -fopenmp)
#   WORK=/tmp/quant         stories15m.bin, stories110m.bin (llama2.c v0, from anetrain
#                           convert), s110q.bin (runq's version-2 Q8_0 export of the same
#                           110M weights: llama2.c's export.py --version 2 --hf <anetrain HF
#                           export>) -- see docs/BENCHMARKS.md §14 for the commands
#   SHARED=../shared/data   the Llama 2 tokenizer.bin and the SmolLM2 GGUF
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
LLAMA2C=${LLAMA2C:-/work/llama2c}
WORK=${WORK:-/tmp/quant}
SHARED=${SHARED:-../shared/data}
BIN=target/release/anetrain
TOK=$SHARED/tokenizers/llama2/tokenizer.bin
SMOL=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
export OMP_NUM_THREADS=2
for f in "$BIN" "$LLAMA2C/run" "$LLAMA2C/runq" "$WORK/stories15m.bin" "$WORK/stories110m.bin" "$WORK/s110q.bin" "$TOK" "$SMOL"; do
  [ -e "$f" ] || { echo "missing $f (see the header of $0)" >&2; exit 1; }
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# llama2.c prints "achieved tok/s: X" (over all positions after the first).
llama() { "$1" "$2" -z "$TOK" -t 0 -n 256 -i "Once" 2>&1 | sed -n 's/.*achieved tok\/s: \([0-9.]*\).*/\1/p'; }
# anetrain prints "prefill: N tokens in X ms (P tokens/s); decode: ... (D tokens/s)".
ours_decode() { "$BIN" generate --threads 2 --temperature 0 "$@" 2>&1 >/dev/null | sed -n 's/.*(\([0-9.]*\) tokens\/s)$/\1/p'; }
ours_prefill() { "$BIN" generate --threads 2 --temperature 0 "$@" 2>&1 >/dev/null | sed -n 's/.*ms (\([0-9.]*\) tokens\/s); decode.*/\1/p'; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
record() { echo "$2" >> "$OUT/$1"; printf '  %-22s %s\n' "$1" "$2"; }

IDS256="--ids 1,9038 --max-tokens 255"
PROMPT=$(seq -s, 1 200)
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  record run.c-15M "$(llama "$LLAMA2C/run" "$WORK/stories15m.bin")"
  record ours-f32-15M "$(ours_decode --model "$WORK/stories15m.bin" $IDS256)"
  record run.c-110M "$(llama "$LLAMA2C/run" "$WORK/stories110m.bin")"
  record ours-f32-110M "$(ours_decode --model "$WORK/stories110m.bin" $IDS256)"
  record runq.c-110M "$(llama "$LLAMA2C/runq" "$WORK/s110q.bin")"
  record ours-q8_0-110M "$(ours_decode --model "$WORK/stories110m.bin" $IDS256 --quant q8_0)"
  record prefill-f32-110M "$(ours_prefill --model "$WORK/stories110m.bin" --ids "$PROMPT" --max-tokens 1)"
  record prefill-q8_0-110M "$(ours_prefill --model "$WORK/stories110m.bin" --ids "$PROMPT" --max-tokens 1 --quant q8_0)"
  record smol-f32 "$(ours_decode --model "$SMOL" --ids 1,504 --max-tokens 128)"
  record smol-q8_0 "$(ours_decode --model "$SMOL" --ids 1,504 --max-tokens 128 --quant q8_0)"
  record smol-gguf-Q4_1 "$(ours_decode --model "$SMOL" --ids 1,504 --max-tokens 128 --quant gguf)"
done
echo
echo "medians of $ROUNDS alternating rounds (tokens/s, 2 threads):"
for k in run.c-15M ours-f32-15M run.c-110M ours-f32-110M runq.c-110M ours-q8_0-110M prefill-f32-110M prefill-q8_0-110M smol-f32 smol-q8_0 smol-gguf-Q4_1; do
  printf '  %-22s %s\n' "$k" "$(median < "$OUT/$k")"
done
m() { median < "$OUT/$1"; }
echo "ratios: f32/run.c 15M $(echo "$(m ours-f32-15M) / $(m run.c-15M)" | bc -l | cut -c1-5)," \
  "f32/run.c 110M $(echo "$(m ours-f32-110M) / $(m run.c-110M)" | bc -l | cut -c1-5)," \
  "q8_0/f32 110M $(echo "$(m ours-q8_0-110M) / $(m ours-f32-110M)" | bc -l | cut -c1-5)," \
  "q8_0/runq.c 110M $(echo "$(m ours-q8_0-110M) / $(m runq.c-110M)" | bc -l | cut -c1-5)"
