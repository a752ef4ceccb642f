#!/usr/bin/env python3
"""Golden LoRA fixtures from HF PEFT for anetrain's adapter forward/backward/AdamW tests.

Command (from the repository root, after tools/make_fixtures.py; nothing is downloaded):

    python3 tools/make_lora_fixtures.py

Versions used for the committed fixtures: torch 2.15.0 (CPU), transformers 5.25.0,
peft 0.21.2, CPython 3.11.  Deterministic (fp32, one thread).

Each fixture ``tests/fixtures/lora-<base>/`` puts PEFT LoRA adapters on one of the base
fixtures of make_fixtures.py (same weights, same batch):

* ``lora-llama-gqa-tied``   every projection (q, k, v, o, gate, up, down), r=4, alpha=8
* ``lora-qwen3-gqa-qknorm`` q and v only (QK-norm model), r=2, alpha=5

PEFT initialises B to zero, which would make every dA zero; so after ``get_peft_model``
every lora_A and lora_B is re-drawn from N(0, 0.1^2) (seeded).  Files:

* ``adapter/``: ``model.save_pretrained`` output (adapter_config.json and
  adapter_model.safetensors with PEFT's key names), which the Rust test loads;
* ``fixture.safetensors``: ``logits`` of the adapted model on the base fixture's tokens and
  ``grad.<PEFT key>`` for every adapter tensor (mean cross-entropy, ignored targets as in
  the base fixture); the base weights are frozen (requires_grad False, checked);
* ``fixture.json``: ``loss``, ``adamw`` and ``adamw_losses``: 10 AdamW updates of the
  adapters only (lr 1e-2, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on every adapter
  matrix, clip at half the initial adapter gradient norm), loss before each update.
"""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = [
    {"base": "llama-gqa-tied", "seed": 2001, "r": 4, "alpha": 8, "targets": ALL},
    {"base": "qwen3-gqa-qknorm", "seed": 2002, "r": 2, "alpha": 5, "targets": ["q_proj", "v_proj"]},
]
ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "updates": 10}


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def build(spec, adapter_dir=None):
    base_dir = os.path.join(FIX, spec["base"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    else:
        cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"],
                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        gen = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    model.eval()
    return model


def lora_params(model):
    out = [(n.replace(".default", ""), p) for n, p in model.named_parameters() if p.requires_grad]
    assert out and all("lora_" in n for n, _ in out), [n for n, _ in out]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("lora_" not in n for n in frozen)
    return out


def make(spec):
    name = "lora-" + spec["base"]
    d = os.path.join(FIX, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    batch = load_file(os.path.join(FIX, spec["base"], "fixture.safetensors"))
    tokens, targets = batch["tokens"], batch["targets"]

    model = build(spec)
    adapter_dir = os.path.join(d, "adapter")
    model.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    # No local path in a committed file: name the base fixture instead.
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        adapter_cfg = json.load(f)
    adapter_cfg["base_model_name_or_path"] = "tests/fixtures/" + spec["base"]
    with open(cfg_path, "w") as f:
        json.dump(adapter_cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = lora_params(model)
    assert sorted(saved) == sorted(n for n, _ in params), (sorted(saved), [n for n, _ in params])

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = loss_fn(logits, targets)
    loss.backward()
    tensors = {"logits": logits.detach().contiguous()}
    for n, p in params:
        tensors["grad." + n] = p.grad.detach().clone().contiguous()
    init_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in params])))
    save_file(tensors, os.path.join(d, "fixture.safetensors"))

    # The saved adapter reloads onto the base with the same logits.
    re = build(spec, adapter_dir)
    with torch.no_grad():
        assert torch.equal(re(input_ids=tokens).logits, tensors["logits"])

    grad_clip = float(f"{0.5 * init_norm:.3g}")
    m = build(spec, adapter_dir)
    m.train()
    ps = [p for _, p in lora_params(m)]
    opt = torch.optim.AdamW(ps, lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"], foreach=False)
    losses, clipped = [], 0
    for _ in range(ADAMW["updates"]):
        opt.zero_grad(set_to_none=True)
        step_loss = loss_fn(m(input_ids=tokens).logits, targets)
        losses.append(step_loss.item())
        step_loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ps, grad_clip, foreach=False))
        clipped += int(norm > grad_clip)
        opt.step()
    assert losses[0] == loss.item() and losses[-1] < losses[0], losses
    meta = {
        "base": spec["base"],
        "loss": loss.item(),
        "adamw": {**{k: ADAMW[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "updates")},
                  "grad_clip": grad_clip},
        "adamw_losses": losses,
        "clipped_updates": clipped,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
    }
    with open(os.path.join(d, "fixture.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for dirpath, _, files in os.walk(d):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    print(f"{name}: {len(params)} adapter tensors, loss {loss.item():.9g}, grad_clip {grad_clip}, "
          f"clipped {clipped}, adamw {losses[0]:.6g} -> {losses[-1]:.6g}")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    for spec in SPECS:
        make(spec)


if __name__ == "__main__":
    main()
