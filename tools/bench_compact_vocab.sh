#!/usr/bin/env bash
# Classifier cost with and without --compact-vocab at Qwen3-0.6B's vocabulary (151,936 x 1024,
# tied), on the cpu and mil-sim backends. The model is Qwen3-0.6B's published shape cut to ONE
# layer, so that the classifier (and AdamW over the embedding) dominates an update; the data is
# the Austen corpus tokenized with the Qwen3 tokenizer (its distinct ids are the subset).
# Alternates the four configurations, ROUNDS rounds; prints the median forward+backward and
# optimizer ms per update (updates 2..STEPS; the first warms up). ~3-5 minutes on 2 cores.
# Usage: tools/bench_compact_vocab.sh [ROUNDS]   (from the repository root, after cargo build --release)
set -euo pipefail
ROUNDS=${1:-3}
STEPS=4
BIN=target/release/anetrain
SHARED=${SHARED:-../shared/data}
W=$(mktemp -d /tmp/bench-compact-XXXXXX)
trap 'rm -rf "$W"' EXIT
python3 - "$SHARED/models/qwen3-0.6b.config.json" "$W/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["num_hidden_layers"] = 1
json.dump(c, open(sys.argv[2], "w"))
PY
cat "$SHARED"/corpora/austen/* > "$W/austen.txt"
run() { # backend compact(0/1) log
  local extra=()
  [ "$2" = 1 ] && extra=(--compact-vocab)
  "$BIN" train --model "$W/config.json" --data "$W/austen.txt" --tokenizer "$SHARED/tokenizers/qwen3/tokenizer.json" \
    --backend "$1" --steps $STEPS --batch 1 --seq 64 --eval-every 0 --no-peak --threads 2 --sample-tokens 0 \
    --log "$3" "${extra[@]}" | grep -E 'compact vocabulary' || true
}
for r in $(seq "$ROUNDS"); do
  for b in cpu mil-sim; do
    for c in 0 1; do run "$b" "$c" "$W/$b-$c-$r.jsonl"; done
  done
done
python3 - "$W" "$ROUNDS" <<'PY'
import json, statistics, sys, glob
w, rounds = sys.argv[1], int(sys.argv[2])
print(f"{'backend':8} {'compact':8} {'fwd+bwd ms':>11} {'optimizer ms':>13} {'update ms':>10}")
for b in ["cpu", "mil-sim"]:
    for c in ["0", "1"]:
        fb, opt, tot = [], [], []
        for r in range(1, rounds + 1):
            for line in open(f"{w}/{b}-{c}-{r}.jsonl"):
                u = json.loads(line)
                if u.get("type") == "update" and u["step"] >= 2:
                    fb.append(u["ms_forward"] + u["ms_backward"]); opt.append(u["ms_optimizer"]); tot.append(u["ms_step"])
        m = statistics.median
        print(f"{b:8} {'on' if c == '1' else 'off':8} {m(fb):11.1f} {m(opt):13.1f} {m(tot):10.1f}")
PY
