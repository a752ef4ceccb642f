#!/usr/bin/env python3
"""Golden token ids for the tokenizer tests (tests/fixtures/tokenizer_golden.json).

    pip install sentencepiece tokenizers      # sentencepiece 0.2.3, tokenizers 0.23.3 were used
    python3 tools/make_tokenizer_goldens.py

Reads ../shared/data/tokenizers/{llama2/tokenizer.model, qwen3/tokenizer.json} and encodes a
fixed list of strings (unicode, digits, leading spaces, byte fallback) with the reference
libraries: sentencepiece for Llama 2 (no BOS), HF tokenizers for Qwen3 (no special tokens).
Never needed to build or test.
"""
import json
import os

import sentencepiece as spm
from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
SHARED = os.path.join(ROOT, "..", "shared", "data", "tokenizers")
STRINGS = [
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    " leading space",
    "   three leading spaces and trailing  ",
    "digits 1234567890 and 3.14159",
    "unicode: héllo wörld — naïve café ✓",
    "emoji 🙂🚀 and CJK 你好，世界",
    "byte fallback: \u0001\u0002 \u2028 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "newlines\nand\ttabs",
    "",
]


def main():
    sp = spm.SentencePieceProcessor(model_file=os.path.join(SHARED, "llama2", "tokenizer.model"))
    qwen = Tokenizer.from_file(os.path.join(SHARED, "qwen3", "tokenizer.json"))
    golden = {
        "strings": STRINGS,
        "llama2": [sp.encode(s) for s in STRINGS],
        "qwen3": [qwen.encode(s, add_special_tokens=False).ids for s in STRINGS],
    }
    out = os.path.join(ROOT, "tests", "fixtures", "tokenizer_golden.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
