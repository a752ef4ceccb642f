//! Linear layers through a real GEMM, and the one `sgemm` entry point every matrix product in
//! the crate goes through. Three implementations sit behind `GemmImpl`; `anetrain bench gemm`
//! measures them at a model's shapes, and docs/BENCHMARKS.md records why `gemm` is the default.
//!
//! Linear layer convention (torch.nn.Linear, no bias): `w` is `[N, K]` = `[out, in]`.

use super::Par;
use rayon::prelude::*;

/// Which GEMM computes the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmImpl {
    /// The `gemm` crate (pure Rust, runtime-dispatched AVX2/AVX-512/NEON kernels, rayon).
    Gemm,
    /// The `matrixmultiply` crate (pure Rust; threads from MATMUL_NUM_THREADS).
    Matrixmultiply,
    /// System BLAS `cblas_sgemm` (OpenBLAS on Linux, Accelerate on macOS), `--features blas`.
    Blas,
}

impl GemmImpl {
    pub fn available(self) -> bool {
        self != GemmImpl::Blas || cfg!(feature = "blas")
    }
}

/// One operand of a product: row-major storage with leading dimension `ld`, read transposed
/// when `trans` is set (BLAS conventions).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub trans: bool,
    pub ld: usize,
}

impl<'a> Operand<'a> {
    pub fn n(data: &'a [f32], ld: usize) -> Self {
        Operand { data, trans: false, ld }
    }
    pub fn t(data: &'a [f32], ld: usize) -> Self {
        Operand { data, trans: true, ld }
    }
    /// (row stride, column stride) of the logical matrix.
    pub(super) fn strides(&self) -> (isize, isize) {
        if self.trans { (1, self.ld as isize) } else { (self.ld as isize, 1) }
    }
    /// Elements the logical `rows × cols` matrix spans in storage. Panics if stored rows
    /// would overlap (`ld` shorter than a stored row): shared operands may alias themselves
    /// harmlessly, but the destination must not.
    pub(super) fn span(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        let (r, c) = if self.trans { (cols, rows) } else { (rows, cols) };
        assert!(r == 1 || self.ld >= c, "sgemm: leading dimension {} shorter than a row of {c}", self.ld);
        (r - 1) * self.ld + c
    }
}

/// Output rows from which the `gemm` crate's AVX-512 kernels (0.19, `x86-v4`) run; below it,
/// its previous release's AVX2 kernels (`gemm_avx2`, 0.18, whose stable build has no AVX-512).
/// Why two: on Zen 4 (AVX-512 on 256-bit units) the AVX-512 kernels are ~1.2× faster at a
/// training step's M = B·T ≥ 256 but 1.3–8× slower at the M ≤ 64 of a short prompt's prefill
/// (2 threads; docs/BENCHMARKS.md §13). On CPUs without AVX-512 both run the same AVX2 kernels.
const AVX512_MIN_ROWS: usize = 128;

/// `c[m×n] (+)= a[m×k] · b[k×n]`, with `c` row-major of leading dimension `ldc`; adds into `c`
/// when `accumulate`, overwrites it otherwise. Panics if a slice is too short for its shape.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    par: Par,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(a.data.len() >= a.span(m, k), "sgemm: lhs too short");
    assert!(b.data.len() >= b.span(k, n), "sgemm: rhs too short");
    assert!(c.len() >= Operand::n(c, ldc).span(m, n), "sgemm: dst too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| c[i * ldc..i * ldc + n].fill(0.0));
        }
        return;
    }
    let (ars, acs) = a.strides();
    let (brs, bcs) = b.strides();
    match par.gemm {
        GemmImpl::Gemm => {
            let (c, ldc, a, b) = (c.as_mut_ptr(), ldc as isize, a.data.as_ptr(), b.data.as_ptr());
            // SAFETY (both): the asserts above bound every access of the strided views; `c` is
            // exclusively borrowed and cannot alias the shared inputs.
            // gemm computes dst = alpha·dst + beta·lhs·rhs (alpha and beta swapped vs BLAS).
            if m < AVX512_MIN_ROWS {
                let par = if par.threads > 1 {
                    gemm_avx2::Parallelism::Rayon(par.threads)
                } else {
                    gemm_avx2::Parallelism::None
                };
                unsafe {
                    gemm_avx2::gemm(
                        m, n, k, c, 1, ldc, accumulate, a, acs, ars, b, bcs, brs, 1.0, 1.0, false, false, false, par,
                    )
                }
            } else {
                let par = if par.threads > 1 { gemm::Parallelism::Rayon(par.threads) } else { gemm::Parallelism::None };
                unsafe {
                    gemm::gemm(
                        m, n, k, c, 1, ldc, accumulate, a, acs, ars, b, bcs, brs, 1.0, 1.0, false, false, false, par,
                    )
                }
            }
        }
        GemmImpl::Matrixmultiply => {
            let beta = if accumulate { 1.0 } else { 0.0 };
            // SAFETY: as above; beta = 0 means `c` is written without being read.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.data.as_ptr(),
                    ars,
                    acs,
                    b.data.as_ptr(),
                    brs,
                    bcs,
                    beta,
                    c.as_mut_ptr(),
                    ldc as isize,
                    1,
                )
            }
        }
        GemmImpl::Blas => blas::sgemm(m, n, k, a, b, c, ldc, accumulate),
    }
}

#[cfg(feature = "blas")]
mod blas {
    use super::Operand;
    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    #[cfg_attr(target_os = "macos", link(name = "Accelerate", kind = "framework"))]
    #[cfg_attr(not(target_os = "macos"), link(name = "openblas"))]
    unsafe extern "C" {
        fn cblas_sgemm(
            layout: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], ldc: usize, acc: bool) {
        let t = |o: &Operand| if o.trans { TRANS } else { NO_TRANS };
        // SAFETY: shapes were bounds-checked by the caller; BLAS reads/writes inside them.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                t(&a),
                t(&b),
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.data.as_ptr(),
                a.ld as i32,
                b.data.as_ptr(),
                b.ld as i32,
                if acc { 1.0 } else { 0.0 },
                c.as_mut_ptr(),
                ldc as i32,
            )
        }
    }
}

#[cfg(not(feature = "blas"))]
mod blas {
    use super::Operand;
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(_: usize, _: usize, _: usize, _: Operand, _: Operand, _: &mut [f32], _: usize, _: bool) {
        panic!("GemmImpl::Blas needs the `blas` cargo feature (cargo build --features blas)");
    }
}

/// out `[M, N]` = inp `[M, K]` · wᵀ, w `[N, K]`.
pub fn matmul_forward(par: Par, out: &mut [f32], inp: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    sgemm(par, m, n, k, Operand::n(inp, k), Operand::t(w, k), out, n, false);
}

/// Input gradient of `out = inp · wᵀ`: dinp `[M, K]` (+)= dout `[M, N]` · w `[N, K]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_dx(
    par: Par,
    dinp: &mut [f32],
    dout: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    sgemm(par, m, k, n, Operand::n(dout, n), Operand::n(w, k), dinp, k, accumulate);
}

/// Adds `bias` `[W]` to every row of `out` `[N, W]` (a linear layer's bias, after its GEMM).
pub fn bias_forward(out: &mut [f32], bias: &[f32]) {
    let w = bias.len();
    let rows = super::rows_per_task(w);
    out.par_chunks_mut(rows * w).for_each(|blk| {
        for row in blk.chunks_exact_mut(w) {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        }
    });
}

/// Gradient of `bias_forward`: `dbias [W] += Σ_rows dout [N, W]` (accumulates, like dW).
/// Parallel over column blocks, each summing rows in order, so the result is deterministic.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32]) {
    let w = dbias.len();
    const COLS: usize = 64;
    dbias.par_chunks_mut(COLS).enumerate().for_each(|(blk, db)| {
        let cols = blk * COLS..blk * COLS + db.len();
        for row in dout.chunks_exact(w) {
            db.iter_mut().zip(&row[cols.clone()]).for_each(|(d, g)| *d += g);
        }
    });
}

/// Naive f64 `bias_forward`.
pub fn bias_forward_slow(out: &mut [f64], bias: &[f64]) {
    for row in out.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
}

/// Weight gradient of `out = inp · wᵀ`: dw `[N, K]` += doutᵀ `[N, M]` · inp `[M, K]`
/// (always accumulates: gradients sum over micro-batches).
pub fn matmul_backward_dw(par: Par, dw: &mut [f32], dout: &[f32], inp: &[f32], m: usize, k: usize, n: usize) {
    sgemm(par, n, k, m, Operand::t(dout, n), Operand::n(inp, k), dw, k, true);
}

/// f64 reference of `matmul_forward`: out = inp · wᵀ.
pub fn matmul_forward_slow(out: &mut [f64], inp: &[f64], w: &[f64], m: usize, k: usize, n: usize) {
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| inp[i * k + p] * w[j * k + p]).sum();
        }
    }
}

/// f64 reference backward: dinp = dout · w; dw += doutᵀ · inp.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_slow(
    dinp: &mut [f64],
    dw: &mut [f64],
    dout: &[f64],
    inp: &[f64],
    w: &[f64],
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        for p in 0..k {
            dinp[i * k + p] = (0..n).map(|j| dout[i * n + j] * w[j * k + p]).sum();
        }
    }
    for j in 0..n {
        for p in 0..k {
            dw[j * k + p] += (0..m).map(|i| dout[i * n + j] * inp[i * k + p]).sum::<f64>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;

    fn impls() -> Vec<GemmImpl> {
        [GemmImpl::Gemm, GemmImpl::Matrixmultiply, GemmImpl::Blas].into_iter().filter(|g| g.available()).collect()
    }

    #[test]
    fn fast_matches_naive_on_odd_shapes() {
        let mut rng = crate::rng::Rng::new(11);
        for gemm in impls() {
            for threads in [1, 2] {
                let par = Par { threads, gemm };
                // m = 160 ≥ AVX512_MIN_ROWS: the `gemm` crate's AVX-512 release runs too.
                for &(m, k, n) in &[(1, 1, 1), (7, 13, 33), (33, 7, 13), (64, 96, 80), (13, 130, 5), (160, 37, 45)] {
                    let inp = randn(&mut rng, m * k);
                    let w = randn(&mut rng, n * k);
                    let dout = randn(&mut rng, m * n);
                    let mut out = vec![0.0; m * n];
                    matmul_forward(par, &mut out, &inp, &w, m, k, n);
                    let mut dinp = vec![1.0; m * k]; // overwritten, not accumulated
                    matmul_backward_dx(par, &mut dinp, &dout, &w, m, k, n, false);
                    let mut dw = vec![0.5; n * k]; // accumulated onto
                    matmul_backward_dw(par, &mut dw, &dout, &inp, m, k, n);

                    let mut out_r = vec![0.0; m * n];
                    matmul_forward_slow(&mut out_r, &f64s(&inp), &f64s(&w), m, k, n);
                    let mut dinp_r = vec![0.0; m * k];
                    let mut dw_r = vec![0.5; n * k];
                    matmul_backward_slow(&mut dinp_r, &mut dw_r, &f64s(&dout), &f64s(&inp), &f64s(&w), m, k, n);
                    let tol = f32_tol(k.max(m).max(n));
                    assert_close(&out, &out_r, tol, &format!("{gemm:?} fwd {m}x{k}x{n}"));
                    assert_close(&dinp, &dinp_r, tol, &format!("{gemm:?} dx {m}x{k}x{n}"));
                    assert_close(&dw, &dw_r, tol, &format!("{gemm:?} dw {m}x{k}x{n}"));
                }
            }
        }
    }

    #[test]
    fn reference_backward_matches_finite_differences() {
        let (m, k, n) = (3, 5, 4);
        let mut rng = crate::rng::Rng::new(5);
        let inp = f64s(&randn(&mut rng, m * k));
        let w = f64s(&randn(&mut rng, n * k));
        let proj = f64s(&randn(&mut rng, m * n)); // loss = Σ proj ⊙ out
        let loss = |inp: &[f64], w: &[f64]| {
            let mut out = vec![0.0; m * n];
            matmul_forward_slow(&mut out, inp, w, m, k, n);
            dot64(&out, &proj)
        };
        let mut dinp = vec![0.0; m * k];
        let mut dw = vec![0.0; n * k];
        matmul_backward_slow(&mut dinp, &mut dw, &proj, &inp, &w, m, k, n);
        check_fd(&dinp, &inp, |x| loss(x, &w), "matmul dinp");
        check_fd(&dw, &w, |x| loss(&inp, x), "matmul dw");
    }

    #[test]
    fn bias_matches_naive_and_its_gradient_is_the_column_sum() {
        let mut rng = crate::rng::Rng::new(12);
        let (n, w) = (37, 150);
        let x = randn(&mut rng, n * w);
        let b = randn(&mut rng, w);
        let mut y = x.clone();
        bias_forward(&mut y, &b);
        let mut y_r = f64s(&x);
        bias_forward_slow(&mut y_r, &f64s(&b));
        assert_close(&y, &y_r, 1e-6, "bias fwd");
        // d/db Σ proj ⊙ (x + b) = Σ_rows proj, by central differences of the naive forward.
        let proj = f64s(&randn(&mut rng, n * w));
        let mut db = vec![0.5f32; w];
        bias_backward(&mut db, &proj.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let mut numeric = vec![0.5f64; w];
        for (j, num) in numeric.iter_mut().enumerate() {
            let loss = |delta: f64| {
                let mut bb = f64s(&b);
                bb[j] += delta;
                let mut out = f64s(&x);
                bias_forward_slow(&mut out, &bb);
                dot64(&out, &proj)
            };
            *num += (loss(1e-6) - loss(-1e-6)) / 2e-6;
        }
        assert_close(&db, &numeric, 1e-5, "bias grad (accumulated onto 0.5)");
    }
}
