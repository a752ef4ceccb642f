//! Benchmarks run as commands (`anetrain bench gemm`, `anetrain bench step`), never as tests:
//! GEMM throughput at a model's exact shapes per implementation, and the cost of a training
//! micro-step split by phase.

pub mod attention;
pub mod lora_gemm;

use crate::config::ModelConfig;
use crate::data::TokenData;
use crate::ops::Par;
use crate::ops::matmul::{GemmImpl, Operand, sgemm};
use crate::rng::Rng;
use crate::train::trainer::median;
use crate::train::{TrainOptions, Trainer};
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// One product `c[m×n] (+)= a[m×k]·b[k×n]` as the model issues it.
#[derive(Clone, Debug, Serialize)]
pub struct GemmShape {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub accumulate: bool,
    /// How many times one training micro-step issues it.
    pub per_step: usize,
}

impl GemmShape {
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }
}

/// Every distinct GEMM of one training micro-step (forward, dx, dW) at N = B·T rows.
pub fn model_gemm_shapes(cfg: &ModelConfig, n: usize) -> Vec<GemmShape> {
    let (c, f, qd, kd, v, l) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size, cfg.n_layers);
    // (name, in K, out, count per step)
    let linears = [
        ("qkv_proj", c, qd + 2 * kd, l),
        ("o_proj", qd, c, l),
        ("gate_up_proj", c, 2 * f, l),
        ("down_proj", f, c, l),
        ("classifier", c, v, 1),
    ];
    let mut shapes = Vec::new();
    for (name, k_in, out, count) in linears {
        let s = |suffix: &str, m, nn, kk, ta, tb, acc| GemmShape {
            name: format!("{name} {suffix}"),
            m,
            n: nn,
            k: kk,
            trans_a: ta,
            trans_b: tb,
            accumulate: acc,
            per_step: count,
        };
        shapes.push(s("fwd", n, out, k_in, false, true, false));
        shapes.push(s("dx", n, k_in, out, false, false, false));
        shapes.push(s("dW", out, k_in, n, true, false, true));
    }
    shapes
}

/// Median seconds of `f` over enough repetitions to fill ~`budget_s` (at least 3).
pub fn time_median(budget_s: f64, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page faults, packing buffers, thread wake-up
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || (start.elapsed().as_secs_f64() < budget_s && samples.len() < 200) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    median(&mut samples)
}

/// GFLOP/s of one shape with one implementation.
pub fn bench_gemm_shape(shape: &GemmShape, par: Par, budget_s: f64) -> f64 {
    let mut rng = Rng::new(1);
    let mut rand = |len: usize| (0..len).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let (m, n, k) = (shape.m, shape.n, shape.k);
    let a = rand(m * k);
    let b = rand(k * n);
    let mut c = rand(m * n);
    let (ta, tb) = (shape.trans_a, shape.trans_b);
    // Leading dimensions of the stored (possibly transposed) operands.
    let lda = if ta { m } else { k };
    let ldb = if tb { k } else { n };
    let secs = time_median(budget_s, || {
        let a_op = Operand { data: &a, trans: ta, ld: lda };
        let b_op = Operand { data: &b, trans: tb, ld: ldb };
        sgemm(par, m, n, k, a_op, b_op, &mut c, n, shape.accumulate);
    });
    shape.flops() / secs / 1e9
}

/// The machine's practical SGEMM peak with `par` (the run's own thread count), the
/// denominator of "share of peak": the best of square 256³, 512³ and 1024³ products, each
/// the fastest of its repetitions over `budget_s` / 3, so a noisy neighbour or a cold cache
/// lowers it as little as possible. A run's own GEMMs can still beat it now and then
/// (cache-resident shapes, turbo); `share_of_peak` caps the figure and says so.
pub fn gemm_peak_gflops(par: Par, budget_s: f64) -> f64 {
    [256, 512, 1024]
        .into_iter()
        .map(|d| {
            let shape = GemmShape {
                name: format!("{d}^3"),
                m: d,
                n: d,
                k: d,
                trans_a: false,
                trans_b: false,
                accumulate: false,
                per_step: 1,
            };
            let (a, b) = (vec![1.0f32; d * d], vec![1.0f32; d * d]);
            let mut c = vec![0.0f32; d * d];
            let secs = time_best(budget_s / 3.0, || {
                let a_op = Operand { data: &a, trans: false, ld: d };
                let b_op = Operand { data: &b, trans: false, ld: d };
                sgemm(par, d, d, d, a_op, b_op, &mut c, d, false);
            });
            shape.flops() / secs / 1e9
        })
        .fold(0.0, f64::max)
}

/// Fastest seconds of `f` over repetitions filling ~`budget_s` (at least 5, after a warm-up).
pub fn time_best(budget_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let (mut best, mut reps, start) = (f64::INFINITY, 0, Instant::now());
    while reps < 5 || (start.elapsed().as_secs_f64() < budget_s && reps < 500) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    best
}

/// `"42% of peak"`, or above 100% `"100% of peak (capped: measured 119%, …)"`: the figure
/// for a report line, never above 100.
pub fn share_of_peak(achieved_gflops: f64, peak_gflops: f64) -> String {
    let share = 100.0 * achieved_gflops / peak_gflops;
    if share.is_finite() && share <= 100.0 {
        format!("{share:.0}% of peak")
    } else {
        format!(
            "100% of peak (capped: measured {share:.0}%; this run's GEMMs beat the square-GEMM benchmark, \
             so the peak is underestimated on this machine)"
        )
    }
}

/// Result of `anetrain bench step`.
#[derive(Clone, Debug, Serialize)]
pub struct StepBench {
    pub model: String,
    pub backend: String,
    pub threads: usize,
    pub batch: usize,
    pub seq: usize,
    pub accum: usize,
    pub params: usize,
    pub timed_micro_steps: usize,
    pub median_micro_ms: f64,
    pub median_forward_ms: f64,
    pub median_backward_ms: f64,
    pub median_optimizer_ms: f64,
    /// The per-layer dW GEMMs ran on a worker thread beside the backend's kernels.
    pub dw_overlap: bool,
    /// Per micro-step: time in backend kernels, in the per-layer dW GEMMs (on whichever
    /// thread), and blocked on the dW worker.
    pub median_kernel_ms: f64,
    pub median_dw_ms: f64,
    pub median_dw_wait_ms: f64,
    /// Per-token cost including the optimizer amortised over `accum` micro-steps.
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub peak_rss_mb: f64,
}

/// Warm-up updates, then timed updates until at least `min_micro` micro-steps were measured.
/// `dw_overlap` forces dW overlap on or off (`None`: the backend's default).
pub fn bench_step(
    cfg: &ModelConfig,
    opts: TrainOptions,
    par: Par,
    min_micro: usize,
    dw_overlap: Option<bool>,
    backend: Box<dyn crate::backend::Backend>,
) -> Result<StepBench> {
    let data = TokenData::from_vec(
        crate::data::synthetic_tokens(cfg.vocab_size, (opts.batch * (opts.seq + 1) * 64).max(1 << 16), opts.seed),
        cfg.vocab_size,
        "synthetic",
    )?;
    let (accum, batch, seq) = (opts.accum, opts.batch, opts.seq);
    let mut trainer = Trainer::new(cfg, opts, par, backend)?;
    if let Some(on) = dw_overlap {
        trainer.model.set_dw_overlap(on)?;
    }
    trainer.step(&data, 0)?; // warm-up: first-touch of every buffer, optimizer state
    let (mut micro, mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut kernels, mut dw, mut dw_wait) = (Vec::new(), Vec::new(), Vec::new());
    let mut step = 1;
    while micro.len() < min_micro {
        let ev = trainer.step(&data, step)?;
        step += 1;
        let per_micro = (ev.ms_step - ev.ms_optimizer) / accum as f64;
        for _ in 0..accum {
            micro.push(per_micro);
        }
        fwd.push(ev.ms_forward / accum as f64);
        bwd.push(ev.ms_backward / accum as f64);
        kernels.push(ev.ms_kernels / accum as f64);
        dw.push(ev.ms_dw / accum as f64);
        dw_wait.push(ev.ms_dw_wait / accum as f64);
        opt.push(ev.ms_optimizer);
    }
    let median_micro_ms = median(&mut micro);
    let median_optimizer_ms = median(&mut opt);
    let step_s = (median_micro_ms * accum as f64 + median_optimizer_ms) / 1e3;
    let tokens_per_s = (batch * seq * accum) as f64 / step_s;
    Ok(StepBench {
        model: cfg.name.clone(),
        backend: trainer.model.backend_name().into(),
        threads: par.threads,
        batch,
        seq,
        accum,
        params: cfg.param_count(),
        timed_micro_steps: micro.len(),
        median_micro_ms,
        median_forward_ms: median(&mut fwd),
        median_backward_ms: median(&mut bwd),
        median_optimizer_ms,
        dw_overlap: trainer.model.dw_overlap(),
        median_kernel_ms: median(&mut kernels),
        median_dw_ms: median(&mut dw),
        median_dw_wait_ms: median(&mut dw_wait),
        tokens_per_s,
        gflops: cfg.train_flops_per_token(seq) * tokens_per_s / 1e9,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// Peak resident set size of this process in MB (Linux `VmHWM`; NaN where unavailable).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn impls_to_bench(choice: Option<GemmImpl>) -> Vec<GemmImpl> {
    match choice {
        Some(g) => vec![g],
        None => {
            [GemmImpl::Gemm, GemmImpl::Matrixmultiply, GemmImpl::Blas].into_iter().filter(|g| g.available()).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_of_peak_never_exceeds_100_percent() {
        assert_eq!(share_of_peak(42.0, 100.0), "42% of peak");
        let capped = share_of_peak(119.0, 100.0);
        assert!(capped.starts_with("100% of peak (capped: measured 119%;"), "{capped}");
        assert!(share_of_peak(1.0, 0.0).starts_with("100% of peak (capped"));
    }
}
