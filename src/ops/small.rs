//! Small sequential f32 GEMMs without packing, for the attention core: `c[m×n] (+)= a·b` with
//! `b` row-major and every dimension a head width D or a causal block (≤ a few hundred).
//!
//! Why: the attention core issues ~17,000 such products per SmolLM2 training step (four
//! 64-row causal blocks × a few products × B·H heads × layers), each 0.5–2 MFLOP. A general
//! GEMM packs both operands and sets up its blocking on every call, which at this size costs
//! as much as the arithmetic (they ran at ~95–120 GFLOP/s against the same cores' ~200 on
//! large products). Here `b`'s rows are already contiguous (a D-wide row of V, K, Q, dO, or
//! of a transposed K or V that the caller lays out once per head), so the kernel reads them in
//! place: a tile of 6 rows × 64 columns lives in 24 AVX-512 registers while k streams once,
//! with 4 loads of `b` and 6 broadcasts of `a` per 24 fused multiply-adds.
//!
//! Numerics: every element is one fused multiply-add chain over k in increasing order,
//! starting at 0, then stored or added to the old value. On CPUs without AVX-512F the
//! products go to `matmul::sgemm` (sequential) instead.

use super::Par;
use super::matmul::{Operand, sgemm};

/// `c[m×n] (+)= a[m×k] · b[k×n]`: `c` row-major with leading dimension `ldc`, overwritten unless
/// `accumulate`; `a` row-major or transposed (`Operand`); `b` must not be transposed. Runs on
/// the calling thread (`par` picks the fallback GEMM on CPUs without AVX-512F). Panics if a
/// slice is too short for its shape.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
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
    assert!(!b.trans, "ops::small::gemm: b must be row-major");
    assert!(a.data.len() >= a.span(m, k), "ops::small::gemm: a too short");
    assert!(b.data.len() >= b.span(k, n), "ops::small::gemm: b too short");
    assert!(c.len() >= Operand::n(c, ldc).span(m, n), "ops::small::gemm: c too short");
    let seq = Par { threads: 1, gemm: par.gemm };
    #[cfg(target_arch = "x86_64")]
    if super::exp::has_avx512() && m > 0 && n > 0 {
        let (ars, acs) = a.strides();
        // SAFETY: the CPU has AVX-512F (checked above); the asserts bound every index the
        // kernel forms: rows < m of `a` (with column < k), rows < k of `b` (columns < n,
        // masked), rows < m of `c` (columns < n, masked).
        unsafe {
            x86::gemm(
                m,
                n,
                k,
                a.data.as_ptr(),
                ars as usize,
                acs as usize,
                b.data.as_ptr(),
                b.ld,
                c.as_mut_ptr(),
                ldc,
                accumulate,
            )
        };
        return;
    }
    sgemm(seq, m, n, k, a, b, c, ldc, accumulate);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Rows per tile.
    const MR: usize = 6;
    /// Columns per tile (four 16-lane vectors).
    const NR: usize = 64;

    /// Lane mask for the 16 columns starting at `j` of a row of `n`.
    #[inline(always)]
    fn mask(j: usize, n: usize) -> __mmask16 {
        let live = n.saturating_sub(j).min(16);
        ((1u32 << live) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        for i0 in (0..m).step_by(MR) {
            let rows = (m - i0).min(MR);
            // Rows past m repeat the last row of `a` (valid memory); they are never stored.
            let arow: [usize; MR] = std::array::from_fn(|r| (i0 + r.min(rows - 1)) * ars);
            for j0 in (0..n).step_by(NR) {
                let masks: [__mmask16; 4] = std::array::from_fn(|v| mask(j0 + 16 * v, n));
                let mut acc = [[_mm512_setzero_ps(); 4]; MR];
                for kk in 0..k {
                    // SAFETY (all pointer reads): row kk < k of `b`, lanes masked to columns
                    // < n; `a` at row < m, column kk < k (the caller's asserts).
                    let brow = unsafe { b.add(kk * ldb + j0) };
                    let bv: [__m512; 4] =
                        std::array::from_fn(|v| unsafe { _mm512_maskz_loadu_ps(masks[v], brow.add(16 * v)) });
                    for r in 0..MR {
                        let av = _mm512_set1_ps(unsafe { *a.add(arow[r] + kk * acs) });
                        for v in 0..4 {
                            acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    for v in 0..4 {
                        if masks[v] == 0 {
                            continue;
                        }
                        // SAFETY: row i0 + r < m of `c`, columns masked to < n.
                        let p = unsafe { c.add((i0 + r) * ldc + j0 + 16 * v) };
                        let out = if accumulate {
                            _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(masks[v], p) }, acc[v])
                        } else {
                            acc[v]
                        };
                        unsafe { _mm512_mask_storeu_ps(p, masks[v], out) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;

    /// Against an f64 reference, both `a` layouts, overwrite and accumulate, with tails in
    /// every dimension (rows not a multiple of 6, columns not a multiple of 16 or 64).
    #[test]
    fn matches_naive_on_odd_shapes() {
        let mut rng = crate::rng::Rng::new(41);
        for &(m, n, k) in &[(1, 1, 1), (6, 64, 64), (7, 65, 3), (64, 64, 256), (13, 200, 64), (5, 17, 0), (64, 130, 70)]
        {
            for trans in [false, true] {
                for accumulate in [false, true] {
                    let (lda, ldb, ldc) = (if trans { m + 3 } else { k + 2 }, n + 5, n + 1);
                    let a = randn(&mut rng, if trans { k.max(1) * lda } else { m * lda });
                    let b = randn(&mut rng, k.max(1) * ldb);
                    let c0 = randn(&mut rng, m * ldc);
                    let mut c = c0.clone();
                    let op = if trans { Operand::t(&a, lda) } else { Operand::n(&a, lda) };
                    gemm(Par::seq(), m, n, k, op, Operand::n(&b, ldb), &mut c, ldc, accumulate);
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= n {
                                assert_eq!(got, c0[i * ldc + j], "column {j} past n was written");
                                continue;
                            }
                            let ai = |kk: usize| if trans { a[kk * lda + i] } else { a[i * lda + kk] } as f64;
                            let dot: f64 = (0..k).map(|kk| ai(kk) * b[kk * ldb + j] as f64).sum();
                            let want = dot + if accumulate { c0[i * ldc + j] as f64 } else { 0.0 };
                            let tol = f32_tol(k.max(1)) * (1.0 + want.abs());
                            assert!(
                                (got as f64 - want).abs() <= tol,
                                "{m}x{n}x{k} t={trans} acc={accumulate} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
