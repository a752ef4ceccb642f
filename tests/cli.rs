//! The `anetrain` binary end to end: the default run trains and logs, `info` reports the
//! published parameter counts, and bad input exits non-zero with one clear message.

#[path = "common/cli.rs"]
mod cli;
use cli::{anetrain, text};

#[test]
fn default_run_trains_and_writes_telemetry() {
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-cli-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("run.jsonl");
    let log_path = log.to_str().unwrap();
    let ckpt = dir.join("ckpt");
    let _ = std::fs::remove_dir_all(&ckpt);
    let ckpt_path = ckpt.to_str().unwrap();
    let args = [
        "train",
        "--model",
        "stories260k",
        "--seq",
        "64",
        "--steps",
        "60",
        "--no-peak",
        "--threads",
        "2",
        "--log",
        log_path,
        "--ckpt-dir",
        ckpt_path,
    ];
    let out = anetrain(&args);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    // As the README says: the default data's checkpoint is prompted with text, no --tokenizer.
    let latest = format!("{ckpt_path}/latest");
    let story = anetrain(&["generate", "--model", &latest, "--prompt", "Once upon a time", "--max-tokens", "8"]);
    let said = String::from_utf8_lossy(&story.stdout);
    assert!(story.status.success() && said.starts_with("Once upon a time"), "{}", text(&story));
    assert!(all.contains("--- efficiency ---") && all.contains("tokens/s"), "{all}");
    assert!(all.contains("dW overlap off") && all.contains("(inline), dW wait 0.0 ms per update"), "{all}");
    let all_lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(all_lines[0]["type"], "header");
    assert_eq!(all_lines.last().unwrap()["type"], "report");
    let lines: Vec<&serde_json::Value> = all_lines.iter().filter(|l| l["type"] == "update").collect();
    assert_eq!(lines.len(), 60);
    let keys = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "ms_forward", "ms_backward", "ms_optimizer"];
    for key in keys.into_iter().chain(["ms_kernels", "ms_dw", "ms_dw_wait"]) {
        assert!(lines[0].get(key).is_some(), "telemetry lacks '{key}'");
    }
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    assert!((loss(0) - 512f64.ln()).abs() < 0.3, "first loss {}", loss(0));
    assert!(loss(59) < loss(0) - 1.5, "loss did not fall: {} -> {}", loss(0), loss(59));
}

#[test]
fn info_reports_published_parameter_counts() {
    let out = anetrain(&["info", "--model", "qwen3-0.6b"]);
    assert!(out.status.success());
    assert!(text(&out).contains("596,049,920"), "{}", text(&out));
    let out = anetrain(&["info", "--model", "stories110m"]);
    assert!(text(&out).contains("109,529,856"), "{}", text(&out));
}

/// `bench attention` runs both paths in both directions and reports positive rates; a shape
/// whose probabilities cannot be held is an error, not an abort.
#[test]
fn bench_attention_reports_both_paths() {
    let out = anetrain(&[
        "bench",
        "attention",
        "--model",
        "stories260k",
        "--batch",
        "1",
        "--seq",
        "40",
        "--budget",
        "0.01",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<String> = rows.iter().map(|r| format!("{} {}", r["path"], r["direction"])).collect();
    assert_eq!(names, [r#""f32" "forward""#, r#""bf16" "forward""#, r#""f32" "backward""#, r#""bf16" "backward""#]);
    assert!(rows.iter().all(|r| r["gflops"].as_f64().unwrap() > 0.0), "{report}");
    let out = anetrain(&["bench", "attention", "--model", "stories260k", "--batch", "100000", "--seq", "100000"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attention probabilities") && !err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_fails_with_one_clear_message() {
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-bad-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let big_id = dir.join("big.bin");
    std::fs::write(&big_id, [1u8, 0, 0xff, 0xff]).unwrap();
    let odd = dir.join("odd.bin");
    std::fs::write(&odd, [1u8, 0, 7]).unwrap();
    let empty = dir.join("empty.bin");
    std::fs::write(&empty, []).unwrap();
    let bad_cfg = dir.join("config.json");
    std::fs::write(
        &bad_cfg,
        r#"{"hidden_size": 48, "intermediate_size": 10, "num_hidden_layers": 1,
        "num_attention_heads": 6, "num_key_value_heads": 4, "vocab_size": 10}"#,
    )
    .unwrap();
    let p = |path: &std::path::Path| path.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["train".into(), "--model".into(), "nope".into()], "unknown model 'nope'"),
        (
            vec!["train".into(), "--model".into(), "stories15m".into(), "--seq".into(), "300".into()],
            "max_position_embeddings",
        ),
        (vec!["train".into(), "--data".into(), "/nonexistent/tokens.bin".into()], "cannot open token file"),
        (vec!["train".into(), "--data".into(), p(&big_id)], "outside the model's vocabulary"),
        (vec!["train".into(), "--data".into(), p(&odd)], "odd size"),
        (vec!["train".into(), "--data".into(), p(&empty)], "is empty"),
        (vec!["train".into(), "--batch".into(), "0".into()], "--batch must be at least 1"),
        (vec!["train".into(), "--steps".into(), "0".into()], "--steps must be at least 1"),
        (vec!["train".into(), "--threads".into(), "0".into()], "--threads must be at least 1"),
        (vec!["train".into(), "--lr=-1".into()], "--lr must be a positive number"),
        (vec!["train".into(), "--adam-eps".into(), "0".into()], "--adam-eps must be a positive number"),
        (vec!["train".into(), "--weight-decay".into(), "inf".into()], "--weight-decay"),
        (vec!["train".into(), "--steps".into(), "100000000000000".into()], "--steps"),
        (vec!["train".into(), "--batch".into(), "100000".into(), "--seq".into(), "256".into()], "4M tokens"),
        (vec!["train".into(), "--loss-scale".into(), "1000".into()], "power of two"),
        (vec!["info".into(), "--model".into(), p(&bad_cfg)], "num_key_value_heads"),
        (vec!["train".into(), "--ckpt-dir".into(), "/proc/anetrain-nope".into()], "checkpoint directory"),
        (vec!["train".into(), "--resume".into(), "latest".into()], "--resume latest needs --ckpt-dir"),
        (vec!["train".into(), "--resume".into(), p(&dir)], "is not a checkpoint"),
        (vec!["bench".into(), "gemm".into(), "--budget".into(), "nan".into()], "is not a time budget"),
        (vec!["bench".into(), "lora-gemm".into(), "--budget=-1".into()], "is not a time budget"),
        (vec!["bench".into(), "lora-gemm".into(), "--bf16-nc".into(), "0".into()], "a positive multiple of 32"),
        (vec!["bench".into(), "attention".into(), "--seq".into(), "0".into()], "--batch and --seq must be at least 1"),
        (vec!["train".into(), "--bf16-matmul".into()], "--bf16-matmul needs --lora-rank"),
        (
            vec![
                "train".into(),
                "--lora-rank".into(),
                "2".into(),
                "--base-dtype".into(),
                "bf16".into(),
                "--bf16-attention".into(),
            ],
            "--bf16-attention needs --bf16-matmul",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = anetrain(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: stderr '{err}' lacks '{needle}'");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

/// Bad files of every kind, through the commands that read them: a checkpoint that is
/// truncated, corrupt, foreign or from another model; safetensors that are cut short; token
/// files from another tokenizer or vocabulary.
#[test]
fn bad_files_fail_with_one_clear_message() {
    use anetrain::data::TokenData;
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-badfiles-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let ckpt = dir.join("ckpt");
    let made =
        anetrain(&["train", "--steps", "2", "--batch", "2", "--seq", "16", "--no-peak", "--ckpt-dir", &s(&ckpt)]);
    assert!(made.status.success(), "{}", text(&made));
    let step = ckpt.join("step-00000002");

    // Token files: headed for another tokenizer / vocabulary.
    let ids: Vec<u32> = (0..4000).map(|i| i % 500).collect();
    let (tok_a, tok_b, tok_v) = (dir.join("a.tok"), dir.join("b.tok"), dir.join("v.tok"));
    TokenData::write(&tok_a, &ids, 512, "bpe:a").unwrap();
    TokenData::write(&tok_b, &ids, 512, "bpe:b").unwrap();
    TokenData::write(&tok_v, &ids, 1000, "bpe:a").unwrap();

    // An HF export whose weights file is cut short.
    let hf = dir.join("hf");
    assert!(anetrain(&["convert", "--from", &s(&ckpt), "--to", &s(&hf)]).status.success());
    let weights = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(hf.join("model.safetensors"), &weights[..weights.len() - 100]).unwrap();

    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["train", "--steps", "4", "--batch", "2", "--seq", "16", "--no-peak"].map(String::from).to_vec();
        if !extra.contains(&"--model") {
            v.extend(["--model".to_string(), "stories260k".to_string()]);
        }
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (base(&["--model", "stories15m", "--resume", &s(&ckpt)]), "model config differs"),
        (base(&["--resume", &s(&hf)]), "is not a checkpoint"),
        (base(&["--data", &s(&tok_v)]), "made for a vocabulary of 1000"),
        (base(&["--data", &s(&tok_a), "--val-data", &s(&tok_b)]), "made with tokenizer bpe:b, not bpe:a"),
        (vec!["eval".into(), "--model".into(), s(&hf), "--data".into(), s(&tok_a)], "model.safetensors"),
    ];
    // Checkpoint damage, one file at a time (restored after each case).
    type Corrupt = fn(&[u8]) -> Vec<u8>;
    let damage: [(&str, Corrupt, &str); 4] = [
        ("model.safetensors", |b| b[..b.len() / 2].to_vec(), "model.safetensors"),
        ("optimizer.safetensors", |b| b.iter().map(|x| x ^ 0x5a).collect(), "optimizer.safetensors"),
        ("state.json", |_| b"{\"format\": \"something-else\"}".to_vec(), "not an anetrain checkpoint"),
        ("state.json", |b| b[..b.len() / 3].to_vec(), "corrupt"),
    ];
    for (args, needle) in cases.drain(..) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = anetrain(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle) && !err.contains("panicked"), "{args:?}: '{err}'");
    }
    for (file, corrupt, needle) in damage {
        let path = step.join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, corrupt(&good)).unwrap();
        let out = anetrain(&base(&["--resume", &s(&ckpt)]).iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle) && !err.contains("panicked"), "{file}: '{err}'");
        std::fs::write(&path, good).unwrap();
    }
}

/// prepare → train → generate, end to end through the binary, on the built-in stories.
#[test]
fn prepare_train_generate_end_to_end() {
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-e2e-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (data, ckpt) = (dir.join("data"), dir.join("ckpt"));
    let out = anetrain(&["prepare", "--input", "builtin:stories:400", "--tokenizer", "bpe:512", "--out", &s(&data)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("400 documents"), "{}", text(&out));
    let out = anetrain(&[
        "train",
        "--model",
        "stories260k",
        "--data",
        &s(&data),
        "--steps",
        "40",
        "--seq",
        "64",
        "--eval-every",
        "20",
        "--no-peak",
        "--ckpt-dir",
        &s(&ckpt),
    ]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("val ") && all.contains("--- sample"), "{all}");
    let sample = |seed: &str, tokenizer: &[&str]| {
        let model = s(&ckpt);
        let mut args = vec!["generate", "--model", &model, "--prompt", "Once upon a time"];
        args.extend(["--max-tokens", "30", "--seed", seed]);
        args.extend(tokenizer);
        let out = anetrain(&args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let story = sample("5", &["--tokenizer", &s(&data)]);
    assert!(story.starts_with("Once upon a time") && story.len() > "Once upon a time".len() + 10, "{story}");
    assert_eq!(sample("5", &["--tokenizer", &s(&data)]), story, "same seed, same text");
    // The checkpoint carries its tokenizer: no --tokenizer needed.
    assert_eq!(sample("5", &[]), story, "the saved tokenizer is the one training used");
}

/// `eval` on 7 windows with `--batch 4` (a short last batch of 3 windows): the reported loss
/// is the mean over exactly the 7 windows, each evaluated alone in-process; `--batches 5`
/// uses the first 5.
#[test]
fn eval_averages_every_window_including_a_short_last_batch() {
    use anetrain::checkpoint::{hf, safetensors::Dtype};
    use anetrain::config::ModelConfig;
    use anetrain::model::Model;
    use anetrain::ops::Par;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig { n_layers: 2, ..ModelConfig::preset("stories260k").unwrap() };
    let layout = anetrain::params::ParamLayout::new(&cfg);
    let mut rng = anetrain::rng::Rng::new(5);
    // Larger than init, so windows differ in loss.
    let params: Vec<f32> = layout.init(5).iter().map(|x| x + 0.05 * rng.normal() as f32).collect();
    hf::save(&dir.path().join("m"), &cfg, &params, Dtype::F32).unwrap();
    let t = 16;
    let ids: Vec<u16> = (0..7 * t + 1).map(|_| (rng.uniform() * cfg.vocab_size as f64) as u16).collect();
    let data = dir.path().join("data.bin");
    std::fs::write(&data, ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();

    let mut model = Model::cpu(&cfg, 1, t, Par::seq()).unwrap();
    let window_loss: Vec<f64> = (0..7)
        .map(|w| {
            let x: Vec<u32> = ids[w * t..w * t + t].iter().map(|&i| i as u32).collect();
            let y: Vec<u32> = ids[w * t + 1..w * t + t + 1].iter().map(|&i| i as u32).collect();
            model.forward(&params, &x, &y).unwrap().sum
        })
        .collect();
    for (batches, windows) in [("0", 7), ("5", 5)] {
        let (m, d) = (dir.path().join("m"), data.clone());
        let args = ["eval", "--model", m.to_str().unwrap(), "--data", d.to_str().unwrap()];
        let out = anetrain(&[&args[..], &["--seq", "16", "--batch", "4", "--batches", batches, "--json"]].concat());
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["windows"], windows);
        assert_eq!(v["tokens"], windows * t);
        let want = window_loss[..windows].iter().sum::<f64>() / (windows * t) as f64;
        let got = v["loss"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-6 * want, "{windows} windows: loss {got} vs {want} window by window");
        assert!((v["perplexity"].as_f64().unwrap() - got.exp()).abs() <= 1e-9 * got.exp());
    }
}
