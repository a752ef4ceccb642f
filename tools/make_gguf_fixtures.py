#!/usr/bin/env python3
"""Golden fixtures for the GGUF reader (tests/gguf.rs).

1. tests/fixtures/gguf/dequant_<TYPE>.gguf: one small file per ggml type, written with the
   `gguf` package's GGUFWriter. Tensor "q" holds random blocks of that type (random bits, with
   finite f16 scales), tensor "ref" the `gguf` package's own dequantization of them as F32.
2. tests/fixtures/gguf_smollm2.json: reference values from HF transformers for the shared
   SmolLM2-135M-Instruct Q4_1 GGUF (loaded with `gguf_file=`): token ids of a few strings from
   the tokenizer HF builds out of the file's metadata, the mean next-token loss over one text
   window, and a greedy continuation.

Run with the project venv: /work/venv/bin/python tools/make_gguf_fixtures.py
(--skip-model to regenerate only the dequantization files).
"""

import argparse
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
GGUF_DIR = os.path.join(ROOT, "..", "shared", "data", "models", "smollm2-135m-instruct")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Byte offsets of the f16 scale fields inside one block, per type.
SCALES = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def dequant_files(rng):
    os.makedirs(os.path.join(OUT, "gguf"), exist_ok=True)
    rows = 2
    for ty in [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]:
        block_len, block_bytes = gguf.GGML_QUANT_SIZES[ty]
        cols = 256  # one K-quant super-block, eight 32-blocks
        n_blocks = rows * cols // block_len
        if ty == Q.F16:
            raw = rng.standard_normal(rows * cols).astype(np.float16).view(np.uint8)
        elif ty == Q.BF16:
            f = rng.standard_normal(rows * cols).astype(np.float32)
            raw = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
            for off in SCALES[ty]:
                scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
                raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
        raw = np.ascontiguousarray(raw).reshape(rows, cols // block_len * block_bytes)
        ref = gguf.quants.dequantize(raw, ty).astype(np.float32)
        assert ref.shape == (rows, cols), ref.shape
        assert np.isfinite(ref).all()
        path = os.path.join(OUT, "gguf", f"dequant_{ty.name}.gguf")
        w = gguf.GGUFWriter(path, "dequant-test")
        w.add_tensor("q", raw, raw_dtype=ty)
        w.add_tensor("ref", ref)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(f"{path}: {os.path.getsize(path)} bytes")


STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    "  two leading spaces, tabs\tand\nnewlines\n\n",
    "Numbers: 12345, 3.14159 and 1,000,000!",
    "Unicode: héllo wörld, 你好, 😀 ✓",
    "It's what they'd've done; we're 'quoted'.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # comment",
]

WINDOW_TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "went out every morning before sunrise. One day he caught a fish that could speak, and "
    "the fish promised him three wishes if he would let it go back into the water."
)

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def model_fixture():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.eval()
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in STRINGS]
    window = tok(WINDOW_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        x = torch.tensor([window])
        logits = model(x).logits[0, :-1].double()
        loss = torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()
        prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        greedy = out[0, len(prompt):].tolist()
    fixture = {
        "source": f"HF transformers loading {GGUF_FILE} with gguf_file= (tools/make_gguf_fixtures.py)",
        "strings": STRINGS,
        "ids": ids,
        "window_text": WINDOW_TEXT,
        "window_ids": window,
        "window_loss": loss,
        "prompt": PROMPT,
        "prompt_ids": prompt,
        "greedy": greedy,
        "greedy_text": tok.decode(greedy),
    }
    path = os.path.join(OUT, "gguf_smollm2.json")
    with open(path, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
    print(f"{path}: loss {loss:.6f} over {len(window) - 1} targets; greedy {tok.decode(greedy)!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    dequant_files(np.random.default_rng(20261204))
    if not args.skip_model:
        model_fixture()


if __name__ == "__main__":
    main()
