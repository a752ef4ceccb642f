//! The MIL path without the hardware: every kernel simulated in fp16 against the `cpu`
//! backend, parser round trips and rejections, golden program text, and training through
//! the simulator.

use anetrain::config::ModelConfig;
use anetrain::mil::backend::MilBackend;
use anetrain::mil::check::{MAX_TOL, MEAN_TOL, compare_with_cpu};
use anetrain::mil::emit::{InputLayout, KernelSet};
use anetrain::mil::parse::parse;
use anetrain::mil::sim::SimRunner;
use anetrain::ops::Par;

fn tiny(name: &str) -> ModelConfig {
    let base = ModelConfig::preset("stories260k").unwrap();
    match name {
        "mha" => ModelConfig { dim: 32, ffn_dim: 48, n_layers: 2, n_heads: 4, n_kv_heads: 4, head_dim: 8, ..base },
        // GQA 4/2, QK-norm, head_dim 10 ≠ 24 / 4, Qwen3's θ and eps.
        "gqa-qknorm" => ModelConfig {
            dim: 24,
            ffn_dim: 40,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 10,
            rope_theta: 1e6,
            norm_eps: 1e-6,
            qk_norm: true,
            tied_embeddings: false,
            ..base
        },
        _ => unreachable!(),
    }
}

fn kernels_match_cpu(name: &str, layout: InputLayout) {
    let cfg = tiny(name);
    let (b, t) = (2, 20); // T = 20 pads to S = 32: padding is exercised
    let mut sim = MilBackend::new(&cfg, b, t, layout, Box::new(SimRunner::new(Par::seq()))).unwrap();
    let rows = compare_with_cpu(&cfg, b, t, &mut sim, 7).unwrap();
    assert!(rows.len() >= 15, "every kernel compared");
    for r in &rows {
        println!("{name} {layout:?} {:>14} {:<18} max {:.2e} mean {:.2e}", r.kernel, r.what, r.max_rel, r.mean_rel);
    }
    for r in &rows {
        assert!(
            r.ok(),
            "{}: {}: max-abs error {:.2e} (limit {MAX_TOL:.0e}), mean-abs {:.2e} (limit {MEAN_TOL:.0e}) of the reference magnitude",
            r.kernel,
            r.what,
            r.max_rel,
            r.mean_rel
        );
    }
}

#[test]
fn kernels_match_cpu_mha_packed() {
    kernels_match_cpu("mha", InputLayout::Packed);
}

#[test]
fn kernels_match_cpu_mha_separate() {
    kernels_match_cpu("mha", InputLayout::Separate);
}

#[test]
fn kernels_match_cpu_gqa_qknorm_packed() {
    kernels_match_cpu("gqa-qknorm", InputLayout::Packed);
}

#[test]
fn kernels_match_cpu_gqa_qknorm_separate() {
    kernels_match_cpu("gqa-qknorm", InputLayout::Separate);
}
