//! SwiGLU gate: `gate = silu(h1) ⊙ h3`, silu(x) = x·σ(x), with h1 = x·W1ᵀ (gate_proj) and
//! h3 = x·W3ᵀ (up_proj); the FFN output is gate·W2ᵀ (down_proj).

use super::rows_per_task;
use rayon::prelude::*;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// gate `[N, F]` = silu(h1) ⊙ h3; h1, h3 `[N, F]`.
pub fn swiglu_forward(gate: &mut [f32], h1: &[f32], h3: &[f32]) {
    let block = rows_per_task(1);
    gate.par_chunks_mut(block).zip(h1.par_chunks(block)).zip(h3.par_chunks(block)).for_each(|((g, a), b)| {
        for ((gi, &x), &u) in g.iter_mut().zip(a).zip(b) {
            *gi = x * sigmoid(x) * u;
        }
    });
}

/// `dh1 = dgate ⊙ h3 ⊙ silu'(h1)`, silu'(x) = σ(x)·(1 + x·(1 − σ(x))); `dh3 = dgate ⊙ silu(h1)`.
pub fn swiglu_backward(dh1: &mut [f32], dh3: &mut [f32], dgate: &[f32], h1: &[f32], h3: &[f32]) {
    let block = rows_per_task(1);
    let chunks =
        dh1.par_chunks_mut(block).zip(dh3.par_chunks_mut(block)).zip(dgate.par_chunks(block)).zip(h1.par_chunks(block));
    chunks.zip(h3.par_chunks(block)).for_each(|((((da, db), dg), a), b)| {
        for ((((dai, dbi), &g), &x), &u) in da.iter_mut().zip(db.iter_mut()).zip(dg).zip(a).zip(b) {
            let s = sigmoid(x);
            *dai = g * u * s * (1.0 + x * (1.0 - s));
            *dbi = g * x * s;
        }
    });
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
        for n in [1, 7, 33, 20000] {
            let h1: Vec<f32> = randn(&mut rng, n).iter().map(|x| 4.0 * x).collect();
            let h3 = randn(&mut rng, n);
            let dg = randn(&mut rng, n);
            let mut g = vec![0.0; n];
            swiglu_forward(&mut g, &h1, &h3);
            let mut g_r = vec![0.0; n];
            swiglu_forward_slow(&mut g_r, &f64s(&h1), &f64s(&h3));
            assert_close(&g, &g_r, 1e-6, "swiglu fwd");
            let (mut d1, mut d3) = (vec![0.0; n], vec![0.0; n]);
            swiglu_backward(&mut d1, &mut d3, &dg, &h1, &h3);
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
            let n1: Vec<f64> = (0..n).map(|i| fd(i, 0)).collect();
            let n3: Vec<f64> = (0..n).map(|i| fd(i, 1)).collect();
            assert_close(&d1, &n1, 1e-5, "swiglu dh1");
            assert_close(&d3, &n3, 1e-5, "swiglu dh3");
        }
    }
}
