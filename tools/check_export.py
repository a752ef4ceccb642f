#!/usr/bin/env python3
"""Check that an HF directory written by `anetrain convert` loads in transformers and computes
what anetrain computes: the mean cross-entropy over the same consecutive windows as
`anetrain eval` (window i reads tokens [i*T, i*T+T] of a flat u16 token file and predicts the
last T).

    anetrain convert --from ../shared/data/models/stories260K.bin --to /tmp/s260hf
    anetrain eval --model /tmp/s260hf --data tokens.bin --seq 128 --json
    python3 tools/check_export.py --model /tmp/s260hf --data tokens.bin --seq 128

Needs torch and transformers (tools/requirements-bench.txt); never needed to build or test.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batches", type=int, default=0, help="first N windows only (0 = all)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokens = np.fromfile(args.data, dtype="<u2").astype(np.int64)
    t = args.seq
    windows = (len(tokens) - 1) // t
    if args.batches:
        windows = min(windows, args.batches)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = torch.from_numpy(tokens[w * t: w * t + t + 1])
            logits = model(input_ids=chunk[None, :t]).logits[0]
            total += F.cross_entropy(logits.double(), chunk[1:], reduction="sum").item()
            count += t
    print(json.dumps({"windows": windows, "tokens": count, "loss": total / count}))


if __name__ == "__main__":
    main()
