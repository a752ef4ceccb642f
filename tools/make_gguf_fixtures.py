#!/usr/bin/env python3
"""Golden fixtures for the GGUF reader (tests/gguf.rs).

1. tests/fixtures/gguf/dequant_<TYPE>.gguf: one small file per ggml type, written with the
   `gguf` package's GGUFWriter. Tensor "q" holds random blocks of that type (random bits, with
   finite f16 scales), tensor "ref" the `gguf` package's own dequantization of them as F32.
2. tests/fixtures/gguf_smollm2.json: reference values from HF transformers for the shared
   SmolLM2-135M-Instruct Q4_1 GGUF (loaded with `gguf_file=`): token ids of a few strings from
   the tokenizer HF builds out of the file's metadata, the mean next-token loss over one text
   window, and a greedy continuation.
3. tests/fixtures/gguf/llama3_rope.gguf (+ llama3_rope.safetensors, llama3_rope.json): a tiny
   random Llama with Llama 3 RoPE scaling, written the way llama.cpp's converter writes such
   models (q/k rows in Meta's interleaved order, the scaling as a `rope_freqs.weight` tensor of
   per-frequency divisors, no rope.scaling.* metadata), and HF transformers' logits for the
   same weights and HF config.

4. tests/fixtures/gguf/linear_rope.gguf (+ linear_rope.safetensors, linear_rope.json): a tiny
   random Llama with linear RoPE scaling, as llama.cpp's converter writes it
   (`llama.rope.scaling.type` = "linear", `llama.rope.scaling.factor`), and HF transformers'
   logits for the same weights and HF config (`rope_type: linear`).

Run with the project venv: /work/venv/bin/python tools/make_gguf_fixtures.py
(--skip-model to skip 2., which needs ../shared; --only PART to write only some of
dequant, llama3_rope, linear_rope, model).
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


# The tiny Llama 3 model of 3.: with D=32 and theta 1e4 the wavelengths are 2*pi*10^(i/4),
# i < 16 (6.3, 11, 20, 35, 63, 112, ...). original_max_position_embeddings 64 with low/high
# factors 1/4 keeps the first two (< 16), interpolates the next three (16..64: three entries
# pin down the band) and slows the other eleven by 8; T=32 makes all of them move the logits.
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
LLAMA3_KW = dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=96, max_position_embeddings=256,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 attention_bias=False, mlp_bias=False, hidden_act="silu")


def rope_divisors(theta, d, rope):
    """llama.cpp's `rope_freqs.weight` for Llama 3 scaling: per frequency, the number its
    converter divides the frequency by (1 for short wavelengths, `factor` for long ones, the
    reciprocal of the interpolation weight between), in its f32 torch arithmetic."""
    import math
    import torch

    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    orig = rope["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def meta_order(w, heads):
    """HF's rotate-half q/k rows -> Meta's interleaved order (what llama.cpp stores)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_fixture(seed=1205):
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    kw, rope = LLAMA3_KW, LLAMA3_ROPE
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = LlamaConfig(**kw, rope_parameters=dict(rope, rope_theta=kw["rope_theta"]))
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    assert model.config.rope_parameters["rope_type"] == "llama3", model.config.rope_parameters
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(0.1 * noise if p.dim() >= 2 else 1.0 + 0.1 * noise)
    B, T, V = 2, 32, kw["vocab_size"]
    tokens = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.contiguous()
        # The scaling must change the logits well beyond the test's tolerance.
        plain = LlamaConfig(**kw)
        plain._attn_implementation = "eager"
        other = LlamaForCausalLM(plain).to(torch.float32).eval()
        other.load_state_dict(model.state_dict())
        gap = (other(input_ids=tokens).logits - logits).abs().max().item()
    assert gap > 1e-2 * logits.abs().max().item(), gap

    theta, d, H, KV = kw["rope_theta"], kw["head_dim"], kw["num_attention_heads"], kw["num_key_value_heads"]
    divisors = rope_divisors(theta, d, rope)
    path = os.path.join(OUT, "gguf", "llama3_rope.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("llama3-rope-tiny")
    w.add_context_length(kw["max_position_embeddings"])
    w.add_embedding_length(kw["hidden_size"])
    w.add_block_count(kw["num_hidden_layers"])
    w.add_feed_forward_length(kw["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(kw["rms_norm_eps"])
    w.add_vocab_size(V)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("rope_freqs.weight", divisors.numpy())
    for i in range(kw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for g, h in [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"),
                     ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                     ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            t = sd[p + h + ".weight"]
            if g == "attn_q":
                t = meta_order(t, H)
            elif g == "attn_k":
                t = meta_order(t, KV)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file({"tokens": tokens.contiguous(), "logits": logits},
              os.path.join(OUT, "gguf", "llama3_rope.safetensors"))
    meta = {
        "source": "tools/make_gguf_fixtures.py: HF transformers LlamaForCausalLM, eager attention",
        "batch": B,
        "seq": T,
        "rope_theta": theta,
        "rope_scaling": rope,
        "rope_freqs": divisors.tolist(),
        "logit_gap_without_scaling": gap,
    }
    with open(os.path.join(OUT, "gguf", "llama3_rope.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{path}: {os.path.getsize(path)} bytes; rope_freqs {divisors.tolist()}; "
          f"logits move by {gap:.3f} without the scaling")


# The tiny model of 4.: linear scaling by 2.5 (not a power of two, so the f32 division
# rounds), GQA 2/1, D=16, untied; T=24.
LINEAR_ROPE = dict(rope_type="linear", factor=2.5)
LINEAR_KW = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, vocab_size=80, max_position_embeddings=128,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 attention_bias=False, mlp_bias=False, hidden_act="silu")


def linear_rope_fixture(seed=1206):
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    kw, rope = LINEAR_KW, LINEAR_ROPE
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = LlamaConfig(**kw, rope_parameters=dict(rope, rope_theta=kw["rope_theta"]))
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    assert model.config.rope_parameters["rope_type"] == "linear", model.config.rope_parameters
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(0.1 * noise if p.dim() >= 2 else 1.0 + 0.1 * noise)
    B, T, V = 2, 24, kw["vocab_size"]
    tokens = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.contiguous()
        plain = LlamaConfig(**kw)
        plain._attn_implementation = "eager"
        other = LlamaForCausalLM(plain).to(torch.float32).eval()
        other.load_state_dict(model.state_dict())
        gap = (other(input_ids=tokens).logits - logits).abs().max().item()
    assert gap > 1e-2 * logits.abs().max().item(), gap

    H, KV = kw["num_attention_heads"], kw["num_key_value_heads"]
    path = os.path.join(OUT, "gguf", "linear_rope.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("linear-rope-tiny")
    w.add_context_length(kw["max_position_embeddings"])
    w.add_embedding_length(kw["hidden_size"])
    w.add_block_count(kw["num_hidden_layers"])
    w.add_feed_forward_length(kw["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(kw["head_dim"])
    w.add_rope_freq_base(kw["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_layer_norm_rms_eps(kw["rms_norm_eps"])
    w.add_vocab_size(V)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(kw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for g, h in [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"),
                     ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                     ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            t = sd[p + h + ".weight"]
            if g == "attn_q":
                t = meta_order(t, H)
            elif g == "attn_k":
                t = meta_order(t, KV)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Read back with the package's reader: the scaling is where llama.cpp looks for it.
    r = gguf.GGUFReader(path)
    assert bytes(r.fields["llama.rope.scaling.type"].parts[-1]).decode() == "linear"
    assert float(r.fields["llama.rope.scaling.factor"].parts[-1][0]) == rope["factor"]
    save_file({"tokens": tokens.contiguous(), "logits": logits},
              os.path.join(OUT, "gguf", "linear_rope.safetensors"))
    meta = {
        "source": "tools/make_gguf_fixtures.py: HF transformers LlamaForCausalLM, eager attention",
        "batch": B,
        "seq": T,
        "rope_theta": kw["rope_theta"],
        "rope_scaling": rope,
        "logit_gap_without_scaling": gap,
    }
    with open(os.path.join(OUT, "gguf", "linear_rope.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{path}: {os.path.getsize(path)} bytes; logits move by {gap:.3f} without the scaling")


PARTS = ["dequant", "llama3_rope", "linear_rope", "model"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="write only these fixtures (repeatable); default: all")
    args = ap.parse_args()
    parts = set(args.only or PARTS)
    if args.skip_model:
        parts.discard("model")
    if "dequant" in parts:
        dequant_files(np.random.default_rng(20261204))
    if "llama3_rope" in parts:
        llama3_rope_fixture()
    if "linear_rope" in parts:
        linear_rope_fixture()
    if "model" in parts:
        model_fixture()


if __name__ == "__main__":
    main()
