//! The MIL path without the hardware: every kernel simulated in fp16 against the `cpu`
//! backend, parser round trips and rejections, golden program text, and training through
//! the simulator.

use anetrain::backend::cpu::CpuBackend;
use anetrain::backend::{Backend, LayerActs, LayerGrads, QkNormGrads};
use anetrain::config::ModelConfig;
use anetrain::mil::backend::MilBackend;
use anetrain::mil::emit::{InputLayout, KernelSet};
use anetrain::mil::parse::parse;
use anetrain::mil::sim::SimRunner;
use anetrain::ops::Par;
use anetrain::params::ParamLayout;
use anetrain::rng::Rng;

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

fn randn(rng: &mut Rng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (std * rng.normal()) as f32).collect()
}

/// Error of a simulated fp16 tensor against the f32 `cpu` result, relative to the
/// reference's own magnitude: (max-abs error / max |ref|, mean-abs error / mean |ref|).
fn rel_errors(sim: &[f32], cpu: &[f32]) -> (f64, f64) {
    assert_eq!(sim.len(), cpu.len());
    let (mut max_err, mut sum_err, mut max_ref, mut sum_ref) = (0f64, 0f64, 0f64, 0f64);
    for (&s, &c) in sim.iter().zip(cpu) {
        let e = (s as f64 - c as f64).abs();
        max_err = max_err.max(e);
        sum_err += e;
        max_ref = max_ref.max((c as f64).abs());
        sum_ref += (c as f64).abs();
    }
    (max_err / max_ref.max(1e-30), sum_err / sum_ref.max(1e-30))
}

/// fp16 tolerances. The unit roundoff of fp16 is u = 2⁻¹¹ ≈ 4.9e-4: every input is rounded
/// once (staging), every op's output once more, and a kernel output sits at the end of a
/// chain of k ≲ 10 such roundings, each contributing up to u relative to the values that
/// flow through it. The expected error is therefore a few u relative to the tensor's scale;
/// we allow max-abs ≤ 8e-3 of max |ref| (≈ 16 u, headroom for attention's chains, whose
/// small entries carry errors set by their larger neighbours) and mean-abs ≤ 3e-3 of
/// mean |ref| (≈ 6 u). A wrong transpose, a swapped half of RoPE, a wrong GQA mapping or a
/// missing scale gives errors of order 1 and fails by two orders of magnitude.
const MAX_TOL: f64 = 8e-3;
const MEAN_TOL: f64 = 3e-3;

fn check(kernel: &str, what: &str, sim: &[f32], cpu: &[f32]) -> (f64, f64) {
    let (max, mean) = rel_errors(sim, cpu);
    assert!(
        max <= MAX_TOL && mean <= MEAN_TOL,
        "{kernel}: {what}: max-abs error {max:.2e} (limit {MAX_TOL:.0e}), mean-abs {mean:.2e} (limit {MEAN_TOL:.0e}) of the reference magnitude"
    );
    (max, mean)
}

fn norm_grads<'a>(on: bool, q: &'a mut [f32], k: &'a mut [f32]) -> QkNormGrads<'a> {
    if on { QkNormGrads { q_norm: Some(q), k_norm: Some(k) } } else { QkNormGrads { q_norm: None, k_norm: None } }
}

fn kernels_match_cpu(name: &str, layout: InputLayout) {
    let cfg = tiny(name);
    let (b, t) = (2, 20); // T = 20 pads to S = 32: padding is exercised
    let par = Par::seq();
    let mut cpu = CpuBackend::new(&cfg, b, t, par);
    let mut sim = MilBackend::new(&cfg, b, t, layout, Box::new(SimRunner::new(par))).unwrap();
    let layout_p = ParamLayout::new(&cfg);
    let mut rng = Rng::new(7);
    // Weights at the scale of a trained model (std 1/√fan-in), gains 1 ± 0.2.
    let mut params = layout_p.init(3);
    for tensor in &layout_p.tensors {
        let fan_in = *tensor.shape.last().unwrap() as f64;
        for x in &mut params[tensor.range()] {
            *x = if tensor.shape.len() == 1 {
                1.0 + (0.2 * rng.normal()) as f32
            } else {
                (rng.normal() / fan_in.sqrt()) as f32
            };
        }
    }
    let w = layout_p.layer(&params, 0);
    let (n, c) = (b * t, cfg.dim);

    let mut a_cpu = LayerActs::new(&cfg, b, t);
    a_cpu.xn1 = randn(&mut rng, n * c, 1.0);
    a_cpu.xn2 = randn(&mut rng, n * c, 1.0);
    let mut a_sim = LayerActs::new(&cfg, b, t);
    a_sim.xn1 = a_cpu.xn1.clone();
    a_sim.xn2 = a_cpu.xn2.clone();
    let (mut o_cpu, mut o_sim) = (vec![0.0; n * c], vec![0.0; n * c]);
    let mut report = Vec::new();

    cpu.attention_forward(&mut o_cpu, &mut a_cpu, &w).unwrap();
    sim.attention_forward(&mut o_sim, &mut a_sim, &w).unwrap();
    report.push(check("attn_fwd", "q (after QK-norm, RoPE)", &a_sim.q, &a_cpu.q));
    report.push(check("attn_fwd", "k", &a_sim.k, &a_cpu.k));
    report.push(check("attn_fwd", "v", &a_sim.v, &a_cpu.v));
    report.push(check("attn_fwd", "attn", &a_sim.attn, &a_cpu.attn));
    if cfg.qk_norm {
        report.push(check("attn_fwd", "q_raw", &a_sim.q_raw, &a_cpu.q_raw));
        report.push(check("attn_fwd", "k_raw", &a_sim.k_raw, &a_cpu.k_raw));
        report.push(check("attn_fwd", "q_rstd", &a_sim.q_rstd, &a_cpu.q_rstd));
    }
    report.push(check("wo_fwd", "o", &o_sim, &o_cpu));

    cpu.ffn_forward(&mut o_cpu, &mut a_cpu, &w).unwrap();
    sim.ffn_forward(&mut o_sim, &mut a_sim, &w).unwrap();
    report.push(check("ffn_fwd", "h13", &a_sim.h13, &a_cpu.h13));
    report.push(check("ffn_fwd", "gate", &a_sim.gate, &a_cpu.gate));
    report.push(check("ffn_fwd", "out", &o_sim, &o_cpu));

    // Backward kernels see the same (f32, cpu) saved activations, so each is checked alone.
    let d_out = randn(&mut rng, n * c, 1.0);
    let (mut g_cpu, mut g_sim) = (LayerGrads::new(&cfg, b, t), LayerGrads::new(&cfg, b, t));
    let (mut dx_cpu, mut dx_sim) = (vec![0.0; n * c], vec![0.0; n * c]);
    cpu.ffn_backward_dx(&mut dx_cpu, &mut g_cpu, &d_out, &a_cpu, &w).unwrap();
    sim.ffn_backward_dx(&mut dx_sim, &mut g_sim, &d_out, &a_cpu, &w).unwrap();
    report.push(check("ffn_bwd_w2t", "dgate", &g_sim.dgate, &g_cpu.dgate));
    report.push(check("ffn_bwd_w13t", "dh13", &g_sim.dh13, &g_cpu.dh13));
    report.push(check("ffn_bwd_w13t", "dxn", &dx_sim, &dx_cpu));

    let d = cfg.head_dim;
    let (mut qn_cpu, mut kn_cpu, mut qn_sim, mut kn_sim) = (vec![0.0; d], vec![0.0; d], vec![0.0; d], vec![0.0; d]);
    cpu.attention_backward_dx(
        &mut dx_cpu,
        &mut g_cpu,
        norm_grads(cfg.qk_norm, &mut qn_cpu, &mut kn_cpu),
        &d_out,
        &a_cpu,
        &w,
    )
    .unwrap();
    sim.attention_backward_dx(
        &mut dx_sim,
        &mut g_sim,
        norm_grads(cfg.qk_norm, &mut qn_sim, &mut kn_sim),
        &d_out,
        &a_cpu,
        &w,
    )
    .unwrap();
    report.push(check("wo_bwd", "dattn", &g_sim.dattn, &g_cpu.dattn));
    let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
    let cols = |v: &[f32], from: usize, width: usize| -> Vec<f32> {
        v.chunks_exact(qd + 2 * kd).flat_map(|r| r[from..from + width].to_vec()).collect()
    };
    report.push(check("sdpa_bwd1", "dv", &cols(&g_sim.dqkv, qd + kd, kd), &cols(&g_cpu.dqkv, qd + kd, kd)));
    report.push(check("sdpa_bwd2", "dq", &cols(&g_sim.dqkv, 0, qd), &cols(&g_cpu.dqkv, 0, qd)));
    report.push(check("sdpa_bwd2", "dk", &cols(&g_sim.dqkv, qd, kd), &cols(&g_cpu.dqkv, qd, kd)));
    if cfg.qk_norm {
        report.push(check("sdpa_bwd2 + cpu", "q_norm gain grad", &qn_sim, &qn_cpu));
        report.push(check("sdpa_bwd2 + cpu", "k_norm gain grad", &kn_sim, &kn_cpu));
    }
    report.push(check("q_bwd + kv_bwd", "dxn", &dx_sim, &dx_cpu));
    let worst = report.iter().fold((0f64, 0f64), |a, r| (a.0.max(r.0), a.1.max(r.1)));
    println!("{name} {layout:?}: worst max-abs {:.2e}, worst mean-abs {:.2e}", worst.0, worst.1);
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
