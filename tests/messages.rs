//! What the binary says about wrong or doubtful input: each case names the real problem in one
//! sentence (not a parser's or the operating system's symptom), and nothing doubtful is
//! accepted silently. One tiny checkpoint, HF export and tokenizer serve every case.

use std::path::{Path, PathBuf};

#[path = "common/cli.rs"]
mod cli;
use cli::{anetrain, assert_error, stderr};

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

struct Fixture {
    dir: PathBuf,
    ckpt: PathBuf,
    hf: PathBuf,
    tok: PathBuf,
}

fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("anetrain-msg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("ckpt");
    let out = anetrain(&[
        "train",
        "--model",
        "stories260k",
        "--data",
        "synthetic",
        "--steps",
        "1",
        "--batch",
        "1",
        "--seq",
        "16",
        "--no-peak",
        "--threads",
        "1",
        "--ckpt-dir",
        &s(&ckpt),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hf = dir.join("hf");
    let out = anetrain(&["convert", "--from", &s(&ckpt), "--to", &s(&hf)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tok = dir.join("tok");
    let out = anetrain(&["prepare", "--input", "builtin:stories:40", "--tokenizer", "bpe:300", "--out", &s(&tok)]);
    assert!(out.status.success(), "{}", stderr(&out));
    Fixture { dir, ckpt, hf, tok }
}

#[test]
fn misleading_messages_name_the_real_problem() {
    let f = fixture("misleading");
    let (ckpt, dir) = (s(&f.ckpt), &f.dir);
    // Negative numbers reach validation instead of clap's "unexpected argument '-1'".
    assert_error(&["train", "--lr", "-1"], "--lr must be a positive number");
    assert_error(&["generate", "--model", &ckpt, "--ids", "1", "--temperature", "-1"], "--temperature must be");
    assert_error(
        &["prepare", "--input", "builtin:stories:9", "--out", &s(&dir.join("p")), "--val-fraction", "-1"],
        "--val-fraction",
    );
    // A huge learning rate is blamed on itself, not on --weight-decay alone.
    assert_error(&["train", "--lr", "1e30"], "--lr 1e30 × --weight-decay 0.1 = 1.0e29 must be below 1");
    // 64 / 7 heads: the division, not the odd head_dim it produced.
    let cfg = dir.join("c7.json");
    std::fs::write(
        &cfg,
        r#"{"hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 1,
        "num_attention_heads": 7, "num_key_value_heads": 7, "vocab_size": 10}"#,
    )
    .unwrap();
    assert_error(&["info", "--model", &s(&cfg)], "hidden_size (64) is not divisible by num_attention_heads (7)");
    // A version-1 llama2.c file claiming version 2.
    let v1 = dir.join("v1.bin");
    let out = anetrain(&["convert", "--from", &ckpt, "--to", &s(&v1), "--llama2c-format", "v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut bytes = std::fs::read(&v1).unwrap();
    bytes[4..8].copy_from_slice(&2i32.to_le_bytes());
    std::fs::write(&v1, &bytes).unwrap();
    assert_error(&["info", "--model", &s(&v1)], "llama2.c format version 2 is not supported");
    // `info` reads the config of a weights file or checkpoint.
    let legacy = dir.join("legacy.bin");
    assert!(anetrain(&["convert", "--from", &ckpt, "--to", &s(&legacy)]).status.success());
    for model in [&legacy, &f.ckpt, &f.hf] {
        let out = anetrain(&["info", "--model", &s(model)]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("dim (C)      64"));
    }
    // A directory as token data; a model path that does not exist.
    assert_error(&["eval", "--model", &ckpt, "--data", &s(dir)], "is a directory; give a token file");
    assert_error(&["generate", "--model", &s(&dir.join("nope")), "--ids", "1"], "nope does not exist");
    // Resuming synthetic data generated from another seed.
    let base = ["train", "--model", "stories260k", "--data", "synthetic", "--batch", "1", "--seq", "16", "--no-peak"];
    let out = anetrain(&[&base[..], &["--steps", "2", "--ckpt-dir", &ckpt, "--resume", "latest"]].concat());
    assert!(out.status.success(), "same seed resumes: {}", stderr(&out));
    let other_seed = ["--steps", "3", "--seed", "7", "--ckpt-dir", &ckpt, "--resume", "latest"];
    assert_error(&[&base[..], &other_seed].concat(), "resume with the run's original --seed");
    // A prompt too long for the model is refused before anything is echoed.
    let long = "Once upon a time there was a cat. ".repeat(200);
    let out = anetrain(&["generate", "--model", &ckpt, "--tokenizer", &s(&f.tok), "--prompt", &long]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "the prompt was echoed before the error");
    assert!(stderr(&out).contains("the model has 512 positions"), "{}", stderr(&out));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn doubtful_input_is_not_accepted_silently() {
    let f = fixture("silent");
    let (ckpt, dir) = (s(&f.ckpt), &f.dir);
    assert_error(&["train", "--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr 1e-2 is above --lr 1e-3");
    assert_error(&["train", "--eval-tokens", "0"], "--eval-tokens must be at least 1");
    let out = s(&dir.join("p"));
    assert_error(
        &["prepare", "--input", "builtin:stories:9", "--out", &out, "--val-fraction", "0"],
        "--val-fraction must be in (0, 1)",
    );
    assert_error(
        &["generate", "--model", &ckpt, "--ids", "1", "--eos", "512"],
        "--eos 512 is outside the model's vocabulary (512)",
    );
    assert_error(&["train", "--data", "synthetic", "--val-data", &ckpt], "--val-data is for a token-file --data");
    // model_type and architectures disagree.
    let cfg = dir.join("mixed.json");
    std::fs::write(
        &cfg,
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
        "intermediate_size": 100, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 10}"#,
    )
    .unwrap();
    assert_error(&["info", "--model", &s(&cfg)], "architectures names LlamaForCausalLM but model_type is 'qwen3'");
    // An index file beside a single-file model; then bytes after the last tensor.
    let hf = s(&f.hf);
    let index = f.hf.join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map": {}}"#).unwrap();
    assert_error(
        &["generate", "--model", &hf, "--ids", "1"],
        "holds both model.safetensors and model.safetensors.index.json",
    );
    std::fs::remove_file(&index).unwrap();
    let weights = f.hf.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.extend_from_slice(&[0u8; 12]);
    std::fs::write(&weights, &bytes).unwrap();
    assert_error(&["generate", "--model", &hf, "--ids", "1"], "12 trailing bytes after the last tensor");
    // --max-tokens beyond the context is capped with a note; a 1-token decode has no rate.
    let out = anetrain(&["generate", "--model", &ckpt, "--ids", "1,2,3", "--max-tokens", "1000", "--threads", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("note: --max-tokens 1000 capped at 509 (the model's 512 positions less the 3-token prompt)")
    );
    let out = anetrain(&["generate", "--model", &ckpt, "--ids", "1", "--max-tokens", "1", "--threads", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("decode: 1 token in") && err.contains("no rate") && !err.contains("0.0 tokens/s"), "{err}");
    // prepare names what it skipped in a directory, and reads it at any depth.
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(corpus.join("deeper")).unwrap();
    std::fs::write(corpus.join("deeper/a.md"), "One story.\n\nAnother story.").unwrap();
    std::fs::write(corpus.join("b.png"), [0u8, 1]).unwrap();
    let out = anetrain(&["prepare", "--input", &s(&corpus), "--tokenizer", "bpe:260", "--out", &s(&dir.join("c"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("note: skipped 1 entry (not .txt, .md or .jsonl files): ")
            && stderr(&out).contains("b.png")
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("2 documents"));
    std::fs::remove_dir_all(dir).unwrap();
}
