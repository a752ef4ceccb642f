//! A small sequential bf16 GEMM over operands packed once by the caller, for the attention
//! core under `--bf16-attention` (`ops::attention::bf16`): `c[m×n] (+)= A·B` with both
//! operands already rounded to bf16 and held as k-pairs (one u32 per (row or column, k-pair),
//! the even k in the low half: the operand shape of `vdpbf16ps`), accumulated in f32.
//!
//! Why not `Bf16Gemm`: it packs both operands on every call and parallelises inside it,
//! while attention issues thousands of small products (blocks of 64 rows, k = D or a causal
//! block) from tasks that are already parallel. Here each head's K, V, Q and dO is packed
//! once and serves every causal block and every query head of its group, and a call runs on
//! the calling thread.
//!
//! Layouts (`Pairs`), for an operand with `x` rows (A) or columns (B) and kp pairs:
//! - `Rows { ld }`: pair p of row i at `i·ld + p` (an f32 `[x, k]` rounded row by row,
//!   `pack_rows`). A only.
//! - `Panels { stride }`: in panels of 32 (the bf16 GEMM's `NR`), pair p of index j at
//!   `(j/32)·stride + 32p + j%32` (`pack_panels`, the bf16 GEMM's own panel packer). B is
//!   always `Panels`; A may be (for `Pᵀ`, `dSᵀ`: A's k runs down the f32 source's rows).
//!
//! A window of pairs starting at `p0` is the same operand sliced at `32·p0` (panels) or `p0`
//! (rows), with the same stride.
//!
//! Numerics: each element is `vdpbf16ps`'s chain over the pairs in increasing order (per
//! pair the odd k's product, then the even k's, each rounded to f32), from 0, then stored or
//! added to the old value. Without AVX-512 BF16 a portable loop computes the same order.

use super::pack::{RhsBlock, pack_a_row, pack_b_panel};
use super::{NR, from_bf16};

/// A packed bf16 operand (see the module doc for the layouts).
#[derive(Clone, Copy)]
pub enum Pairs<'a> {
    Rows { data: &'a [u32], ld: usize },
    Panels { data: &'a [u32], stride: usize },
}

impl Pairs<'_> {
    /// Offset of row (or column) `i`'s first pair, and the step from one pair to the next.
    #[inline]
    fn at(&self, i: usize) -> (usize, usize) {
        match *self {
            Pairs::Rows { ld, .. } => (i * ld, 1),
            Pairs::Panels { stride, .. } => ((i / NR) * stride + i % NR, NR),
        }
    }

    fn data(&self) -> &[u32] {
        match *self {
            Pairs::Rows { data, .. } | Pairs::Panels { data, .. } => data,
        }
    }

    /// Whether `x` rows (or columns) of `kp` pairs lie inside the data (a whole last panel
    /// for `Panels`: the kernel reads its 16-lane halves under a mask, but from whole panels).
    fn holds(&self, x: usize, kp: usize) -> bool {
        if x == 0 || kp == 0 {
            return true;
        }
        let need = match *self {
            Pairs::Rows { ld, .. } => (x - 1) * ld + kp,
            Pairs::Panels { stride, .. } => ((x - 1) / NR) * stride + kp * NR,
        };
        self.data().len() >= need
    }
}

/// Words `pack_panels` writes for `x` indices of `kp` pairs at `stride` (≥ 32·kp).
pub fn panels_len(x: usize, stride: usize) -> usize {
    x.div_ceil(NR) * stride
}

/// `dst` ← the f32 `src` `[m, k]` (row stride `ld`) rounded to bf16 as `Pairs::Rows` of
/// `dst_ld` (≥ ⌈k/2⌉) words per row; a zero pads an odd k.
pub fn pack_rows(dst: &mut [u32], dst_ld: usize, src: &[f32], ld: usize, m: usize, k: usize) {
    let kp = k.div_ceil(2);
    assert!(dst_ld >= kp && (m == 0 || dst.len() >= (m - 1) * dst_ld + kp), "pack_rows: dst too short");
    for i in 0..m {
        pack_a_row(&mut dst[i * dst_ld..i * dst_ld + kp], src, ld, m, k, i, 0);
    }
}

/// `dst` ← `Pairs::Panels` of `stride` (≥ 32·⌈k/2⌉) words per panel holding the f32 `src`
/// rounded to bf16 with k running along its rows (`trans`: `src` is `[x, k]`, as K is for
/// q·kᵀ) or down its columns (`src` is `[k, x]`, as V is for p·v); zeros pad an odd k and
/// the last panel past x.
#[allow(clippy::too_many_arguments)]
pub fn pack_panels(dst: &mut [u32], stride: usize, src: &[f32], ld: usize, trans: bool, x: usize, k: usize) {
    let kp = k.div_ceil(2);
    assert!(stride >= kp * NR && dst.len() >= panels_len(x, stride), "pack_panels: dst too short");
    let block = RhsBlock { w: src, ld, trans, n: x, k, pc: 0, kp };
    for (q, panel) in dst.chunks_mut(stride).take(x.div_ceil(NR)).enumerate() {
        pack_b_panel(&mut panel[..kp * NR], &block, q * NR);
    }
}

/// `c[m×n] (+)= A[m×kp pairs] · B[kp pairs×n]`: `c` row-major with leading dimension `ldc`,
/// overwritten unless `accumulate`; `b` must be `Pairs::Panels`. Runs on the calling thread.
/// Panics if an operand is too short for its shape.
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, n: usize, kp: usize, a: Pairs, b: Pairs, c: &mut [f32], ldc: usize, accumulate: bool) {
    assert!(matches!(b, Pairs::Panels { .. }), "gemm_bf16::pairs::gemm: b must be panels");
    assert!(a.holds(m, kp), "gemm_bf16::pairs::gemm: a too short");
    assert!(b.holds(n, kp), "gemm_bf16::pairs::gemm: b too short");
    assert!(m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n, "gemm_bf16::pairs::gemm: c too short");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::available() {
        // SAFETY: AVX-512F and AVX-512 BF16 are present (checked above); the asserts bound
        // every index the kernel forms (rows < m of a, whole panels of b up to column n,
        // rows < m and columns < n of c).
        unsafe { x86::gemm(m, n, kp, a, b, c.as_mut_ptr(), ldc, accumulate) };
        return;
    }
    gemm_slow(m, n, kp, a, b, c, ldc, accumulate);
}

/// `gemm` one element at a time, in the kernel's order.
#[allow(clippy::too_many_arguments)]
pub fn gemm_slow(m: usize, n: usize, kp: usize, a: Pairs, b: Pairs, c: &mut [f32], ldc: usize, accumulate: bool) {
    let (ad, bd) = (a.data(), b.data());
    for i in 0..m {
        let (ai, astep) = a.at(i);
        for j in 0..n {
            let (bj, bstep) = b.at(j);
            let mut acc = 0.0f32;
            for p in 0..kp {
                let (x, y) = (ad[ai + p * astep], bd[bj + p * bstep]);
                acc += from_bf16((x >> 16) as u16) * from_bf16((y >> 16) as u16);
                acc += from_bf16(x as u16) * from_bf16(y as u16);
            }
            let out = &mut c[i * ldc + j];
            *out = if accumulate { *out + acc } else { acc };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::NR;
    use super::Pairs;
    use std::arch::x86_64::*;

    /// Rows per tile (a divisor of NR, so that a tile of panel-packed A rows lies in one panel).
    const MR: usize = 8;

    /// The 8 × 32 tile of rows `arow` (pointers to each row's first pair, consecutive pairs
    /// `ASTEP` words apart) times one B panel (`bp`: pair p's 32 columns at `32p`), over
    /// `kp` pairs, in 16 zmm accumulators: per pair two loads of B, eight broadcasts of A,
    /// 16 `vdpbf16ps`. Panels are whole (zero-padded past n), so no load is masked.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const ASTEP: usize>(kp: usize, arow: &[*const u32; MR], bp: *const u32) -> [[__m512; 2]; MR] {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            // SAFETY: pair p < kp of a whole panel and of rows the caller bounds.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const _));
                for r in 0..MR {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*arow[r].add(p * ASTEP) as i32));
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
                }
            }
        }
        acc
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(m: usize, n: usize, kp: usize, a: Pairs, b: Pairs, c: *mut f32, ldc: usize, accumulate: bool) {
        let (ap, bp) = (a.data().as_ptr(), b.data().as_ptr());
        let panels = matches!(a, Pairs::Panels { .. });
        for i0 in (0..m).step_by(MR) {
            let rows = (m - i0).min(MR);
            // Rows past m repeat the last row of a (valid memory); they are never stored.
            // SAFETY: row offsets of rows < m, inside a (the caller's asserts).
            let arow: [*const u32; MR] = std::array::from_fn(|r| unsafe { ap.add(a.at(i0 + r.min(rows - 1)).0) });
            for j0 in (0..n).step_by(NR) {
                // SAFETY: panel j0/32 holds a live column, so it is whole (asserted).
                let panel = unsafe { bp.add(b.at(j0).0) };
                let acc = unsafe { if panels { tile::<NR>(kp, &arow, panel) } else { tile::<1>(kp, &arow, panel) } };
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    for (v, &val) in acc.iter().enumerate() {
                        let live = n.saturating_sub(j0 + 16 * v).min(16);
                        if live == 0 {
                            continue;
                        }
                        let mask = ((1u32 << live) - 1) as __mmask16;
                        // SAFETY: row i0 + r < m of c, columns masked to < n.
                        let out = unsafe { c.add((i0 + r) * ldc + j0 + 16 * v) };
                        let val = if accumulate {
                            _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(mask, out) }, val)
                        } else {
                            val
                        };
                        unsafe { _mm512_mask_storeu_ps(out, mask, val) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::to_bf16;
    use super::*;
    use crate::ops::testing::randn;
    use crate::rng::Rng;

    fn round(x: f32) -> f64 {
        from_bf16(to_bf16(x)) as f64
    }

    /// Against an f64 product of the bf16-rounded operands, with A packed both ways and B
    /// both ways (k along or across the source's rows), tails in every dimension (rows not
    /// a multiple of 6, columns not a multiple of 16, 32 or 64, odd k), a window of pairs
    /// starting past 0, overwrite and accumulate; the fast kernel and `gemm_slow` agree.
    #[test]
    fn matches_reference_on_odd_shapes() {
        let mut rng = Rng::new(5);
        for &(m, n, k, p0) in &[
            (1usize, 1usize, 1usize, 0usize),
            (6, 64, 64, 0),
            (7, 65, 3, 0),
            (64, 256, 64, 0),
            (13, 33, 129, 2),
            (40, 17, 70, 3),
        ] {
            let kt = k + 2 * p0; // the sources hold p0 pairs before the window
            let (kpt, kp) = (kt.div_ceil(2), k.div_ceil(2));
            for a_panels in [false, true] {
                for b_trans in [false, true] {
                    // A's source: [m, kt] (rows) or [kt, m] (panels); B's: [n, kt] or [kt, n].
                    let (lda, ldb, ldc) =
                        (if a_panels { m + 3 } else { kt + 1 }, if b_trans { kt + 5 } else { n + 2 }, n + 1);
                    let a_src = randn(&mut rng, if a_panels { kt * lda } else { m * lda });
                    let b_src = randn(&mut rng, if b_trans { n * ldb } else { kt * ldb });
                    let aval = |i: usize, kk: usize| if a_panels { a_src[kk * lda + i] } else { a_src[i * lda + kk] };
                    let bval = |kk: usize, j: usize| if b_trans { b_src[j * ldb + kk] } else { b_src[kk * ldb + j] };
                    let (astride, bstride) = (NR * kpt + 7, NR * kpt + 3);
                    let mut apack = vec![0u32; panels_len(m, astride).max(m * kpt)];
                    let a = if a_panels {
                        pack_panels(&mut apack, astride, &a_src, lda, false, m, kt);
                        Pairs::Panels { data: &apack[NR * p0..], stride: astride }
                    } else {
                        pack_rows(&mut apack, kpt, &a_src, lda, m, kt);
                        Pairs::Rows { data: &apack[p0..], ld: kpt }
                    };
                    let mut bpack = vec![0u32; panels_len(n, bstride)];
                    pack_panels(&mut bpack, bstride, &b_src, ldb, b_trans, n, kt);
                    let b = Pairs::Panels { data: &bpack[NR * p0..], stride: bstride };
                    for accumulate in [false, true] {
                        let c0 = randn(&mut rng, m * ldc);
                        let (mut c, mut c_slow) = (c0.clone(), c0.clone());
                        gemm(m, n, kp, a, b, &mut c, ldc, accumulate);
                        gemm_slow(m, n, kp, a, b, &mut c_slow, ldc, accumulate);
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j];
                                if j >= n {
                                    assert_eq!(got, c0[i * ldc + j], "column {j} past n was written");
                                    continue;
                                }
                                let ks = 2 * p0..(2 * p0 + 2 * kp).min(kt);
                                let dot: f64 = ks.clone().map(|kk| round(aval(i, kk)) * round(bval(kk, j))).sum();
                                let mag: f64 = ks.map(|kk| (round(aval(i, kk)) * round(bval(kk, j))).abs()).sum();
                                let want = dot + if accumulate { c0[i * ldc + j] as f64 } else { 0.0 };
                                let tol = 1e-6 * (kp as f64 + 1.0) * (1.0 + mag + want.abs());
                                let what = format!(
                                    "{m}x{n}x{k} p0 {p0} a_panels {a_panels} b_trans {b_trans} acc {accumulate} ({i},{j})"
                                );
                                assert!((got as f64 - want).abs() <= tol, "{what}: {got} vs {want}");
                                let slow = c_slow[i * ldc + j];
                                assert!((got - slow).abs() as f64 <= tol, "{what}: fast {got} vs slow {slow}");
                            }
                        }
                    }
                }
            }
        }
    }
}
