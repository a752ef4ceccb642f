#!/usr/bin/env python3
"""Generate the golden fixtures under ``tests/fixtures/`` for anetrain's
forward/backward/AdamW tests, using Hugging Face transformers as the reference.

Command (from the repository root; nothing is downloaded, HF_HUB_OFFLINE=1 is
forced):

    python3 tools/make_fixtures.py [NAME ...]     # all, or only the named fixtures

Versions used to produce the committed fixtures: torch 2.15.0 (+cu132 wheel, run
on the CPU), transformers 5.24.0, safetensors 0.8.0, CPython 3.11.  The script
is deterministic (fp32, CPU, one thread, torch.use_deterministic_algorithms) and
re-runnable: it overwrites its outputs, and two runs give byte-identical files.

Tiny random-weight models, each in ``tests/fixtures/<name>/``:

* ``llama-gqa-tied``   LlamaForCausalLM, C=48, F=80, L=2, H=4, KV=2, Dh=12,
                       V=128, theta 1e4, eps 1e-5, tied embeddings.
* ``qwen3-gqa-qknorm`` Qwen3ForCausalLM, C=48, F=80, L=2, H=4, KV=2, Dh=16
                       (!= C/H), V=128, theta 1e6, eps 1e-6, tied, q/k norms.
* ``llama-untied``     LlamaForCausalLM, C=32, F=64, L=2, H=4, KV=4, Dh=8,
                       V=100, theta 1e4, eps 1e-5, untied classifier.
* ``llama3-rope-scaling`` LlamaForCausalLM with ``rope_type: llama3`` (factor 8,
                       low/high frequency factors 1/4, original max positions 64),
                       C=48, F=64, L=2, H=4, KV=2, Dh=12, V=96, tied; the script
                       checks that the scaling changes the logits.
* ``llama-linear-rope`` LlamaForCausalLM with ``rope_type: linear`` (factor 2.5),
                       C=32, F=48, L=2, H=4, KV=2, Dh=8, V=64, untied; checked like
                       the Llama 3 one.
* ``qwen2-qkv-bias``   Qwen2ForCausalLM (q/k/v biases), C=32, F=64, L=2, H=4, KV=2,
                       Dh=8, V=96, theta 1e6, eps 1e-6, untied.
* ``smollm2-tiny``     SmolLM2's family in small: Llama, C=48, H=3, KV=1, Dh=16,
                       F=64, V=80, theta 1e5, tied.
* ``tinyllama-tiny``   TinyLlama's family in small: Llama, C=32, H=8, KV=1, Dh=4,
                       F=48, V=64, theta 1e4, untied.

The first three were made with transformers 5.24.0, the others with 5.25.0
(``fixture.json`` records each one's versions).

After construction every 2-D weight (embedding included) is re-drawn from
N(0, 0.1^2) (biases too) and every RMSNorm gain is set to 1 + 0.1*N(0, 1), so that the
tests are sensitive to every parameter.

Files per fixture:

* ``config.json`` + ``model.safetensors``: ``model.save_pretrained`` (fp32;
  tied models store only ``model.embed_tokens.weight``).  transformers 5 keeps
  RoPE theta only inside ``rope_parameters``; this script also writes the
  classic top-level ``rope_theta`` (and ``tie_word_embeddings``,
  ``use_sliding_window``, ``attention_bias``, ``hidden_act``) so a reader that
  only knows HF's classic field names gets them.  ``rope_scaling`` is absent.
  generation_config.json is removed.
* ``fixture.safetensors``: ``tokens`` (I64 [2,16]), ``targets`` (I64 [2,16],
  three positions = -100: [0,2], [1,5], [1,15]), ``logits`` (F32 [2,16,V]) and
  ``grad.<HF parameter name>`` (F32) for every parameter: the gradient of the
  mean cross-entropy loss (one backward pass at the initial weights).  Targets
  are aligned with positions (no internal label shift):
  ``loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
  ignore_index=-100)``; logits come from ``model(input_ids=tokens).logits``
  (positions 0..T-1, no mask, eager attention).
* ``fixture.json``: ``loss``, ``batch``, ``seq``, ``adamw`` (lr, beta1, beta2,
  eps, weight_decay, grad_clip, updates), ``adamw_losses`` (loss BEFORE each of
  the 10 updates), ``adamw_grad_norms`` (global grad L2 norm before clipping,
  per update), ``clipped_updates`` (how many updates had norm > grad_clip),
  ``torch_version``, ``transformers_version``.

AdamW trajectory (from the saved initial weights, reloaded from disk), per
update: zero grads; forward on the same batch; loss; backward;
``torch.nn.utils.clip_grad_norm_(params, grad_clip)`` (global L2 norm, shared
tied tensor counted once; torch scales by grad_clip / (norm + 1e-6) when
clipping); ``torch.optim.AdamW`` step (lr 1e-2 constant, betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 for params with dim >= 2 and 0.0 for 1-D norm gains,
foreach=False).  grad_clip = f x the initial global grad norm, rounded to 3
significant digits, with f the first of 0.5, 0.45, 0.4, ... that clips at least
3 of the 10 updates and leaves every update's norm >= 1% away from grad_clip.
"""

import hashlib
import json
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import safetensors  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

transformers.logging.set_verbosity_error()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")

B, T = 2, 16
IGNORED = [(0, 2), (1, 5), (1, 15)]
ADAMW = {
    "lr": 1e-2,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.1,
    "updates": 10,
}
CLIP_FRACTIONS = [0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]

FIXTURES = [
    {
        "name": "llama-gqa-tied",
        "seed": 1001,
        "cls": LlamaForCausalLM,
        "config": LlamaConfig,
        "kwargs": dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            vocab_size=128,
            max_position_embeddings=64,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        ),
    },
    {
        "name": "qwen3-gqa-qknorm",
        "seed": 1002,
        "cls": Qwen3ForCausalLM,
        "config": Qwen3Config,
        "kwargs": dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=128,
            max_position_embeddings=64,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            hidden_act="silu",
        ),
    },
    {
        "name": "llama-untied",
        "seed": 1003,
        "cls": LlamaForCausalLM,
        "config": LlamaConfig,
        "kwargs": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=8,
            vocab_size=100,
            max_position_embeddings=64,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        ),
    },
    # Llama 3.x RoPE scaling.  With Dh=12, theta 1e4 the wavelengths are 6.3, 29, 135,
    # 628, ...; original_max_position_embeddings 64 with low/high factors 1/4 puts the
    # first in the kept band (< 16), the second in the interpolated band and the rest in
    # the slowed band (> 64), so all three branches change the logits at T=16.
    {
        "name": "llama3-rope-scaling",
        "seed": 1004,
        "cls": LlamaForCausalLM,
        "config": LlamaConfig,
        "rope": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64),
        "kwargs": dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            vocab_size=96,
            max_position_embeddings=256,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        ),
    },
    # Linear RoPE scaling (position interpolation): every frequency divided by 2.5, a
    # factor that is not a power of two, so the f32 division's rounding is exercised.
    {
        "name": "llama-linear-rope",
        "seed": 1008,
        "cls": LlamaForCausalLM,
        "config": LlamaConfig,
        "rope": dict(rope_type="linear", factor=2.5),
        "kwargs": dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=64,
            max_position_embeddings=128,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        ),
    },
    # Qwen2 / Qwen2.5: biases on q/k/v (never on o_proj), GQA, untied.
    {
        "name": "qwen2-qkv-bias",
        "seed": 1005,
        "cls": Qwen2ForCausalLM,
        "config": Qwen2Config,
        "kwargs": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=96,
            max_position_embeddings=64,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            use_sliding_window=False,
            sliding_window=None,
            hidden_act="silu",
        ),
    },
    # SmolLM2's shape family (Llama: 3:1 GQA, tied, theta 1e5), tiny.
    {
        "name": "smollm2-tiny",
        "seed": 1006,
        "cls": LlamaForCausalLM,
        "config": LlamaConfig,
        "kwargs": dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=80,
            max_position_embeddings=64,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        ),
    },
    # TinyLlama's shape family (Llama: 8:1 GQA, untied, theta 1e4), tiny.
    {
        "name": "tinyllama-tiny",
        "seed": 1007,
        "cls": LlamaForCausalLM,
        "config": LlamaConfig,
        "kwargs": dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=4,
            vocab_size=64,
            max_position_embeddings=64,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        ),
    },
]


def rope_theta_of(config):
    """RoPE theta as the model will use it (transformers 5: rope_parameters)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(config.rope_theta)


def check_config(config, kw, rope=None):
    for key, want in kw.items():
        if key == "rope_theta":
            got = rope_theta_of(config)
        else:
            got = getattr(config, key)
        assert got == want, f"config.{key} = {got!r}, wanted {want!r}"
    rp = getattr(config, "rope_parameters", None)
    if rope is not None:
        assert isinstance(rp, dict) and all(rp.get(k) == v for k, v in rope.items()), rp
        return
    if isinstance(rp, dict):
        assert rp.get("rope_type", "default") == "default", rp
    assert getattr(config, "rope_scaling", None) in (None, {}) or (
        isinstance(config.rope_scaling, dict) and config.rope_scaling.get("rope_type", "default") == "default"
        and set(config.rope_scaling) <= {"rope_type", "rope_theta"}
    ), config.rope_scaling


def reinit_(model, gen):
    """Every 2-D weight and bias ~ N(0, 0.1^2); every 1-D RMSNorm gain = 1 + 0.1*N(0,1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2 or name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                assert name.endswith("norm.weight"), name
                p.copy_(1.0 + 0.1 * noise)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def fix_config_json(path, kw, config, rope=None):
    """Write classic HF field names next to transformers 5's rope_parameters (for Llama 3
    scaling, also the classic ``rope_scaling`` object, as Llama 3.x configs carry it)."""
    with open(path) as f:
        cfg = json.load(f)
    theta = rope_theta_of(config)
    assert theta == kw["rope_theta"], (theta, kw["rope_theta"])
    rp = cfg.get("rope_parameters")
    if rp is not None:
        assert rp.get("rope_theta") == theta, rp
        if rope is None:
            assert rp.get("rope_type", "default") == "default", rp
        else:
            assert all(rp.get(k) == v for k, v in rope.items()), rp
    cfg["rope_theta"] = theta
    if rope is not None:
        cfg["rope_scaling"] = dict(rope)
    elif "rope_scaling" in cfg:
        assert cfg["rope_scaling"] is None, cfg["rope_scaling"]
    cfg["tie_word_embeddings"] = kw["tie_word_embeddings"]
    if "attention_bias" in kw:
        cfg["attention_bias"] = kw["attention_bias"]
    cfg["hidden_act"] = kw["hidden_act"]
    cfg["head_dim"] = kw["head_dim"]
    cfg["use_sliding_window"] = bool(kw.get("use_sliding_window", False))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return cfg


def load_saved(d):
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    model.to(torch.float32)
    model.eval()  # no dropout anyway (attention_dropout 0); train/eval identical here
    return model


def params_of(model):
    """Named parameters, shared (tied) tensors once, in model order."""
    return list(model.named_parameters())


def adamw_trajectory(d, tokens, targets, grad_clip):
    """ADAMW["updates"] clipped AdamW updates from the weights saved in d.

    Returns (loss before each update, global grad L2 norm before clipping)."""
    m = load_saved(d)
    m.train()
    ps = [p for _, p in params_of(m)]
    decay = [p for p in ps if p.dim() >= 2]
    no_decay = [p for p in ps if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": ADAMW["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=ADAMW["lr"],
        betas=(ADAMW["beta1"], ADAMW["beta2"]),
        eps=ADAMW["eps"],
        foreach=False,
    )
    losses, norms = [], []
    for _ in range(ADAMW["updates"]):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(m(input_ids=tokens).logits, targets)
        losses.append(loss.item())
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ps, grad_clip, foreach=False)))
        opt.step()
    return losses, norms


def make_fixture(spec):
    name, kw = spec["name"], spec["kwargs"]
    d = os.path.join(OUT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)

    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    rope = spec.get("rope")
    extra = {}
    if rope is not None:
        extra["rope_parameters"] = dict(rope, rope_theta=kw["rope_theta"])
    config = spec["config"](**kw, **extra)
    config._attn_implementation = "eager"
    check_config(config, kw, rope)
    model = spec["cls"](config).to(torch.float32)
    model.config._attn_implementation = "eager"
    check_config(model.config, kw, rope)
    reinit_(model, gen)
    model.eval()

    names = [n for n, _ in params_of(model)]
    if kw["tie_word_embeddings"]:
        assert "lm_head.weight" not in names, names
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert "lm_head.weight" in names
        assert model.lm_head.weight is not model.model.embed_tokens.weight

    # --- save the model -------------------------------------------------
    model.save_pretrained(d)
    gc = os.path.join(d, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    cfg_json = fix_config_json(os.path.join(d, "config.json"), kw, model.config, rope)
    saved = load_file(os.path.join(d, "model.safetensors"))
    assert sorted(saved) == sorted(names), (sorted(saved), sorted(names))
    for n, p in params_of(model):
        assert saved[n].dtype == torch.float32 and torch.equal(saved[n], p.detach()), n

    # --- batch ----------------------------------------------------------
    V = kw["vocab_size"]
    tokens = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    for b, t in IGNORED:
        targets[b, t] = -100
    assert int((targets == -100).sum()) == len(IGNORED)

    # --- forward + backward at the initial weights ----------------------
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    assert logits.shape == (B, T, V) and logits.dtype == torch.float32
    loss = loss_fn(logits, targets)
    loss.backward()
    tensors = {
        "tokens": tokens.contiguous(),
        "targets": targets.contiguous(),
        "logits": logits.detach().contiguous(),
    }
    for n, p in params_of(model):
        assert p.grad is not None, f"no grad for {n}"
        tensors["grad." + n] = p.grad.detach().clone().contiguous()
    assert len([k for k in tensors if k.startswith("grad.")]) == len(names)
    if rope is not None:
        # The scaling must matter at this length, or the fixture would not test it.
        plain = spec["config"](**kw)
        plain._attn_implementation = "eager"
        other = spec["cls"](plain).to(torch.float32)
        other.load_state_dict(model.state_dict())
        other.eval()
        with torch.no_grad():
            diff = float((other(input_ids=tokens).logits - logits.detach()).abs().max())
        assert diff > 1e-2, f"{name}: RoPE scaling changes the logits by only {diff}"
        print(f"{name}: unscaled RoPE would change the logits by up to {diff:.4g}")
    init_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in params_of(model)])))
    save_file(tensors, os.path.join(d, "fixture.safetensors"))

    # --- reload check: the saved directory reproduces the logits ---------
    re = load_saved(d)
    check_config(re.config, kw, rope)
    assert [n for n, _ in re.named_parameters()] == names
    with torch.no_grad():
        re_logits = re(input_ids=tokens).logits
    assert torch.equal(re_logits, tensors["logits"]), float((re_logits - tensors["logits"]).abs().max())
    back = load_file(os.path.join(d, "fixture.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k

    # --- AdamW trajectory from the saved initial weights -----------------
    # grad_clip = frac x the initial global grad norm (3 significant digits),
    # with the first frac that clips >= 3 of the updates and keeps every
    # update's norm at least 1% away from grad_clip (no borderline decisions).
    for frac in CLIP_FRACTIONS:
        grad_clip = float(f"{frac * init_norm:.3g}")
        losses, norms = adamw_trajectory(d, tokens, targets, grad_clip)
        clipped = sum(1 for n in norms if n > grad_clip)
        margin = min(abs(n - grad_clip) / grad_clip for n in norms)
        if clipped >= 3 and margin >= 0.01:
            break
    else:
        raise AssertionError(f"{name}: no grad_clip fraction clips >= 3 updates cleanly")
    assert clipped >= 3, (name, clipped, norms, grad_clip)
    assert losses[0] == loss.item(), (losses[0], loss.item())
    assert losses[-1] < losses[0], losses

    meta = {
        "loss": loss.item(),
        "batch": B,
        "seq": T,
        "adamw": {**{k: ADAMW[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")},
                  "grad_clip": grad_clip, "updates": ADAMW["updates"]},
        "adamw_losses": losses,
        "adamw_grad_norms": norms,
        "clipped_updates": clipped,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(d, "fixture.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{name}: params {sum(p.numel() for _, p in params_of(model))} ({len(names)} tensors), "
          f"rope_theta {cfg_json['rope_theta']}, loss {loss.item():.9g}, "
          f"max|logit| {float(logits.detach().abs().max()):.6g}, init grad norm {init_norm:.6g}, "
          f"grad_clip {grad_clip}, clipped {clipped}/{ADAMW['updates']}, "
          f"adamw loss {losses[0]:.6g} -> {losses[-1]:.6g}, size {size} B")
    return d


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"safetensors {safetensors.__version__}, python {sys.version.split()[0]}")
    os.makedirs(OUT, exist_ok=True)
    only = set(sys.argv[1:])
    unknown = only - {spec["name"] for spec in FIXTURES}
    assert not unknown, f"unknown fixtures {sorted(unknown)}"
    for spec in FIXTURES:
        if not only or spec["name"] in only:
            make_fixture(spec)
    for dirpath, _, files in os.walk(OUT):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)  # safetensors writes 0600
    total = 0
    for dirpath, _, files in os.walk(OUT):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            total += os.path.getsize(p)
    assert total < 3 * 1024 * 1024, total
    print(f"total tests/fixtures: {total} B ({total / 1e6:.3f} MB)")
    for dirpath, _, files in sorted(os.walk(OUT)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                h = hashlib.sha256(fh.read()).hexdigest()
            print(f"  {h}  {os.path.relpath(p, ROOT)}")


if __name__ == "__main__":
    main()
