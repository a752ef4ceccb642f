//! SwiGLU gate: `gate = silu(h1) ⊙ h3`, silu(x) = x·σ(x), with h1 = x·W1ᵀ (gate_proj) and
//! h3 = x·W3ᵀ (up_proj) computed by one GEMM into `h13` `[N, 2·F]` (h1 | h3 per row); the FFN
//! output is gate·W2ᵀ (down_proj).

use super::exp::wide_fn;
use super::rows_per_task;
use rayon::prelude::*;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::exp::exp(-x))
}

/// gate `[N, F]` = silu(h1) ⊙ h3, with h13 `[N, 2·F]` holding h1 then h3 in each row.
pub fn swiglu_forward(gate: &mut [f32], h13: &[f32], f: usize) {
    let rows = rows_per_task(2 * f);
    gate.par_chunks_mut(rows * f).zip(h13.par_chunks(rows * 2 * f)).for_each(|(g, h)| forward_rows(g, h, f));
}

wide_fn! {
    fn forward_rows(gate: &mut [f32], h13: &[f32], f: usize) {
        for (g, h) in gate.chunks_exact_mut(f).zip(h13.chunks_exact(2 * f)) {
            let (h1, h3) = h.split_at(f);
            for ((gi, &x), &u) in g.iter_mut().zip(h1).zip(h3) {
                *gi = x * sigmoid(x) * u;
            }
        }
    }
}

/// `dh1 = dgate ⊙ h3 ⊙ silu'(h1)`, silu'(x) = σ(x)·(1 + x·(1 − σ(x))); `dh3 = dgate ⊙ silu(h1)`;
/// dh13 `[N, 2·F]` laid out like h13.
pub fn swiglu_backward(dh13: &mut [f32], dgate: &[f32], h13: &[f32], f: usize) {
    let rows = rows_per_task(2 * f);
    let chunks = dh13.par_chunks_mut(rows * 2 * f).zip(dgate.par_chunks(rows * f)).zip(h13.par_chunks(rows * 2 * f));
    chunks.for_each(|((dh, dg), h)| backward_rows(dh, dg, h, f));
}

wide_fn! {
    fn backward_rows(dh13: &mut [f32], dgate: &[f32], h13: &[f32], f: usize) {
        for ((dh, dg), h) in dh13.chunks_exact_mut(2 * f).zip(dgate.chunks_exact(f)).zip(h13.chunks_exact(2 * f)) {
            let (d1, d3) = dh.split_at_mut(f);
            let (h1, h3) = h.split_at(f);
            // Indexed over slices of one length (not a five-way zip) so LLVM drops the bounds
            // checks and vectorises.
            let (d3, dg, h1, h3) = (&mut d3[..f], &dg[..f], &h1[..f], &h3[..f]);
            for i in 0..f {
                let (g, x, u) = (dg[i], h1[i], h3[i]);
                let s = sigmoid(x);
                d1[i] = g * u * s * (1.0 + x * (1.0 - s));
                d3[i] = g * x * s;
            }
        }
    }
}

/// f64 reference forward.
pub fn swiglu_forward_slow(gate: &mut [f64], h1: &[f64], h3: &[f64]) {
    for i in 0..gate.len() {
        gate[i] = h1[i] / (1.0 + (-h1[i]).exp()) * h3[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;
    use crate::rng::Rng;

    #[test]
    fn fast_matches_naive_and_finite_differences() {
        let mut rng = Rng::new(31);
        for &(n, f) in &[(1, 1), (7, 13), (33, 5), (20, 1000)] {
            let h13: Vec<f32> = randn(&mut rng, n * 2 * f).iter().map(|x| 4.0 * x).collect();
            let (h1, h3): (Vec<f32>, Vec<f32>) = {
                let rows = h13.chunks_exact(2 * f);
                (rows.clone().flat_map(|r| r[..f].to_vec()).collect(), rows.flat_map(|r| r[f..].to_vec()).collect())
            };
            let dg = randn(&mut rng, n * f);
            let mut g = vec![0.0; n * f];
            swiglu_forward(&mut g, &h13, f);
            let mut g_r = vec![0.0; n * f];
            swiglu_forward_slow(&mut g_r, &f64s(&h1), &f64s(&h3));
            assert_close(&g, &g_r, 1e-6, "swiglu fwd");
            let mut dh13 = vec![0.0; n * 2 * f];
            swiglu_backward(&mut dh13, &dg, &h13, f);
            // Elementwise op: the gradient of Σ dg ⊙ gate is elementwise, so one central
            // difference per element checks it.
            let fd = |i: usize, which: usize| {
                let eval = |e: f64| {
                    let (mut a, mut b) = (h1[i] as f64, h3[i] as f64);
                    if which == 0 {
                        a += e
                    } else {
                        b += e
                    }
                    let mut out = [0.0];
                    swiglu_forward_slow(&mut out, &[a], &[b]);
                    out[0] * dg[i] as f64
                };
                (eval(1e-6) - eval(-1e-6)) / 2e-6
            };
            let numeric: Vec<f64> = (0..n)
                .flat_map(|r| (0..2 * f).map(move |j| (r, j)))
                .map(|(r, j)| if j < f { fd(r * f + j, 0) } else { fd(r * f + j - f, 1) })
                .collect();
            assert_close(&dh13, &numeric, 1e-5, "swiglu dh13");
        }
    }
}
