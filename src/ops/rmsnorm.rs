//! RMSNorm over rows of length C: `y = x · r · w`, `r = (mean(x²) + eps)^-½`.
//! Also the per-head QK-norm (rows of length D, `[N·H, D]`).
//! Row-wise ops run on the current rayon pool in fixed row blocks, so results do not depend
//! on the thread count.

use super::rows_per_task;
use rayon::prelude::*;

/// out `[N, C]`, rstd `[N]` (saved for backward), inp `[N, C]`, w `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32], n: usize, c: usize, eps: f32) {
    let (out, rstd, inp) = (&mut out[..n * c], &mut rstd[..n], &inp[..n * c]);
    let rows = rows_per_task(c);
    let body = |((out, rstd), inp): ((&mut [f32], &mut [f32]), &[f32])| {
        for ((y, r), x) in out.chunks_exact_mut(c).zip(rstd.iter_mut()).zip(inp.chunks_exact(c)) {
            let ms = super::dot(x, x) / c as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((yi, xi), wi) in y.iter_mut().zip(x).zip(w) {
                *yi = (xi * *r) * wi;
            }
        }
    };
    let chunks = out.par_chunks_mut(rows * c).zip(rstd.par_chunks_mut(rows)).zip(inp.par_chunks(rows * c));
    chunks.for_each(body);
}

/// Backward of `y = x̂ ⊙ w`, `x̂ = x·r`, with `g = w ⊙ dy`:
/// `dx = r · (g − x̂ · mean(g ⊙ x̂))`, `dw += Σ_rows dy ⊙ x̂`.
/// `dinp` is overwritten, or added to when `accumulate` (the residual stream's gradient).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    rstd: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    accumulate: bool,
) {
    rmsnorm_backward_dx(dinp, dout, rstd, inp, w, n, c, accumulate);
    rmsnorm_dw(dw, &dout[..n * c], &rstd[..n], &inp[..n * c], c);
}

/// `rmsnorm_backward` without the gain gradient, for a frozen gain (LoRA): dinp `[N, C]`
/// overwritten (or added to when `accumulate`) from dout `[N, C]`, rstd `[N]`, inp `[N, C]`,
/// w `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_dx(
    dinp: &mut [f32],
    dout: &[f32],
    rstd: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    accumulate: bool,
) {
    let rows = rows_per_task(c);
    let (dinp, dout, rstd, inp) = (&mut dinp[..n * c], &dout[..n * c], &rstd[..n], &inp[..n * c]);
    type Rows<'a> = (((&'a mut [f32], &'a [f32]), &'a [f32]), &'a [f32]);
    let body = |(((dx, dy), r), x): Rows| {
        for (((dx, dy), &r), x) in dx.chunks_exact_mut(c).zip(dy.chunks_exact(c)).zip(r).zip(x.chunks_exact(c)) {
            rmsnorm_backward_row(dx, dy, r, x, w, accumulate);
        }
    };
    let chunks = dinp
        .par_chunks_mut(rows * c)
        .zip(dout.par_chunks(rows * c))
        .zip(rstd.par_chunks(rows))
        .zip(inp.par_chunks(rows * c));
    chunks.for_each(body);
}

/// `rmsnorm_backward`'s dx for one row of C: dx `[C]` from dy, r (1/rms of the row), the
/// input row x and the gain w (overwritten, or added to when `accumulate`).
pub fn rmsnorm_backward_row(dx: &mut [f32], dy: &[f32], r: f32, x: &[f32], w: &[f32], accumulate: bool) {
    // mean(g ⊙ x̂) = r · Σ(w ⊙ dy ⊙ x) / C
    let mut s = 0.0f32;
    for ((wi, gi), xi) in w.iter().zip(dy).zip(x) {
        s += wi * gi * xi;
    }
    let m = s * r / w.len() as f32;
    for (((dxi, wi), gi), xi) in dx.iter_mut().zip(w).zip(dy).zip(x) {
        let v = r * (wi * gi - xi * r * m);
        *dxi = if accumulate { *dxi + v } else { v };
    }
}

/// `rmsnorm_backward`'s gain gradient: `dw += Σ_rows dout ⊙ x̂` over rows of C. Sequential
/// over rows: a fixed summation order keeps dw bit-reproducible; it is O(N·C).
pub fn rmsnorm_dw(dw: &mut [f32], dout: &[f32], rstd: &[f32], inp: &[f32], c: usize) {
    for ((dy, &r), x) in dout.chunks_exact(c).zip(rstd).zip(inp.chunks_exact(c)) {
        for ((dwi, gi), xi) in dw.iter_mut().zip(dy).zip(x) {
            *dwi += gi * (xi * r);
        }
    }
}

/// f64 reference: out = x · (mean(x²) + eps)^-½ · w.
pub fn rmsnorm_forward_slow(out: &mut [f64], inp: &[f64], w: &[f64], n: usize, c: usize, eps: f64) {
    for i in 0..n {
        let x = &inp[i * c..(i + 1) * c];
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
        for j in 0..c {
            out[i * c + j] = x[j] * r * w[j];
        }
    }
}

/// f64 reference backward, written from the chain rule directly (not the simplified form):
/// ∂y_j/∂x_k = w_j (r δ_jk − x_j r³ x_k / C).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_slow(
    dinp: &mut [f64],
    dw: &mut [f64],
    dout: &[f64],
    inp: &[f64],
    w: &[f64],
    n: usize,
    c: usize,
    eps: f64,
) {
    for i in 0..n {
        let x = &inp[i * c..(i + 1) * c];
        let dy = &dout[i * c..(i + 1) * c];
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
        for k in 0..c {
            dinp[i * c + k] = (0..c)
                .map(|j| dy[j] * w[j] * (if j == k { r } else { 0.0 } - x[j] * r * r * r * x[k] / c as f64))
                .sum();
        }
        for j in 0..c {
            dw[j] += dy[j] * x[j] * r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;
    use crate::rng::Rng;

    #[test]
    fn fast_matches_naive() {
        let mut rng = Rng::new(3);
        for &(n, c) in &[(1, 1), (7, 13), (33, 64), (5, 768), (300, 7)] {
            {
                let x = randn(&mut rng, n * c);
                let w = randn(&mut rng, c);
                let dy = randn(&mut rng, n * c);
                let mut y = vec![0.0; n * c];
                let mut rstd = vec![0.0; n];
                rmsnorm_forward(&mut y, &mut rstd, &x, &w, n, c, 1e-5);
                let mut y_r = vec![0.0; n * c];
                rmsnorm_forward_slow(&mut y_r, &f64s(&x), &f64s(&w), n, c, 1e-5);
                assert_close(&y, &y_r, f32_tol(c), "rmsnorm fwd");

                let base = randn(&mut rng, n * c);
                let mut dx = base.clone();
                let mut dw = vec![0.25; c];
                rmsnorm_backward(&mut dx, &mut dw, &dy, &rstd, &x, &w, n, c, true);
                let mut dx_r = vec![0.0; n * c];
                let mut dw_r = vec![0.25; c];
                rmsnorm_backward_slow(&mut dx_r, &mut dw_r, &f64s(&dy), &f64s(&x), &f64s(&w), n, c, 1e-5);
                let dx_r: Vec<f64> = dx_r.iter().zip(&base).map(|(a, &b)| a + b as f64).collect();
                assert_close(&dx, &dx_r, f32_tol(c), "rmsnorm dx");
                assert_close(&dw, &dw_r, f32_tol(n * c), "rmsnorm dw");
            }
        }
    }

    #[test]
    fn reference_backward_matches_finite_differences() {
        let (n, c) = (3, 6);
        let mut rng = Rng::new(4);
        let x = f64s(&randn(&mut rng, n * c));
        let w = f64s(&randn(&mut rng, c));
        let proj = f64s(&randn(&mut rng, n * c));
        let loss = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; n * c];
            rmsnorm_forward_slow(&mut y, x, w, n, c, 1e-5);
            dot64(&y, &proj)
        };
        let mut dx = vec![0.0; n * c];
        let mut dw = vec![0.0; c];
        rmsnorm_backward_slow(&mut dx, &mut dw, &proj, &x, &w, n, c, 1e-5);
        check_fd(&dx, &x, |v| loss(v, &w), "rmsnorm dx");
        check_fd(&dw, &w, |v| loss(&x, v), "rmsnorm dw");
    }
}
