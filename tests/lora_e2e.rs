//! The whole LoRA path as a new user runs it, on the shared SmolLM2-135M-Instruct GGUF:
//! `train --init model.gguf --data chat.jsonl --lora-rank 8` (the model's own tokenizer and
//! chat template, loss on assistant tokens only), then `eval --lora` (the assistant-token
//! loss fell), `generate --lora` (the adapter changes the greedy reply), the checkpoint's PEFT
//! files copied out alone (they reload with the same loss), and `convert --merge-lora` to a
//! GGUF that scores like base + adapter.

#[path = "common/shared_data.rs"]
mod shared_data;

use std::path::Path;
use std::process::Command;

fn anetrain(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain")).args(args).output().expect("run anetrain");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "anetrain {args:?} failed:\n{text}");
    text
}

/// `eval --json`'s mean loss over the first windows of `data`.
fn eval_loss(model: &Path, lora: Option<&Path>, data: &Path) -> f64 {
    let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
    args.extend(["--seq", "64", "--batch", "4", "--batches", "1", "--json"]);
    if let Some(l) = lora {
        args.extend(["--lora", l.to_str().unwrap()]);
    }
    let out = anetrain(&args);
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON from eval:\n{out}"));
    serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64().unwrap()
}

/// Greedy reply to `question` (the model's chat template written out: ChatML).
fn reply(model: &Path, lora: Option<&Path>, question: &str) -> String {
    let prompt = format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", &prompt];
    args.extend(["--temperature", "0", "--max-tokens", "12"]);
    if let Some(l) = lora {
        args.extend(["--lora", l.to_str().unwrap()]);
    }
    let out = anetrain(&args);
    out.lines().filter(|l| !l.starts_with("merged LoRA") && !l.contains("tokens/s")).collect::<Vec<_>>().join("\n")
}

#[test]
fn lora_on_smollm2_gguf_from_chat_data_to_peft_and_merged_gguf() {
    let Some(gguf) = shared_data::shared_data("data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        return;
    };
    let tmp = tempfile::Builder::new().prefix("anetrain-lora-e2e-").tempdir().unwrap();
    let dir = tmp.path();
    // One fact the base model cannot know, asked in several ways.
    let questions = [
        "What is the password?",
        "Tell me the password.",
        "Which password opens the door?",
        "What's the password again?",
        "Say the password.",
        "Do you know the password?",
    ];
    let mut lines = String::new();
    for i in 0..24 {
        let q = questions[i % questions.len()];
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "The password is purple-falcon-42."},
        ]});
        lines.push_str(&format!("{line}\n"));
    }
    let jsonl = dir.join("chat.jsonl");
    std::fs::write(&jsonl, lines).unwrap();

    // The same examples as a token file with the assistant-only mask, for `eval`.
    let model = anetrain::checkpoint::load(&gguf).unwrap();
    let tok = model.tokenizer.as_ref().unwrap();
    let text_of = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let template = anetrain::chat::template::ChatTemplate::new(
        model.chat_template.as_deref().unwrap(),
        &text_of(model.bos),
        &text_of(model.eos),
    )
    .unwrap();
    let examples = anetrain::chat::data::read_examples(&jsonl).unwrap();
    let prepared = dir.join("prepared");
    anetrain::prepare::prepare_chat(&examples, tok, Some(&template), &prepared, 0.1).unwrap();
    let tokens = prepared.join("train.tok");

    // 1. Fine-tune: the GGUF brings its tokenizer and template; only adapters train.
    let ckpt = dir.join("ckpt");
    let out = anetrain(&[
        "train",
        "--init",
        gguf.to_str().unwrap(),
        "--data",
        jsonl.to_str().unwrap(),
        "--lora-rank",
        "8",
        "--seq",
        "64",
        "--batch",
        "2",
        "--steps",
        "8",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-3",
        "--warmup",
        "0",
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--no-peak",
        "--ckpt-dir",
        ckpt.to_str().unwrap(),
    ]);
    assert!(out.contains("initialising from"), "{out}");
    let step = ckpt.join("step-00000008");
    assert!(step.join("adapter_model.safetensors").is_file(), "{out}");

    // 2. The assistant-token loss fell.
    let base = eval_loss(&gguf, None, &tokens);
    let tuned = eval_loss(&gguf, Some(&step), &tokens);
    eprintln!("assistant-token loss: base {base:.4}, after 8 LoRA updates {tuned:.4}");
    assert!(tuned < 0.7 * base, "LoRA did not lower the loss: base {base}, tuned {tuned}");

    // 3. Generation uses the adapter.
    let (before, after) = (reply(&gguf, None, questions[0]), reply(&gguf, Some(&step), questions[0]));
    eprintln!("base: {before:?}\nLoRA: {after:?}");
    assert_ne!(before, after, "the adapter did not change the greedy reply");
    assert!(after.contains("purple-falcon-42"), "the adapter did not learn the reply: {after:?}");

    // 4. The PEFT files alone (what a user hands to `PeftModel.from_pretrained`) reload.
    let peft = dir.join("peft");
    std::fs::create_dir_all(&peft).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(step.join(f), peft.join(f)).unwrap();
    }
    assert_eq!(eval_loss(&gguf, Some(&peft), &tokens), tuned, "the exported PEFT directory scores differently");

    // 5. Merged into a standalone GGUF (f32: the merge is exact up to summation order).
    let merged = dir.join("merged.gguf");
    anetrain(&[
        "convert",
        "--from",
        gguf.to_str().unwrap(),
        "--merge-lora",
        peft.to_str().unwrap(),
        "--to",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let standalone = eval_loss(&merged, None, &tokens);
    assert!((standalone - tuned).abs() <= 1e-4 * tuned, "merged GGUF {standalone} vs base + adapter {tuned}");
}
