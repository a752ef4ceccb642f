#!/usr/bin/env python3
"""PyTorch CPU baseline for anetrain: time one training micro-step of a
Llama-family model in eager fp32 on the CPU.

What is measured
----------------
* micro-step: forward + cross-entropy loss (scaled by 1/K) + backward of one
  B x T micro-batch, gradients accumulated over K micro-steps;
* optimizer step: AdamW ``step()`` + ``zero_grad(set_to_none=True)`` once per
  K micro-steps.

Sequence: ``--warmup`` micro-steps (discarded) and one discarded optimizer step
(which allocates the AdamW state), then ``--steps`` optimizer updates of
``--accum`` micro-steps each, all timed.  If steps*accum < ``--min-timed``
(default 10), steps is raised so that at least that many micro-steps are timed.

Reported: median ms per micro-step, median ms per optimizer step, tokens/s
(B*T / median micro-step seconds), achieved GFLOP/s using training FLOPs per
token = 6*N_matmul + 6*L*H*Dh*T (N_matmul = every linear weight incl. the
V x C classifier, no norms/embedding lookup; attention score/value matmuls
counted for the causal half: 12*L*H*Dh*T/2), peak RSS in MB (ru_maxrss), the
torch/transformers versions and thread count.

Model: transformers' LlamaForCausalLM (Qwen3ForCausalLM for qwen3-0.6b) built
from a config with random init; nothing is ever downloaded (HF_HUB_OFFLINE=1 is
forced).  If transformers cannot be imported (or ``--impl native``), a small
hand-written equivalent module in this file is used instead.  Token ids come
from a seeded torch.Generator; inputs are tokens[:, :T], targets tokens[:, 1:].
Weight decay is applied to the >=2-D weights only (not to RMSNorm gains), as in
llama2.c / nanoGPT.  Attention uses ``--attn sdpa`` (HF default,
F.scaled_dot_product_attention with a causal mask) unless ``--attn eager``.

Install (what worked on the project's x86_64 Debian machine, CPython 3.11.7,
pip 23.2.1, PyPI only):

    pip install torch          # torch 2.15.0 (+cu132 build; runs on CPU)
    pip install transformers   # transformers 5.24.0 (+ its deps)

The PyPI torch wheel for Linux x86_64 is CUDA-enabled and pulls ~5 GB of
nvidia-*/cuda-* wheels (about 45 s to install here).  The lighter route
``pip install --no-deps torch`` + filelock typing-extensions setuptools sympy
networkx jinja2 fsspec numpy does NOT work: ``import torch`` fails with
"libcudart.so.13: cannot open shared object file" (libtorch links the CUDA
runtime), so the plain install is needed.  See tools/requirements-bench.txt.

LoRA (``--lora-rank R``, needs ``pip install peft``; peft 0.21.2 was used): HF
PEFT's ``get_peft_model`` with ``--lora-targets`` (default all seven projections),
alpha = ``--lora-alpha`` (default 2R), dropout 0; AdamW over the adapters only
(the base is frozen by PEFT).  The model counts and FLOPs printed are the base's.

Examples:

    python3 tools/bench_pytorch.py                      # Stories110M, B=1 T=256 K=10
    python3 tools/bench_pytorch.py --model stories15m --seq 64 --accum 2 --steps 2
    python3 tools/bench_pytorch.py --json --threads 2
    python3 tools/bench_pytorch.py --model smollm2-135m --batch 4 --seq 256 --accum 1 --lora-rank 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

# Never touch the network: no hub downloads, no telemetry.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# --------------------------------------------------------------------------
# Model presets
# --------------------------------------------------------------------------

PRESETS = {
    # llama2.c TinyStories models
    "stories15m": dict(arch="llama", dim=288, hidden=768, layers=6, heads=6,
                       kv_heads=6, vocab=32000, head_dim=None, theta=10000.0,
                       eps=1e-5, qk_norm=False, tied=True),
    "stories42m": dict(arch="llama", dim=512, hidden=1376, layers=8, heads=8,
                       kv_heads=8, vocab=32000, head_dim=None, theta=10000.0,
                       eps=1e-5, qk_norm=False, tied=True),
    "stories110m": dict(arch="llama", dim=768, hidden=2048, layers=12, heads=12,
                        kv_heads=12, vocab=32000, head_dim=None, theta=10000.0,
                        eps=1e-5, qk_norm=False, tied=True),
    # SmolLM2-135M shape (random init; Llama architecture)
    "smollm2-135m": dict(arch="llama", dim=576, hidden=1536, layers=30, heads=9,
                         kv_heads=3, vocab=49152, head_dim=64, theta=1e5,
                         eps=1e-5, qk_norm=False, tied=True),
    # Qwen3-0.6B shape (random init)
    "qwen3-0.6b": dict(arch="qwen3", dim=1024, hidden=3072, layers=28, heads=16,
                       kv_heads=8, vocab=151936, head_dim=128, theta=1e6,
                       eps=1e-6, qk_norm=True, tied=True),
}


def head_dim_of(p):
    return p["head_dim"] if p["head_dim"] else p["dim"] // p["heads"]


def matmul_params(p):
    """All linear weight parameters, incl. the classifier V*C; no norms."""
    d, f, hd = p["dim"], p["hidden"], head_dim_of(p)
    q = d * p["heads"] * hd
    kv = 2 * d * p["kv_heads"] * hd
    o = p["heads"] * hd * d
    mlp = 3 * d * f
    return p["layers"] * (q + kv + o + mlp) + p["vocab"] * d


def train_flops_per_token(p, seq):
    """6*N_matmul + 6*L*H*Dh*T  (attention QK^T and PV, causal half)."""
    return 6 * matmul_params(p) + 6 * p["layers"] * p["heads"] * head_dim_of(p) * seq


# --------------------------------------------------------------------------
# transformers-based model
# --------------------------------------------------------------------------

def build_hf(p, seq, attn):
    import inspect

    import transformers

    if p["arch"] == "qwen3":
        from transformers import Qwen3Config as Cfg
        from transformers import Qwen3ForCausalLM as Model
    else:
        from transformers import LlamaConfig as Cfg
        from transformers import LlamaForCausalLM as Model

    kw = dict(
        vocab_size=p["vocab"],
        hidden_size=p["dim"],
        intermediate_size=p["hidden"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=head_dim_of(p),
        hidden_act="silu",
        max_position_embeddings=max(seq, 2048 if p["arch"] == "llama" else 32768),
        rms_norm_eps=p["eps"],
        tie_word_embeddings=p["tied"],
        attention_bias=False,
        attention_dropout=0.0,
        use_cache=False,
    )
    if p["arch"] == "llama":
        kw["mlp_bias"] = False
    params = inspect.signature(Cfg.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": p["theta"]}
    else:  # transformers 4.x
        kw["rope_theta"] = p["theta"]
    cfg = Cfg(**kw)
    try:
        model = Model._from_config(cfg, attn_implementation=attn)
    except TypeError:
        cfg._attn_implementation = attn
        model = Model(cfg)
    model = model.float()
    name = f"transformers {transformers.__version__} {Model.__name__} (attn={attn})"
    return model, name, transformers.__version__


# --------------------------------------------------------------------------
# Hand-written fallback (same math: RMSNorm, RoPE, GQA, SwiGLU, tied head)
# --------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(seq, hd, theta):
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    emb = torch.cat([ang, ang], dim=-1)  # HF "rotate_half" layout
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class Block(nn.Module):
    def __init__(self, p):
        super().__init__()
        d, hd = p["dim"], head_dim_of(p)
        self.h, self.kv, self.hd = p["heads"], p["kv_heads"], hd
        self.attn_norm = RMSNorm(d, p["eps"])
        self.wq = nn.Linear(d, self.h * hd, bias=False)
        self.wk = nn.Linear(d, self.kv * hd, bias=False)
        self.wv = nn.Linear(d, self.kv * hd, bias=False)
        self.wo = nn.Linear(self.h * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, p["eps"]) if p["qk_norm"] else None
        self.k_norm = RMSNorm(hd, p["eps"]) if p["qk_norm"] else None
        self.ffn_norm = RMSNorm(d, p["eps"])
        self.w1 = nn.Linear(d, p["hidden"], bias=False)
        self.w3 = nn.Linear(d, p["hidden"], bias=False)
        self.w2 = nn.Linear(p["hidden"], d, bias=False)

    def forward(self, x, cos, sin, attn):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.h, self.hd)
        k = self.wk(h).view(B, T, self.kv, self.hd)
        v = self.wv(h).view(B, T, self.kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv != self.h:
            rep = self.h // self.kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
            s = s.masked_fill(mask, float("-inf"))
            y = F.softmax(s, dim=-1) @ v
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, self.h * self.hd))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class NativeLlama(nn.Module):
    def __init__(self, p, seq, attn):
        super().__init__()
        self.attn = attn
        self.embed = nn.Embedding(p["vocab"], p["dim"])
        self.layers = nn.ModuleList(Block(p) for _ in range(p["layers"]))
        self.norm = RMSNorm(p["dim"], p["eps"])
        self.lm_head = nn.Linear(p["dim"], p["vocab"], bias=False)
        if p["tied"]:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(seq, head_dim_of(p), p["theta"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        cos, sin = self.cos[:T], self.sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin, self.attn)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------

def peak_rss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def main():
    ap = argparse.ArgumentParser(
        description="PyTorch eager fp32 CPU baseline: time one training micro-step "
                    "(fwd+bwd) and the AdamW step of a Llama-family model.")
    ap.add_argument("--model", default="stories110m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1, help="B (default 1)")
    ap.add_argument("--seq", type=int, default=256, help="T (default 256)")
    ap.add_argument("--accum", type=int, default=10, help="K micro-steps per update (default 10)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer updates (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="discarded micro-steps (default 2)")
    ap.add_argument("--min-timed", type=int, default=10,
                    help="raise --steps so at least this many micro-steps are timed (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--impl", default="auto", choices=["auto", "hf", "native"],
                    help="transformers model (hf), hand-written (native), or hf if importable (auto)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="attention kernel (default sdpa)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--bf16", action="store_true",
                    help="run forward and backward under torch.autocast('cpu', dtype=torch.bfloat16)")
    ap.add_argument("--lora-rank", type=int, default=0, help="train PEFT LoRA adapters of this rank (0: full)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    args = ap.parse_args()

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.float32)

    p = PRESETS[args.model]
    B, T, K = args.batch, args.seq, args.accum
    steps = max(args.steps, math.ceil(args.min_timed / K))
    if steps != args.steps:
        log(f"note: --steps raised {args.steps} -> {steps} to time >= {args.min_timed} micro-steps")

    model = None
    tf_version = None
    impl_name = None
    if args.impl in ("auto", "hf"):
        try:
            model, impl_name, tf_version = build_hf(p, T, args.attn)
        except ImportError as e:
            if args.impl == "hf":
                raise
            log(f"note: transformers unavailable ({e}); using the hand-written model")
    if model is None:
        model = NativeLlama(p, T, args.attn)
        impl_name = f"hand-written NativeLlama (attn={args.attn})"
    n_params = sum(x.numel() for x in model.parameters())  # tied weight counted once
    if args.lora_rank > 0:
        import peft

        lcfg = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                               target_modules=args.lora_targets.split(","), lora_dropout=0.0, bias="none",
                               task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lcfg)
        impl_name += f" + peft {peft.__version__} LoRA r={args.lora_rank}"
    model.train()
    n_matmul = matmul_params(p)
    flops_tok = train_flops_per_token(p, T)

    trainable = [x for x in model.parameters() if x.requires_grad]
    decay = [x for x in trainable if x.dim() >= 2]
    no_decay = [x for x in trainable if x.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    gen = torch.Generator().manual_seed(args.seed)
    V = p["vocab"]

    def batch():
        tok = torch.randint(0, V, (B, T + 1), generator=gen)
        return tok[:, :T].contiguous(), tok[:, 1:].contiguous()

    def forward_logits(x):
        out = model(input_ids=x) if impl_name.startswith("transformers") else model(x)
        return out.logits if hasattr(out, "logits") else out

    def micro_step():
        x, y = batch()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = forward_logits(x)
        loss = F.cross_entropy(logits.view(-1, V).float(), y.view(-1)) / K
        loss.backward()
        dt = time.perf_counter() - t0
        return dt, loss.item() * K

    def opt_step():
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {impl_name}")
    log(f"model {args.model}: params {n_params/1e6:.2f}M, matmul params {n_matmul/1e6:.2f}M, "
        f"train FLOPs/token {flops_tok/1e9:.4f} GFLOP; B={B} T={T} K={K} steps={steps} "
        f"warmup={args.warmup}")

    # Warm-up: discarded micro-steps + one discarded optimizer step (AdamW state init).
    for i in range(args.warmup):
        dt, loss = micro_step()
        log(f"warmup micro {i}: {dt*1e3:.1f} ms loss {loss:.4f}")
    if args.warmup > 0:
        dt = opt_step()
        log(f"warmup optimizer step: {dt*1e3:.1f} ms")

    micro_t, opt_t, losses = [], [], []
    for s in range(steps):
        for _ in range(K):
            dt, loss = micro_step()
            micro_t.append(dt)
            losses.append(loss)
        opt_t.append(opt_step())
        log(f"step {s}: micro median {statistics.median(micro_t[-K:])*1e3:.1f} ms, "
            f"optimizer {opt_t[-1]*1e3:.1f} ms, last loss {losses[-1]:.4f}")

    micro_med = statistics.median(micro_t)
    opt_med = statistics.median(opt_t)
    tok_s = B * T / micro_med
    gflops = flops_tok * tok_s / 1e9
    update_s = K * micro_med + opt_med
    result = {
        "model": args.model,
        "impl": impl_name,
        "torch_version": torch.__version__,
        "transformers_version": tf_version,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "batch": B, "seq": T, "accum": K, "steps": steps, "warmup": args.warmup,
        "attn": args.attn,
        "params": n_params,
        "lora_rank": args.lora_rank,
        "bf16_autocast": args.bf16,
        "trainable_params": sum(x.numel() for x in trainable),
        "matmul_params": n_matmul,
        "train_flops_per_token": flops_tok,
        "timed_micro_steps": len(micro_t),
        "micro_step_ms_median": micro_med * 1e3,
        "micro_step_ms_min": min(micro_t) * 1e3,
        "micro_step_ms_max": max(micro_t) * 1e3,
        "optimizer_step_ms_median": opt_med * 1e3,
        "tokens_per_s": tok_s,
        "gflops_per_s": gflops,
        # whole update incl. optimizer, amortised over the K micro-batches
        "tokens_per_s_incl_optimizer": B * T * K / update_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"torch version           : {result['torch_version']}")
        print(f"transformers version    : {result['transformers_version']}")
        print(f"threads                 : {result['threads']}")
        print(f"implementation          : {impl_name}")
        print(f"model / B / T / K       : {args.model} / {B} / {T} / {K}")
        print(f"timed micro-steps       : {len(micro_t)} (after {args.warmup} warm-up)")
        print(f"micro-step median       : {result['micro_step_ms_median']:.1f} ms "
              f"(min {result['micro_step_ms_min']:.1f}, max {result['micro_step_ms_max']:.1f})")
        print(f"optimizer step median   : {result['optimizer_step_ms_median']:.1f} ms")
        print(f"tokens/s                : {tok_s:.1f}")
        print(f"tokens/s incl. optimizer: {result['tokens_per_s_incl_optimizer']:.1f}")
        print(f"achieved GFLOP/s        : {gflops:.2f} "
              f"({flops_tok/1e9:.4f} GFLOP/token)")
        print(f"loss first / last       : {losses[0]:.4f} / {losses[-1]:.4f}")
        print(f"peak RSS                : {result['peak_rss_mb']:.1f} MB")


if __name__ == "__main__":
    main()
