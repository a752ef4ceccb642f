#!/usr/bin/env python3
"""Checks that a LoRA adapter directory written by anetrain loads in HF PEFT and
computes what anetrain computes.

    python3 tools/check_peft_export.py --base BASE_HF_DIR --adapter ADAPTER_DIR \
        --merged MERGED_HF_DIR [--seq 32]

* ADAPTER_DIR: a LoRA checkpoint step directory of ``anetrain train --lora-rank``
  (it is a PEFT adapter directory: adapter_config.json + adapter_model.safetensors);
* BASE_HF_DIR: the base model the adapters were trained on (HF directory);
* MERGED_HF_DIR: ``anetrain convert --from BASE --merge-lora ADAPTER --to MERGED``.

``peft.PeftModel.from_pretrained(base, ADAPTER_DIR)`` (unmerged: PEFT adds
s*(x A^T) B^T beside each frozen projection) and transformers on MERGED_HF_DIR
(anetrain's W + s*B*A) run on the same random tokens; the script prints the
largest logit difference relative to the largest logit and fails above 1e-5.
Every adapter tensor must be non-zero in B somewhere (a trained adapter), so an
export that silently dropped the adapters cannot pass.  Nothing is downloaded.
"""

import argparse
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()


def load(d):
    m = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    m.eval()
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--merged", required=True)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    torch.manual_seed(0)
    adapters = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    b_max = max(float(t.abs().max()) for k, t in adapters.items() if "lora_B" in k)
    assert b_max > 0, "every lora_B is zero: these adapters were never trained"
    base = load(args.base)
    vocab = base.config.vocab_size
    tokens = torch.randint(0, vocab, (2, args.seq))
    with torch.no_grad():
        plain = base(input_ids=tokens).logits
    peft_model = peft.PeftModel.from_pretrained(base, args.adapter)
    peft_model.eval()
    merged = load(args.merged)
    with torch.no_grad():
        via_peft = peft_model(input_ids=tokens).logits
        via_merge = merged(input_ids=tokens).logits
    scale = float(via_peft.abs().max())
    err = float((via_peft - via_merge).abs().max()) / scale
    moved = float((via_peft - plain).abs().max()) / scale
    print(f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{len(adapters)} adapter tensors, max |lora_B| {b_max:.4g}")
    print(f"adapters change the logits by up to {moved:.3e} of max |logit| {scale:.4g}")
    print(f"PEFT(base, adapter) vs anetrain's merged model: max difference {err:.3e} of max |logit|")
    if moved <= 10 * args.tol:
        sys.exit("the adapters barely change the model: this check would not notice a wrong export")
    if err > args.tol:
        sys.exit(f"FAIL: difference {err:.3e} > {args.tol}")
    print("OK")


if __name__ == "__main__":
    main()
