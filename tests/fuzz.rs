//! Mutation fuzzing of every loader: valid inputs are corrupted at random (bit flips, boundary
//! values, truncation, duplication, insertion) and each loader must return `Ok` or an error —
//! never panic, never hang. cargo-fuzz needs a nightly toolchain this project does not have,
//! so this is a self-contained, seeded fuzzer.
//!
//! Each target runs for `ANETRAIN_FUZZ_SECS` seconds (default 1, the CI smoke). A long local
//! run: `ANETRAIN_FUZZ_SECS=600 cargo test --release --test fuzz -- --test-threads 2`.
//! A crashing input is written to `target/fuzz-<target>-crash.bin` for replay.

use anetrain::checkpoint::{hf, llama2c, native, safetensors::SafeTensors};
use anetrain::config::ModelConfig;
use anetrain::data::TokenData;
use anetrain::params::ParamLayout;
use anetrain::rng::Rng;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/shared_data.rs"]
mod shared_data;

fn budget() -> Duration {
    let secs = std::env::var("ANETRAIN_FUZZ_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(1.0);
    Duration::from_secs_f64(secs)
}

const INTERESTING: [u64; 10] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, u64::MAX];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(6) {
        let len = out.len().max(1) as u64;
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(len) as usize;
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(len) as usize;
                out[i] = INTERESTING[rng.below(6) as usize] as u8;
            }
            2 if out.len() >= 8 => {
                // A little-endian boundary integer (4 or 8 bytes) at a random offset: hits
                // header lengths, dims and offsets.
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let i = rng.below((out.len() - width + 1) as u64) as usize;
                let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize].to_le_bytes();
                out[i..i + width].copy_from_slice(&v[..width]);
            }
            3 => out.truncate(rng.below(len + 1) as usize),
            4 if !out.is_empty() => {
                let a = rng.below(len) as usize;
                let b = (a + 1 + rng.below(64) as usize).min(out.len());
                let chunk = out[a..b].to_vec();
                let at = rng.below(len) as usize;
                out.splice(at..at, chunk);
            }
            5 => {
                let at = rng.below(len) as usize;
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.below(256) as u8).collect();
                out.splice(at.min(out.len())..at.min(out.len()), junk);
            }
            _ if !out.is_empty() => {
                // Digits are what JSON headers are made of: replace one with another digit.
                let i = rng.below(len) as usize;
                if out[i].is_ascii_digit() {
                    out[i] = b'0' + rng.below(10) as u8;
                }
            }
            _ => {}
        }
    }
    out
}

/// Runs `target` on mutations of `seeds` until the budget is spent.
fn fuzz(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) {
    let mut rng = Rng::new(0xF022 ^ name.len() as u64);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < budget() || runs < 50 {
        let seed = &seeds[rng.below(seeds.len() as u64) as usize];
        let input = mutate(&mut rng, seed);
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| target(&input)));
        let took = t.elapsed();
        if result.is_err() || took > Duration::from_secs(5) {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/fuzz-{name}-crash.bin"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "{name}: input {} {} (after {runs} runs)",
                path.display(),
                if result.is_err() { "panicked" } else { "hung" }
            );
        }
        runs += 1;
    }
    eprintln!("{name}: {runs} inputs in {:.1} s, no panic or hang", start.elapsed().as_secs_f64());
}

fn tiny() -> ModelConfig {
    ModelConfig {
        n_layers: 1,
        vocab_size: 32,
        dim: 16,
        ffn_dim: 24,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        ..ModelConfig::preset("stories260k").unwrap()
    }
}

/// A fresh directory, removed when the returned guard drops.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("anetrain-fuzz-{name}-")).tempdir().unwrap()
}

fn read_everything(st: &SafeTensors) {
    for (name, info) in &st.tensors {
        let mut buf = vec![0.0f32; info.numel()];
        let _ = st.read_f32(name, &mut buf);
        let _ = st.read_i64(name);
    }
}

#[test]
fn fuzz_safetensors() {
    let tmp = scratch("st");
    let dir = tmp.path().to_path_buf();
    let cfg = ModelConfig { qk_norm: true, tied_embeddings: false, ..tiny() };
    hf::save(&dir, &cfg, &ParamLayout::new(&cfg).init(1), anetrain::checkpoint::safetensors::Dtype::BF16).unwrap();
    let mut seeds = vec![std::fs::read(dir.join("model.safetensors")).unwrap()];
    seeds.push(
        std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-untied/fixture.safetensors"),
        )
        .unwrap(),
    );
    fuzz("safetensors", &seeds, |bytes| {
        if let Ok(st) = SafeTensors::from_bytes(bytes.to_vec(), "fuzz") {
            read_everything(&st);
        }
    });
}

#[test]
fn fuzz_llama2c() {
    let seeds: Vec<Vec<u8>> =
        [(llama2c::Format::Legacy, true), (llama2c::Format::Legacy, false), (llama2c::Format::V1, false)]
            .into_iter()
            .map(|(format, tied)| {
                let cfg = ModelConfig { tied_embeddings: tied, ..tiny() };
                let params = ParamLayout::new(&cfg).init(2);
                llama2c::to_bytes(&llama2c::Llama2c { cfg, params, format, rope_tables: None }).unwrap()
            })
            .collect();
    fuzz("llama2c", &seeds, |bytes| {
        if let Ok(m) = llama2c::parse(bytes) {
            let _ = llama2c::to_bytes(&m);
        }
    });
}

#[test]
fn fuzz_gguf() {
    use anetrain::checkpoint::gguf::{GgufFile, writer};
    use anetrain::quant::GgmlType;
    let texts = anetrain::corpus::stories(1, 40);
    let tok = anetrain::tokenizer::Tokenizer::train_bpe(&texts, 260).unwrap();
    let mut seeds = Vec::new();
    for (ty, cfg) in [
        (GgmlType::F16, ModelConfig { vocab_size: 260, ..tiny() }),
        (GgmlType::Q8_0, ModelConfig { dim: 32, vocab_size: 260, qk_norm: true, tied_embeddings: false, ..tiny() }),
    ] {
        let dir = scratch("gguf");
        let path = dir.path().join("m.gguf");
        let extras = writer::Extras { tokenizer: Some(&tok), chat_template: Some("{{ x }}"), ..Default::default() };
        writer::save_model(&path, &cfg, &ParamLayout::new(&cfg).init(4), ty, &extras).unwrap();
        seeds.push(std::fs::read(&path).unwrap());
    }
    for ty in ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q4_1"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/gguf/dequant_{ty}.gguf"));
        seeds.push(std::fs::read(path).unwrap());
    }
    fuzz("gguf", &seeds, |bytes| {
        if let Ok(f) = GgufFile::from_bytes(bytes.to_vec(), "fuzz.gguf") {
            for t in &f.header.tensors {
                let mut buf = vec![0.0f32; t.numel() as usize];
                let _ = f.read_f32(t, &mut buf);
            }
            let _ = f.load();
        }
    });
}

#[test]
fn fuzz_hf_config_json() {
    let seeds: Vec<Vec<u8>> = ["stories260k", "qwen3-0.6b"]
        .iter()
        .map(|p| serde_json::to_vec_pretty(&ModelConfig::preset(p).unwrap().to_hf_json()).unwrap())
        .collect();
    fuzz("hf-config", &seeds, |bytes| {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes)
            && let Ok(cfg) = ModelConfig::from_hf_json(&value)
        {
            let _ = ParamLayout::new(&cfg).total;
        }
    });
}

#[test]
fn fuzz_hf_directory() {
    let tmp = scratch("hf");
    let dir = tmp.path().to_path_buf();
    let cfg = ModelConfig { qk_norm: true, ..tiny() };
    hf::save(&dir, &cfg, &ParamLayout::new(&cfg).init(3), anetrain::checkpoint::safetensors::Dtype::F32).unwrap();
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    // Byte 0 picks which file to corrupt; the rest is the mutated file.
    let seeds = vec![[vec![0], config.clone()].concat(), [vec![1], weights.clone()].concat()];
    fuzz("hf-dir", &seeds, |bytes| {
        let Some((&which, rest)) = bytes.split_first() else { return };
        let (c, w) = if which % 2 == 0 { (rest, &weights[..]) } else { (&config[..], rest) };
        std::fs::write(dir.join("config.json"), c).unwrap();
        std::fs::write(dir.join("model.safetensors"), w).unwrap();
        let _ = hf::load(&dir);
    });
}

#[test]
fn fuzz_checkpoint() {
    use anetrain::backend::cpu::CpuBackend;
    use anetrain::ops::Par;
    use anetrain::train::{TrainOptions, Trainer};
    let tmp = scratch("ckpt");
    let dir = tmp.path().to_path_buf();
    let cfg = tiny();
    let data = TokenData::from_vec(anetrain::data::synthetic_tokens(32, 2000, 1), 32, "synthetic").unwrap();
    let opts = TrainOptions {
        steps: 2,
        batch: 1,
        seq: 8,
        accum: 1,
        schedule_lr: 1e-3,
        min_lr: 1e-4,
        warmup: 0,
        adamw: Default::default(),
        grad_clip: 1.0,
        loss_scale: anetrain::train::loss_scale::LossScaleMode::Dynamic,
        eval_every: 0,
        eval_tokens: 0,
        seed: 1,
        lora: None,
        base_bf16: false,
        exact_accum: false,
    };
    let par = Par::seq();
    let mut trainer = Trainer::new(&cfg, opts, par, Box::new(CpuBackend::new(&cfg, 1, 8, par))).unwrap();
    trainer.step(&data, 0).unwrap();
    let step_dir = native::save(&dir, &trainer, 1, &data, 0).unwrap();
    let files = ["state.json", "model.safetensors", "optimizer.safetensors"];
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(step_dir.join(f)).unwrap()).collect();
    let seeds: Vec<Vec<u8>> = originals.iter().enumerate().map(|(i, b)| [vec![i as u8], b.clone()].concat()).collect();
    let restore_into = |path: &Path| {
        if let Ok(ckpt) = native::load(path) {
            let par = Par::seq();
            let mut fresh =
                Trainer::new(&cfg, trainer.opts.clone(), par, Box::new(CpuBackend::new(&cfg, 1, 8, par))).unwrap();
            let _ = ckpt.restore(&mut fresh, &data);
        }
    };
    fuzz("checkpoint", &seeds, |bytes| {
        let Some((&which, rest)) = bytes.split_first() else { return };
        let which = which as usize % files.len();
        for (i, f) in files.iter().enumerate() {
            std::fs::write(step_dir.join(f), if i == which { rest } else { &originals[i][..] }).unwrap();
        }
        restore_into(&dir);
    });
}

#[test]
fn fuzz_token_files() {
    let tmp = scratch("tok");
    let dir = tmp.path().to_path_buf();
    let path = dir.join("tokens.bin");
    let seed: Vec<u8> =
        anetrain::data::synthetic_tokens(500, 300, 2).iter().flat_map(|&t| (t as u16).to_le_bytes()).collect();
    fuzz("tokens", &[seed], |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(data) = TokenData::open_u16(&path, 500) {
            let mut sampler = anetrain::data::Sampler::new(1, 2, 8);
            let (mut x, mut y) = (vec![0; 16], vec![0; 16]);
            let _ = sampler.next_batch(&data, &mut x, &mut y);
        }
    });
}

#[test]
fn fuzz_tokenizer_files() {
    let Some(shared) = shared_data::shared_data("data/tokenizers/llama2") else { return };
    let tmp = scratch("tokenizer");
    let dir = tmp.path().to_path_buf();
    // Byte 0 picks the format; the rest is the mutated file.
    let seeds = vec![
        [vec![0], std::fs::read(shared.join("tokenizer.bin")).unwrap()].concat(),
        [vec![1], std::fs::read(shared.join("tokenizer.model")).unwrap()].concat(),
    ];
    fuzz("tokenizer", &seeds, |bytes| {
        let Some((&which, rest)) = bytes.split_first() else { return };
        let path = dir.join(if which % 2 == 0 { "t.bin" } else { "t.model" });
        std::fs::write(&path, rest).unwrap();
        if let Ok(tok) = anetrain::tokenizer::Tokenizer::load(&path)
            && let Ok(ids) = tok.encode("Hello wörld 123")
        {
            let _ = tok.decode(&ids);
        }
    });
}

#[test]
fn fuzz_mil_programs() {
    use anetrain::mil::emit::{InputLayout, KernelSet};
    use anetrain::mil::sim::Sim;
    use anetrain::ops::Par;
    let cfg = ModelConfig { n_heads: 4, n_kv_heads: 2, head_dim: 8, qk_norm: true, ..tiny() };
    let mut kernels = Vec::new();
    for layout in [InputLayout::Packed, InputLayout::Separate] {
        let set = KernelSet::new(&cfg, 16, layout).unwrap();
        kernels.extend(set.all().into_iter().chain([&set.classifier]).map(|k| k.program.clone()));
    }
    let seeds: Vec<Vec<u8>> = kernels.iter().map(|k| k.mil.clone().into_bytes()).collect();
    fuzz("mil", &seeds, |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else { return };
        if anetrain::mil::parse::parse(text).is_err() {
            return;
        }
        // A program that still parses runs in the simulator (with the original kernel's
        // weight files) or is refused, against zero inputs.
        for k in &kernels {
            let program = anetrain::mil::KernelProgram { mil: text.to_string(), ..k.clone() };
            if let Ok(sim) = Sim::load(&program, Par::seq()) {
                let inputs: Vec<Vec<half::f16>> = k.inputs.iter().map(|s| vec![half::f16::ZERO; s.elems()]).collect();
                let refs: Vec<&[half::f16]> = inputs.iter().map(|v| v.as_slice()).collect();
                let _ = sim.run(&refs);
                return;
            }
        }
    });
}
