//! CPU math, one module per layer. Each has a fast `f32` forward/backward pair and an `f64`
//! naive reference (`*_slow`) beside it; the tests check fast against naive on odd shapes, and
//! naive backward against central finite differences of naive forward.
//!
//! Argument order everywhere (llm.c): outputs, saved activations, inputs, weights, dims.
//! Backward functions *overwrite* activation gradients and *accumulate* (`+=`) into parameter
//! gradients, so gradients sum over micro-batches and are zeroed once per optimizer update.

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod exp;
pub mod gemm_bf16;
pub mod matmul;
pub mod matvec;
pub mod rmsnorm;
pub mod rope;
pub mod small;
pub mod swiglu;
pub mod team;

pub use matmul::GemmImpl;

/// Parallelism and GEMM choice, passed explicitly to every op (never a global).
#[derive(Clone, Copy, Debug)]
pub struct Par {
    /// Threads of the rayon pool the op runs in; 1 means sequential.
    pub threads: usize,
    pub gemm: GemmImpl,
}

impl Par {
    pub fn seq() -> Self {
        Par { threads: 1, gemm: GemmImpl::Gemm }
    }
}

/// Rows per rayon task for row-wise ops: enough work per task to amortise scheduling, a fixed
/// split so results never depend on the thread count.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Dot product with eight independent accumulators so LLVM vectorises it (no -ffast-math in
/// Rust); the summation order is fixed, so results are deterministic.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// y += a·x
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the op tests: random data, f64 conversion, size-scaled tolerances,
    //! and central-difference gradient checks on the f64 references.
    use crate::rng::Rng;

    pub fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    pub fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    pub fn dot64(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Relative tolerance for an f32 result built from reductions of length `n`: rounding error
    /// grows like √n·ε for random-sign sums; the factor 16 leaves room for the fast paths'
    /// different summation order.
    pub fn f32_tol(n: usize) -> f64 {
        16.0 * f32::EPSILON as f64 * (n.max(1) as f64).sqrt()
    }

    /// max |fast − ref| ≤ tol · max(1, max |ref|).
    pub fn assert_close(fast: &[f32], reference: &[f64], tol: f64, what: &str) {
        assert_eq!(fast.len(), reference.len(), "{what}: length");
        let scale = reference.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let (mut worst, mut at) = (0.0f64, 0);
        for (i, (&a, &b)) in fast.iter().zip(reference).enumerate() {
            let e = (a as f64 - b).abs();
            if e > worst || e.is_nan() {
                worst = e;
                at = i;
            }
        }
        assert!(
            worst <= tol * scale,
            "{what}: max error {worst:.3e} at {at} (fast {}, ref {}) exceeds {:.3e}",
            fast[at],
            reference[at],
            tol * scale
        );
    }

    /// Central differences of `f` at `x` against `analytic` = ∂f/∂x, every coordinate.
    /// In f64 with h = 1e-6 the truncation and rounding errors are both ~1e-10 relative.
    pub fn check_fd(analytic: &[f64], x: &[f64], f: impl Fn(&[f64]) -> f64, what: &str) {
        let mut xp = x.to_vec();
        let scale = analytic.iter().fold(1e-3f64, |m, g| m.max(g.abs()));
        for i in 0..x.len() {
            let h = 1e-6 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            let numeric = (fp - fm) / (2.0 * h);
            let err = (numeric - analytic[i]).abs();
            assert!(err <= 1e-6 * scale, "{what}[{i}]: analytic {} vs numeric {numeric} (err {err:.3e})", analytic[i]);
        }
    }

    #[test]
    fn dot_and_axpy_match_naive() {
        let mut rng = Rng::new(2);
        for n in [0, 1, 7, 8, 13, 33, 100] {
            let a = randn(&mut rng, n);
            let b = randn(&mut rng, n);
            let naive: f64 = f64s(&a).iter().zip(f64s(&b)).map(|(x, y)| x * y).sum();
            assert!((super::dot(&a, &b) as f64 - naive).abs() <= f32_tol(n) * (1.0 + naive.abs()));
            let mut y = a.clone();
            super::axpy(&mut y, 0.5, &b);
            for i in 0..n {
                assert_eq!(y[i], a[i] + 0.5 * b[i]);
            }
        }
    }
}
