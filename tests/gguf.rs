//! GGUF import fidelity: every dequantizer against the `gguf` Python package, and the shared
//! SmolLM2-135M-Instruct Q4_1 file against HF transformers (tools/make_gguf_fixtures.py).

use anetrain::checkpoint::gguf::GgufFile;
use anetrain::generate::Sampling;
use anetrain::model::Model;
use anetrain::ops::{GemmImpl, Par};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[path = "common/shared_data.rs"]
mod shared_data;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Each fixture holds tensor "q" (random blocks of one type) and "ref" (the gguf package's
/// dequantization of them, F32); ours must equal it bit for bit.
#[test]
fn every_dequantizer_matches_the_gguf_package() {
    let types = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"];
    for ty in types {
        let path = root().join(format!("tests/fixtures/gguf/dequant_{ty}.gguf"));
        let f = GgufFile::open(&path).unwrap();
        let q = f.tensor("q").unwrap();
        let r = f.tensor("ref").unwrap();
        assert_eq!(q.ty.name(), ty);
        assert_eq!(q.shape(), r.shape());
        let n = q.numel() as usize;
        let (mut got, mut want) = (vec![0.0f32; n], vec![0.0f32; n]);
        f.read_f32(q, &mut got).unwrap();
        f.read_f32(r, &mut want).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{ty}: value {i} is {a}, the gguf package gives {b}");
        }
    }
}

#[derive(Deserialize)]
struct Golden {
    strings: Vec<String>,
    ids: Vec<Vec<u32>>,
    window_ids: Vec<u32>,
    window_loss: f64,
    prompt_ids: Vec<u32>,
    greedy: Vec<u32>,
}

fn shared_gguf() -> Option<PathBuf> {
    shared_data::shared_data("data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Loss, greedy continuation and tokenization of the real SmolLM2 GGUF equal HF transformers'.
#[test]
fn smollm2_q4_1_matches_transformers() {
    let Some(path) = shared_gguf() else { return };
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/gguf_smollm2.json")).unwrap())
            .unwrap();
    let m = anetrain::checkpoint::load(&path).unwrap();
    assert_eq!((m.cfg.dim, m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_kv_heads), (576, 30, 9, 3));
    assert!(m.cfg.tied_embeddings);
    assert_eq!((m.bos, m.eos), (Some(1), Some(2)));
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));

    let tok = m.tokenizer.as_ref().unwrap();
    for (text, ids) in golden.strings.iter().zip(&golden.ids) {
        assert_eq!(&tok.encode(text).unwrap(), ids, "tokenization of {text:?}");
        // Decoding drops special tokens (chat markup), as generation output should.
        if !text.contains("<|") {
            assert_eq!(&tok.decode(ids).unwrap(), text, "decoding of {text:?}");
        }
    }

    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let w = &golden.window_ids;
    let t = w.len() - 1;
    let mut model = Model::cpu(&m.cfg, 1, t, par).unwrap();
    let loss = model.forward(&m.params, &w[..t], &w[1..]).unwrap().mean();
    let rel = (loss - golden.window_loss).abs() / golden.window_loss;
    assert!(rel < 2e-5, "loss {loss} vs transformers {} (relative {rel:e})", golden.window_loss);
    drop(model);

    let mut greedy = Vec::new();
    let sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
    anetrain::generate::generate(
        &m.cfg,
        &m.params,
        None,
        &golden.prompt_ids,
        golden.greedy.len(),
        sampling,
        m.eos,
        par,
        |t| greedy.push(t),
    )
    .unwrap();
    assert_eq!(greedy, golden.greedy, "greedy continuation: ours {:?}", tok.decode(&greedy));
}

/// `eval --model x.gguf` reads the file and scores a token file.
#[test]
fn eval_command_reads_gguf() {
    let Some(path) = shared_gguf() else { return };
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/gguf_smollm2.json")).unwrap())
            .unwrap();
    let dir = std::env::temp_dir().join(format!("anetrain-gguf-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("window.tok");
    let fp = anetrain::checkpoint::load(&path).unwrap().tokenizer.unwrap().fingerprint;
    anetrain::data::TokenData::write(&data, &golden.window_ids, 49152, &fp).unwrap();
    let t = golden.window_ids.len() - 1;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["eval", "--model", path.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--seq", &t.to_string(), "--json", "--threads", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!((loss - golden.window_loss).abs() / golden.window_loss < 2e-5, "eval loss {loss}");
    std::fs::remove_dir_all(Path::new(&dir)).unwrap();
}

/// `train --init <the SmolLM2 GGUF> --data notes.txt`: no --model, the text tokenized with the
/// model's own tokenizer, training starts at the pretrained loss (far below ln V ≈ 10.8) and
/// lowers it. SmolLM2-135M needs ~2.8 GB here (weights, gradients, AdamW moments, the loaded
/// copy); B=1, T=32, 4 updates.
#[test]
fn train_init_from_gguf_on_raw_text() {
    let Some(path) = shared_gguf() else { return };
    let dir = std::env::temp_dir().join(format!("anetrain-gguf-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notes = dir.join("notes.txt");
    let para = "The lighthouse keeper wrote in his notebook every evening. He counted the ships that \
                passed, noted the weather, and drew the birds that landed on the rail.";
    std::fs::write(&notes, [para; 12].join("\n\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["train", "--init", path.to_str().unwrap(), "--data", notes.to_str().unwrap()])
        .args(["--steps", "4", "--batch", "1", "--seq", "32", "--lr", "5e-4", "--warmup", "0", "--eval-every", "0"])
        .args(["--no-peak", "--sample-tokens", "0", "--threads", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("loss ")).expect("a loss summary line");
    let nums: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let (first, last) = (nums[0], nums[1]);
    assert!(first < 6.5, "first loss {first}: not the pretrained model with its own tokenizer\n{stdout}");
    assert!(last < first, "loss did not fall: {first} -> {last}\n{stdout}");
    // --model and --init together are refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["train", "--init", path.to_str().unwrap(), "--model", "stories2m"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
