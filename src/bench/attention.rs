//! `anetrain bench attention`: the attention core (QKᵀ, causal softmax, PV and their
//! backward; not the projections) at a model's heads and a B, T, on the f32 products and on
//! the bf16 ones `--bf16-matmul` runs, each direction timed alone, alternating f32 and bf16
//! per direction so both see the same machine load.

use super::time_median;
use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::attention::bf16::{attention_backward_bf16, attention_forward_bf16};
use crate::ops::attention::{AttnBackwardScratch, AttnDims, attention_backward, attention_forward};
use crate::rng::Rng;
use anyhow::Result;
use serde::Serialize;

/// One timed direction of one path.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionRow {
    /// "f32" or "bf16"
    pub path: String,
    /// "forward" or "backward"
    pub direction: String,
    /// Median ms of one layer's call.
    pub ms: f64,
    /// ms per training micro-step (one call per layer).
    pub step_ms: f64,
    /// GFLOP/s over the products the causal blocking computes.
    pub gflops: f64,
}

/// What `anetrain bench attention` prints.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionReport {
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    /// Whether the bf16 rows ran on AVX-512 BF16 (otherwise on the portable kernel).
    pub bf16_fast: bool,
    pub rows: Vec<AttentionRow>,
}

/// Multiply-adds × 2 of one forward call as the causal blocks of 64 compute them: per query
/// head and block `[r0, r1)`, q·kᵀ and p·v are each rows × r1 × D. Backward is twice this.
fn forward_flops(dims: AttnDims) -> f64 {
    let block = 64;
    let per_head: usize = (0..dims.t.div_ceil(block))
        .map(|i| (dims.t.min((i + 1) * block) - i * block) * dims.t.min((i + 1) * block))
        .sum();
    (dims.b * dims.h * per_head * dims.d * 4) as f64
}

/// Times the attention core of `cfg` at `batch × seq` inside the caller's pool, ~`budget`
/// seconds per direction and path.
pub fn bench_attention(cfg: &ModelConfig, batch: usize, seq: usize, budget: f64, par: Par) -> Result<AttentionReport> {
    let dims = AttnDims { b: batch, t: seq, h: cfg.n_heads, kv: cfg.n_kv_heads, d: cfg.head_dim };
    let n = batch * seq;
    let (qw, kw) = (dims.h * dims.d, dims.kv * dims.d);
    let mem = crate::memory::f32_bytes;
    crate::memory::Estimate::new()
        .add("the attention probabilities and dS", mem(&[2, dims.probs_len()]))
        .add("q, dout, dq, the output and head-major scratch", mem(&[5, n, qw]))
        .add("k, v and their gradients", mem(&[6, n, kw]))
        .ensure("bench attention", "lower --batch or --seq")?;
    let buf = |len: usize, what: &str| crate::memory::try_vec_f32(len, what);
    let mut probs = buf(dims.probs_len(), "the attention probabilities")?;
    let mut ds = buf(dims.probs_len(), "the attention dS scratch")?;
    let (mut q, mut k, mut v, mut dout) =
        (buf(n * qw, "q")?, buf(n * kw, "k")?, buf(n * kw, "v")?, buf(n * qw, "dout")?);
    let (mut out, mut hm) = (buf(n * qw, "attention output")?, buf(n * qw, "head-major scratch")?);
    let (mut dq, mut dk, mut dv) = (buf(n * qw, "dq")?, buf(n * kw, "dk")?, buf(n * kw, "dv")?);
    let (mut dk_hm, mut dv_hm) = (buf(n * kw, "dk scratch")?, buf(n * kw, "dv scratch")?);
    // Unit-variance q, k, v (scores of order 1 after the 1/√D scale); small output gradients.
    let mut rng = Rng::new(11);
    for (x, s) in [(&mut q, 1.0), (&mut k, 1.0), (&mut v, 1.0), (&mut dout, 0.01)] {
        x.iter_mut().for_each(|e| *e = (rng.normal() * s) as f32);
    }
    let fwd = forward_flops(dims);
    let mut rows = Vec::new();
    let mut row = |path: &str, direction: &str, secs: f64, flops: f64| {
        rows.push(AttentionRow {
            path: path.into(),
            direction: direction.into(),
            ms: secs * 1e3,
            step_ms: secs * 1e3 * cfg.n_layers as f64,
            gflops: flops / secs / 1e9,
        })
    };
    let (qkv, d) = ((&q[..], &k[..], &v[..]), dims);
    let t = time_median(budget, || attention_forward(par, &mut out, &mut probs, &mut hm, qkv.0, qkv.1, qkv.2, d));
    row("f32", "forward", t, fwd);
    let t = time_median(budget, || attention_forward_bf16(&mut out, &mut probs, &mut hm, qkv.0, qkv.1, qkv.2, d));
    row("bf16", "forward", t, fwd);
    // Backward reads the probabilities the bf16 forward left (the same values to bf16's
    // rounding; the work does not depend on them).
    let t = time_median(budget, || {
        let scratch = AttnBackwardScratch { ds: &mut ds, dq_hm: &mut hm, dk_hm: &mut dk_hm, dv_hm: &mut dv_hm };
        attention_backward(par, &mut dq, &mut dk, &mut dv, scratch, &dout, &probs, qkv.0, qkv.1, qkv.2, d)
    });
    row("f32", "backward", t, 2.0 * fwd);
    let t = time_median(budget, || {
        let scratch = AttnBackwardScratch { ds: &mut ds, dq_hm: &mut hm, dk_hm: &mut dk_hm, dv_hm: &mut dv_hm };
        attention_backward_bf16(&mut dq, &mut dk, &mut dv, scratch, &dout, &probs, qkv.0, qkv.1, qkv.2, d)
    });
    row("bf16", "backward", t, 2.0 * fwd);
    Ok(AttentionReport {
        model: cfg.name.clone(),
        batch,
        seq,
        threads: par.threads,
        bf16_fast: crate::ops::gemm_bf16::available(),
        rows,
    })
}

impl AttentionReport {
    pub fn print(&self) {
        println!(
            "attention core at {} heads, B = {}, T = {}, {} threads (median; bf16 on {})",
            self.model,
            self.batch,
            self.seq,
            self.threads,
            if self.bf16_fast { "AVX-512 BF16" } else { "the portable kernel" }
        );
        println!("{:<6} {:<9} {:>9} {:>12} {:>9}", "path", "direction", "ms/call", "ms/step", "GFLOP/s");
        for r in &self.rows {
            println!("{:<6} {:<9} {:>9.2} {:>12.1} {:>9.1}", r.path, r.direction, r.ms, r.step_ms, r.gflops);
        }
    }
}
