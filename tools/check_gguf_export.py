#!/usr/bin/env python3
"""Checks anetrain's GGUF export against the `gguf` package and HF transformers.

    anetrain convert --from MODEL --to out/hf                      # HF f32 (the reference)
    anetrain convert --from MODEL --to out/m-f32.gguf --dtype f32   # and f16, q8_0
    /work/venv/bin/python tools/check_gguf_export.py out/hf out/m-f32.gguf out/m-f16.gguf out/m-q8_0.gguf

For each GGUF: the `gguf` package reads it back (every tensor dequantizes, metadata and
tokenizer present); transformers loads it with `gguf_file=` and its logits on a fixed text are
compared with the logits of the HF directory (same weights as f32 safetensors). The tokenizer
transformers builds from the file must tokenize like the HF directory's tokenizer.json.
Exits non-zero when f32 logits differ by more than 1e-5 of their range or f16 by more than 1e-2.
"""

import os
import sys

import numpy as np
import torch
import gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Once upon a time, 12345 apples!"
BOUNDS = {"F32": 1e-5, "F16": 1e-2}


def main():
    hf_dir, files = sys.argv[1], sys.argv[2:]
    ref_tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = ref_tok(TEXT, add_special_tokens=False)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
    scale = float(np.abs(ref_logits).max())
    ok = True
    for path in files:
        r = gguf.GGUFReader(path)
        types = sorted({t.tensor_type.name for t in r.tensors})
        for t in r.tensors:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.isfinite(x).all(), f"{path}: {t.name} has non-finite values"
        arch = r.fields["general.architecture"].contents()
        n_tokens = len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else 0
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        same_ids = tok(TEXT, add_special_tokens=False)["input_ids"] == ids
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        diff = float(np.abs(logits - ref_logits).max()) / scale
        same_argmax = bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())
        kind = "Q8_0" if "Q8_0" in types else ("F16" if "F16" in types else "F32")
        bound = BOUNDS.get(kind)
        verdict = "ok" if bound is None or diff <= bound else "FAIL"
        ok &= verdict == "ok" and same_ids
        print(
            f"{os.path.basename(path)}: gguf reads {len(r.tensors)} tensors ({', '.join(types)}), arch {arch}, "
            f"{n_tokens} tokens; transformers tokenizer {'matches' if same_ids else 'DIFFERS'}; "
            f"logits max |diff| / max |logit| = {diff:.2e} (bound {bound}), argmax {'same' if same_argmax else 'differs'}: {verdict}"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
