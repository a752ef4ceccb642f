//! The two tiny model shapes the MIL tests share (included by path, as `shared_data.rs`).
#![allow(dead_code)]

use anetrain::config::ModelConfig;

/// `"mha"`: MHA, head_dim 8 = 32 / 4. `"gqa-qknorm"`: GQA 4/2, QK-norm, head_dim 10 ≠ 24 / 4,
/// Qwen3's θ and eps, untied classifier (every baked piece kind: WeightT, Weight, Column).
/// `"mha-linear-rope"`: `"mha"` with linear RoPE scaling.
pub fn tiny(name: &str) -> ModelConfig {
    let base = ModelConfig::preset("stories260k").unwrap();
    match name {
        "mha" => ModelConfig { dim: 32, ffn_dim: 48, n_layers: 2, n_heads: 4, n_kv_heads: 4, head_dim: 8, ..base },
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
        // Linear RoPE scaling (factor 2.5) on the MHA shape.
        "mha-linear-rope" => {
            ModelConfig { rope_scaling: Some(anetrain::config::RopeScaling::Linear { factor: 2.5 }), ..tiny("mha") }
        }
        other => panic!("no tiny model '{other}'"),
    }
}
