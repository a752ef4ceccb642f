//! Kernel-by-kernel comparison of a backend against the `cpu` backend on random inputs:
//! the simulator tests assert on it, and `anetrain ane probe` prints it for the hardware.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, LayerActs, LayerGrads, QkNormGrads};
use crate::config::ModelConfig;
use crate::ops::Par;
use crate::params::ParamLayout;
use crate::rng::Rng;
use anyhow::Result;

/// fp16 tolerances for a kernel output against the f32 `cpu` backend, relative to the
/// reference's magnitude. fp16's unit roundoff is u = 2⁻¹¹ ≈ 4.9e-4: every input is rounded
/// once when staged, every op's output once more, and a kernel output sits at the end of a
/// chain of k ≲ 10 such roundings, each contributing up to u relative to the values that
/// flow through it, so a few u is expected (measured in the simulator: worst max-abs 1.4e-3,
/// worst mean-abs 8.5e-4). Allowed: max-abs ≤ 8e-3 of max |ref| (≈ 16 u: attention's small
/// entries carry errors set by their larger neighbours) and mean-abs ≤ 3e-3 of mean |ref|
/// (≈ 6 u). A wrong transpose, a swapped RoPE half, a wrong GQA mapping or a missing scale
/// gives errors of order 1, failing by two orders of magnitude.
pub const MAX_TOL: f64 = 8e-3;
pub const MEAN_TOL: f64 = 3e-3;

/// One compared output: which kernel produced it, and its error relative to the reference's
/// magnitude (max-abs error / max |ref|, mean-abs error / mean |ref|).
#[derive(Clone, Debug)]
pub struct Row {
    pub kernel: &'static str,
    pub what: &'static str,
    pub max_rel: f64,
    pub mean_rel: f64,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.max_rel <= MAX_TOL && self.mean_rel <= MEAN_TOL
    }
}

pub fn rel_errors(got: &[f32], reference: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), reference.len());
    let (mut max_err, mut sum_err, mut max_ref, mut sum_ref) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &r) in got.iter().zip(reference) {
        // A NaN compares as an infinite error.
        let e = if g.is_finite() { (g as f64 - r as f64).abs() } else { f64::INFINITY };
        max_err = max_err.max(e);
        sum_err += e;
        max_ref = max_ref.max((r as f64).abs());
        sum_ref += (r as f64).abs();
    }
    (max_err / max_ref.max(1e-30), sum_err / sum_ref.max(1e-30))
}

fn randn(rng: &mut Rng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (std * rng.normal()) as f32).collect()
}

fn norm_grads<'a>(on: bool, q: &'a mut [f32], k: &'a mut [f32]) -> QkNormGrads<'a> {
    if on { QkNormGrads { q_norm: Some(q), k_norm: Some(k) } } else { QkNormGrads { q_norm: None, k_norm: None } }
}

/// Runs every kernel method of `backend` and of the `cpu` backend on the same random layer
/// (weights at std 1/√fan-in, gains 1 ± 0.2, activations N(0, 1)); the backward methods
/// both see the cpu forward's saved activations, so each kernel is compared on its own.
pub fn compare_with_cpu(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    backend: &mut dyn Backend,
    seed: u64,
) -> Result<Vec<Row>> {
    let par = Par::seq();
    let mut cpu = CpuBackend::new(cfg, b, t, par);
    let layout = ParamLayout::new(cfg);
    let mut rng = Rng::new(seed);
    let mut params = layout.init(seed);
    for tensor in &layout.tensors {
        let fan_in = *tensor.shape.last().unwrap_or(&1) as f64;
        for x in &mut params[tensor.range()] {
            *x = if tensor.shape.len() == 1 {
                1.0 + (0.2 * rng.normal()) as f32
            } else {
                (rng.normal() / fan_in.sqrt()) as f32
            };
        }
    }
    let w = layout.layer(&params, 0);
    let (n, c, d) = (b * t, cfg.dim, cfg.head_dim);
    let mut rows = Vec::new();
    let mut cmp = |kernel: &'static str, what: &'static str, got: &[f32], want: &[f32]| {
        let (max_rel, mean_rel) = rel_errors(got, want);
        rows.push(Row { kernel, what, max_rel, mean_rel });
    };

    let mut a_cpu = LayerActs::new(cfg, b, t, true)?;
    a_cpu.xn1 = randn(&mut rng, n * c, 1.0);
    a_cpu.xn2 = randn(&mut rng, n * c, 1.0);
    let mut a_dev = LayerActs::new(cfg, b, t, backend.keeps_probs())?;
    a_dev.xn1 = a_cpu.xn1.clone();
    a_dev.xn2 = a_cpu.xn2.clone();
    let (mut o_cpu, mut o_dev) = (vec![0.0; n * c], vec![0.0; n * c]);
    cpu.attention_forward(&mut o_cpu, &mut a_cpu, &w)?;
    backend.attention_forward(&mut o_dev, &mut a_dev, &w)?;
    cmp("attn_fwd", "q (QK-norm, RoPE)", &a_dev.q, &a_cpu.q);
    cmp("attn_fwd", "k (QK-norm, RoPE)", &a_dev.k, &a_cpu.k);
    cmp("attn_fwd", "v", &a_dev.v, &a_cpu.v);
    cmp("attn_fwd", "attn", &a_dev.attn, &a_cpu.attn);
    if cfg.qk_norm {
        cmp("attn_fwd", "q_raw", &a_dev.q_raw, &a_cpu.q_raw);
        cmp("attn_fwd", "k_raw", &a_dev.k_raw, &a_cpu.k_raw);
    }
    cmp("wo_fwd", "o", &o_dev, &o_cpu);

    cpu.ffn_forward(&mut o_cpu, &mut a_cpu, &w)?;
    backend.ffn_forward(&mut o_dev, &mut a_dev, &w)?;
    cmp("ffn_fwd", "h1|h3", &a_dev.h13, &a_cpu.h13);
    cmp("ffn_fwd", "gate", &a_dev.gate, &a_cpu.gate);
    cmp("ffn_fwd", "out", &o_dev, &o_cpu);

    let d_out = randn(&mut rng, n * c, 1.0);
    let (mut g_cpu, mut g_dev) = (LayerGrads::new(cfg, b, t)?, LayerGrads::new(cfg, b, t)?);
    let (mut dx_cpu, mut dx_dev) = (vec![0.0; n * c], vec![0.0; n * c]);
    cpu.ffn_backward_dx(&mut dx_cpu, &mut g_cpu, &d_out, &a_cpu, &w)?;
    backend.ffn_backward_dx(&mut dx_dev, &mut g_dev, &d_out, &a_cpu, &w)?;
    cmp("ffn_bwd_w2t", "dgate", &g_dev.dgate, &g_cpu.dgate);
    cmp("ffn_bwd_w13t", "dh1|dh3", &g_dev.dh13, &g_cpu.dh13);
    cmp("ffn_bwd_w13t", "dxn", &dx_dev, &dx_cpu);

    let (mut qn_cpu, mut kn_cpu, mut qn_dev, mut kn_dev) = (vec![0.0; d], vec![0.0; d], vec![0.0; d], vec![0.0; d]);
    let on = cfg.qk_norm;
    cpu.attention_backward_dx(&mut dx_cpu, &mut g_cpu, norm_grads(on, &mut qn_cpu, &mut kn_cpu), &d_out, &a_cpu, &w)?;
    backend.attention_backward_dx(
        &mut dx_dev,
        &mut g_dev,
        norm_grads(on, &mut qn_dev, &mut kn_dev),
        &d_out,
        &a_cpu,
        &w,
    )?;
    cmp("wo_bwd", "dattn", &g_dev.dattn, &g_cpu.dattn);
    let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
    let cols = |v: &[f32], from: usize, width: usize| -> Vec<f32> {
        v.chunks_exact(qd + 2 * kd).flat_map(|r| r[from..from + width].to_vec()).collect()
    };
    cmp("sdpa_bwd1", "dv", &cols(&g_dev.dqkv, qd + kd, kd), &cols(&g_cpu.dqkv, qd + kd, kd));
    cmp("sdpa_bwd2", "dq", &cols(&g_dev.dqkv, 0, qd), &cols(&g_cpu.dqkv, 0, qd));
    cmp("sdpa_bwd2", "dk", &cols(&g_dev.dqkv, qd, kd), &cols(&g_cpu.dqkv, qd, kd));
    if on {
        cmp("sdpa_bwd2", "q_norm gain grad", &qn_dev, &qn_cpu);
        cmp("sdpa_bwd2", "k_norm gain grad", &kn_dev, &kn_cpu);
    }
    cmp("q_bwd + kv_bwd", "dxn", &dx_dev, &dx_cpu);
    Ok(rows)
}
