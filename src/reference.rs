//! The whole model in f64 from the ops' naive references: no saved activations, no
//! workspaces, no parallelism. It exists to be obviously right; tests compare the fast f32
//! model's loss and gradients (by central differences of this function) against it.

use crate::config::ModelConfig;
use crate::ops::attention::{AttnDims, attention_forward_slow};
use crate::ops::cross_entropy::cross_entropy_slow;
use crate::ops::matmul::{bias_forward_slow, matmul_forward_slow};
use crate::ops::rmsnorm::rmsnorm_forward_slow;
use crate::ops::rope::{inv_freq_f64, rope_forward_slow};
use crate::ops::swiglu::swiglu_forward_slow;
use crate::params::ParamLayout;

/// Mean cross-entropy of `targets` given `tokens` (`[B·T]` each) under `params` (f64 copy of
/// the arena, same layout).
pub fn loss_slow(cfg: &ModelConfig, params: &[f64], tokens: &[u32], targets: &[u32], b: usize, t: usize) -> f64 {
    let layout = ParamLayout::new(cfg);
    let view = |i: usize| &params[layout.tensors[i].range()];
    let (n, c, f, v) = (b * t, cfg.dim, cfg.ffn_dim, cfg.vocab_size);
    let (h, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let (qd, kd, eps) = (cfg.q_dim(), cfg.kv_dim(), cfg.norm_eps);
    let embed = view(layout.embed);
    let mut x: Vec<f64> = tokens.iter().flat_map(|&tok| embed[tok as usize * c..][..c].to_vec()).collect();
    let find = |l: usize, suffix: &str| {
        let name = format!("model.layers.{l}.{suffix}");
        &params[layout.find(&name).expect("tensor").range()]
    };
    for l in 0..cfg.n_layers {
        let mut xn = vec![0.0; n * c];
        rmsnorm_forward_slow(&mut xn, &x, find(l, "input_layernorm.weight"), n, c, eps);
        let mut q = vec![0.0; n * qd];
        let mut k = vec![0.0; n * kd];
        let mut val = vec![0.0; n * kd];
        matmul_forward_slow(&mut q, &xn, find(l, "self_attn.q_proj.weight"), n, c, qd);
        matmul_forward_slow(&mut k, &xn, find(l, "self_attn.k_proj.weight"), n, c, kd);
        matmul_forward_slow(&mut val, &xn, find(l, "self_attn.v_proj.weight"), n, c, kd);
        if cfg.qkv_bias {
            for (out, w, name) in [(&mut q, qd, "q_proj"), (&mut k, kd, "k_proj"), (&mut val, kd, "v_proj")] {
                let bias = find(l, &format!("self_attn.{name}.bias"));
                debug_assert_eq!(bias.len(), w);
                bias_forward_slow(out, bias);
            }
        }
        if cfg.qk_norm {
            let q_in = q.clone();
            rmsnorm_forward_slow(&mut q, &q_in, find(l, "self_attn.q_norm.weight"), n * h, d, eps);
            let k_in = k.clone();
            rmsnorm_forward_slow(&mut k, &k_in, find(l, "self_attn.k_norm.weight"), n * kv, d, eps);
        }
        let (q_in, k_in) = (q.clone(), k.clone());
        let freqs = inv_freq_f64(d, cfg.rope_theta, cfg.rope_scaling.as_ref());
        rope_forward_slow(&mut q, &q_in, n, t, h, d, &freqs);
        rope_forward_slow(&mut k, &k_in, n, t, kv, d, &freqs);
        let mut attn = vec![0.0; n * qd];
        attention_forward_slow(&mut attn, &q, &k, &val, AttnDims { b, t, h, kv, d });
        let mut o = vec![0.0; n * c];
        matmul_forward_slow(&mut o, &attn, find(l, "self_attn.o_proj.weight"), n, qd, c);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

        rmsnorm_forward_slow(&mut xn, &x, find(l, "post_attention_layernorm.weight"), n, c, eps);
        let mut h1 = vec![0.0; n * f];
        let mut h3 = vec![0.0; n * f];
        matmul_forward_slow(&mut h1, &xn, find(l, "mlp.gate_proj.weight"), n, c, f);
        matmul_forward_slow(&mut h3, &xn, find(l, "mlp.up_proj.weight"), n, c, f);
        let mut gate = vec![0.0; n * f];
        swiglu_forward_slow(&mut gate, &h1, &h3);
        matmul_forward_slow(&mut o, &gate, find(l, "mlp.down_proj.weight"), n, f, c);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
    let mut xf = vec![0.0; n * c];
    rmsnorm_forward_slow(&mut xf, &x, view(layout.final_norm), n, c, eps);
    let mut logits = vec![0.0; n * v];
    matmul_forward_slow(&mut logits, &xf, view(layout.classifier()), n, c, v);
    cross_entropy_slow(&logits, targets, v)
}
