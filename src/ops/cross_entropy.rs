//! Mean token cross-entropy over logits `[N, V]`, skipping targets equal to `IGNORE`.

use super::exp::{exp, wide_fn};
use rayon::prelude::*;

/// Target id that contributes neither loss nor gradient (HF's -100).
pub const IGNORE: u32 = u32::MAX;

/// Per-row loss `lse(logits) − logits[target]` into losses `[N]` (0 for ignored rows).
pub fn cross_entropy_forward(losses: &mut [f32], logits: &[f32], targets: &[u32], v: usize) {
    losses.par_iter_mut().zip(logits.par_chunks(v)).zip(targets).for_each(|((loss, row), &tgt)| {
        *loss = if tgt == IGNORE { 0.0 } else { (log_sum_exp(row) - row[tgt as usize] as f64) as f32 };
    });
}

/// Lanes of the row reductions: independent accumulators so the loops vectorise (the
/// summation order is fixed, so results do not depend on the machine).
const LANES: usize = 16;

wide_fn! {
    /// In f64: an f32 running sum over a 49152-entry vocabulary drifts by ~3e-5 of the loss
    /// (measured on SmolLM2 against transformers, which matches the f64 reference to 1e-8),
    /// and `lse − logit` cancels most of lse's magnitude. The terms are f32 `exp` (≤ 2 ulp,
    /// `super::exp`), summed in `LANES` f64 partial sums.
    fn log_sum_exp(row: &[f32]) -> f64 {
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        let mut m = [f32::NEG_INFINITY; LANES];
        for c in chunks.clone() {
            for i in 0..LANES {
                m[i] = m[i].max(c[i]);
            }
        }
        let max = m.iter().chain(tail).fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let mut acc = [0.0f64; LANES];
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp(c[i] - max) as f64;
            }
        }
        let sum = acc.iter().sum::<f64>() + tail.iter().map(|&x| exp(x - max) as f64).sum::<f64>();
        max as f64 + sum.ln()
    }
}

/// Fused forward and backward, overwriting `logits` with `dlogits` to save a `[N, V]` buffer.
/// For the mean over `count` non-ignored rows, `∂loss/∂logits = (softmax − onehot(target)) /
/// count`; `dscale` is `loss_scale / count`. Ignored rows get zero gradient.
pub fn cross_entropy_fused(losses: &mut [f32], logits: &mut [f32], targets: &[u32], v: usize, dscale: f32) {
    losses.par_iter_mut().zip(logits.par_chunks_mut(v)).zip(targets).for_each(|((loss, row), &tgt)| {
        if tgt == IGNORE {
            *loss = 0.0;
            row.fill(0.0);
            return;
        }
        let lse64 = log_sum_exp(row);
        *loss = (lse64 - row[tgt as usize] as f64) as f32;
        let lse = lse64 as f32;
        softmax_scaled(row, lse, dscale);
        row[tgt as usize] -= dscale;
    });
}

wide_fn! {
    /// `row` ← e^(row − lse)·dscale.
    fn softmax_scaled(row: &mut [f32], lse: f32, dscale: f32) {
        row.iter_mut().for_each(|x| *x = exp(*x - lse) * dscale);
    }
}

/// Sum of per-row losses in a fixed order (deterministic), and the number of counted rows.
pub fn loss_sum(losses: &[f32], targets: &[u32]) -> (f64, usize) {
    let count = targets.iter().filter(|&&t| t != IGNORE).count();
    (losses.iter().map(|&l| l as f64).sum(), count)
}

/// f64 reference: mean cross-entropy over non-ignored rows.
pub fn cross_entropy_slow(logits: &[f64], targets: &[u32], v: usize) -> f64 {
    let mut total = 0.0;
    let mut count = 0;
    for (row, &tgt) in logits.chunks_exact(v).zip(targets) {
        if tgt == IGNORE {
            continue;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        total += lse - row[tgt as usize];
        count += 1;
    }
    total / count.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;
    use crate::rng::Rng;

    #[test]
    fn fused_matches_reference_and_finite_differences() {
        let mut rng = Rng::new(41);
        for &(n, v) in &[(1, 2), (7, 13), (33, 7), (5, 1000)] {
            let logits: Vec<f32> = randn(&mut rng, n * v).iter().map(|x| 3.0 * x).collect();
            let mut targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
            if n > 2 {
                targets[1] = IGNORE;
            }
            let count = targets.iter().filter(|&&t| t != IGNORE).count();
            let mut losses = vec![0.0; n];
            let mut grad = logits.clone();
            cross_entropy_fused(&mut losses, &mut grad, &targets, v, 1.0 / count as f32);
            let (sum, cnt) = loss_sum(&losses, &targets);
            let reference = cross_entropy_slow(&f64s(&logits), &targets, v);
            assert!((sum / cnt as f64 - reference).abs() <= 1e-5 * reference.abs().max(1.0));
            let mut fwd_only = vec![0.0; n];
            cross_entropy_forward(&mut fwd_only, &logits, &targets, v);
            assert_eq!(fwd_only, losses);
            let x = f64s(&logits);
            let numeric: Vec<f64> = (0..x.len())
                .map(|i| {
                    let mut p = x.clone();
                    p[i] += 1e-6;
                    let fp = cross_entropy_slow(&p, &targets, v);
                    p[i] -= 2e-6;
                    (fp - cross_entropy_slow(&p, &targets, v)) / 2e-6
                })
                .collect();
            assert_close(&grad, &numeric, 1e-5, "cross-entropy grad");
        }
    }
}
