//! Loading the HF golden fixtures that `tools/make_fixtures.py` writes into tests/fixtures/:
//! the model directory (config.json, model.safetensors), the batch and PyTorch's results
//! (fixture.safetensors) and the scalars (fixture.json). Included by path
//! (`#[path = "common/hf_fixture.rs"] mod hf_fixture;`) from tests/hf_fixtures.rs and
//! tests/lora.rs, so there is one definition.
#![allow(dead_code)]

use anetrain::checkpoint::hf;
use anetrain::checkpoint::safetensors::SafeTensors;
use anetrain::config::ModelConfig;
use anetrain::ops::cross_entropy::IGNORE;
use serde_json::Value;
use std::path::PathBuf;

/// tests/fixtures/ of this crate.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One HF fixture: the model, its batch (PyTorch's −100 targets mapped to `IGNORE`), the
/// tensors PyTorch computed and the scalars.
pub struct HfFixture {
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
    /// `[B·T]`
    pub tokens: Vec<u32>,
    /// `[B·T]`
    pub targets: Vec<u32>,
    pub tensors: SafeTensors,
    pub meta: Value,
}

/// Reads tests/fixtures/`name`; panics naming the fixture on any error.
pub fn load(name: &str) -> HfFixture {
    let dir = fixtures().join(name);
    let (cfg, params) = hf::load(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let tensors = SafeTensors::open(&dir.join("fixture.safetensors")).unwrap();
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    let (batch, seq) = (meta["batch"].as_u64().unwrap() as usize, meta["seq"].as_u64().unwrap() as usize);
    let tokens: Vec<u32> = tensors.read_i64("tokens").unwrap().iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> =
        tensors.read_i64("targets").unwrap().iter().map(|&x| if x == -100 { IGNORE } else { x as u32 }).collect();
    assert_eq!(tokens.len(), batch * seq, "{name}: batch shape");
    HfFixture { cfg, params, batch, seq, tokens, targets, tensors, meta }
}

pub fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64))
}

pub fn max_err(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs() as f64))
}

/// The 2-thread pool the fixtures' tolerances were measured with.
pub fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap()
}
