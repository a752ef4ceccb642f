//! LoRA from the command line: bad targets, a LoRA run with its checkpoint and resume, and
//! `convert --merge-lora` / `eval --lora` on PEFT's own adapters (the golden fixture), whose
//! merged model must reproduce PEFT's logits.

use anetrain::checkpoint::hf;
use anetrain::checkpoint::safetensors::SafeTensors;
use anetrain::model::Model;
use anetrain::ops::{GemmImpl, Par};
use std::path::PathBuf;
use std::process::Command;

fn anetrain(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain")).args(args).output().expect("run anetrain");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anetrain-lora-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn lora_training_run_checkpoints_and_resumes() {
    let (ok, out) = anetrain(&[
        "train",
        "--model",
        "stories260k",
        "--data",
        "synthetic",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q,qq",
    ]);
    assert!(!ok && out.contains("unknown LoRA target 'qq'") && out.contains("q, k, v, o, gate, up, down"), "{out}");
    let (ok, out) = anetrain(&["train", "--model", "stories260k", "--data", "synthetic", "--lora-alpha", "4"]);
    assert!(!ok && out.contains("--lora-alpha needs --lora-rank"), "{out}");

    let dir = scratch("run");
    let d = dir.to_str().unwrap();
    let common = ["train", "--model", "stories260k", "--data", "synthetic", "--seq", "32", "--batch", "2"];
    let lora = ["--lora-rank", "4", "--lora-targets", "q,v,down", "--ckpt-dir", d, "--no-peak"];
    let (ok, out) = anetrain(&[&common[..], &lora[..], &["--steps", "3"]].concat());
    assert!(ok, "{out}");
    let step = dir.join("step-00000003");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    let (ok, out) = anetrain(&[&common[..], &lora[..], &["--steps", "5", "--resume", "latest"]].concat());
    assert!(ok && out.contains("resumed from") && out.contains("after 3 updates"), "{out}");
    assert!(dir.join("step-00000005/adapter_model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn merge_lora_reproduces_peft_logits() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let base = fixtures.join("llama-gqa-tied");
    let adapter = fixtures.join("lora-llama-gqa-tied/adapter");
    let out = scratch("merged");
    let (ok, text) = anetrain(&[
        "convert",
        "--from",
        base.to_str().unwrap(),
        "--merge-lora",
        adapter.to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(ok && text.contains("merged LoRA adapters"), "{text}");
    let (cfg, params) = hf::load(&out).unwrap();
    let batch = SafeTensors::open(&base.join("fixture.safetensors")).unwrap();
    let tokens: Vec<u32> = batch.read_i64("tokens").unwrap().iter().map(|&x| x as u32).collect();
    let mut model = Model::cpu(&cfg, 2, 16, Par { threads: 2, gemm: GemmImpl::Gemm }).unwrap();
    model.forward(&params, &tokens, &tokens).unwrap();
    let fixture = SafeTensors::open(&fixtures.join("lora-llama-gqa-tied/fixture.safetensors")).unwrap();
    let mut want = vec![0.0f32; model.logits().len()];
    fixture.read_f32("logits", &mut want).unwrap();
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let err = model.logits().iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-5 * scale, "merged model vs PEFT logits: max error {err:e}");
    // An adapter for another model is refused with the reason.
    let other = fixtures.join("qwen3-gqa-qknorm");
    let (ok, text) = anetrain(&[
        "convert",
        "--from",
        other.to_str().unwrap(),
        "--merge-lora",
        adapter.to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("cannot use") && text.contains("LoRA adapters of this model"), "{text}");
    std::fs::remove_dir_all(&out).ok();
}
