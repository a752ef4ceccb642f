//! f32 matrix-vector products for decoding (one token's linear layers), and their batched
//! form for a few rows. Memory-bound: the weights stream once per call, split into one
//! contiguous block of rows per thread.
//!
//! Every output element is one dot product in a fixed order, the same in every variant:
//!
//! ```text
//! acc[l] = fma(x_p, w_p, acc[l])   for p ≡ l (mod 32), p in increasing order;
//!                                  the last partial chunk is padded with zeros (x = w = 0)
//! r16[l] = acc[l] + acc[l + 16];  r8[l] = r16[l] + r16[l + 8];  r4[l] = r8[l] + r8[l + 4]
//! y = (r4[0] + r4[2]) + (r4[1] + r4[3])
//! ```
//!
//! `fma` is the fused multiply-add (one rounding), so the AVX-512 variant (2 zmm accumulators
//! per dot), the AVX2+FMA one (4 ymm) and the portable one (`f32::mul_add`, 32 scalars) give
//! the same bits (tested), whatever the CPU, the thread count or the number of rows batched
//! together: a greedy reply is the same alone or beside others. A kernel call dots one
//! shared vector with up to four others (`matvec_rows`: four rows of x sharing the loads of
//! a weight row); fma is commutative in its first two operands, so that is the same sum as
//! `matvec`'s dot of x with the row.
//!
//! Error: the f32 rounding of a sum of K products in this order is bounded like any f32 sum
//! of K terms (|err| ≤ ~K·ε·Σ|x_p·w_p| in the worst case, ~√K·ε for random signs); the tests
//! check against an f64 reference with the crate's size-scaled tolerance.

use super::team::Team;
use rayon::prelude::*;

/// Lanes of the canonical accumulator (module docs).
pub const LANES: usize = 32;

/// Which instruction set computes the dots; picked once per process (`Kernel::best`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `f32::mul_add` on 32 scalar lanes (any CPU; the reference order).
    Portable,
    /// AVX2 + FMA, four 8-lane registers per dot.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F, two 16-lane registers per dot.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The widest variant this CPU runs.
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Self::available().last().expect("portable is always available"))
    }

    /// Every variant this CPU runs, portable first (for tests and benchmarks).
    pub fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(Kernel::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                v.push(Kernel::Avx512);
            }
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2-fma",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "avx512",
        }
    }
}

/// The canonical dot product (module docs) of `a` and `b`, on the portable path.
pub fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_fma: lengths differ");
    dots_portable::<1>(a, [b])[0]
}

/// `o[t] = dot(s, v[t])` in the canonical order, for N vectors of `s.len()` values.
fn dots_portable<const N: usize>(s: &[f32], v: [&[f32]; N]) -> [f32; N] {
    let mut acc = [[0.0f32; LANES]; N];
    for_each_chunk(s, v, |sc, vc| {
        for (a, vt) in acc.iter_mut().zip(vc) {
            for l in 0..LANES {
                a[l] = sc[l].mul_add(vt[l], a[l]);
            }
        }
    });
    acc.map(|a| reduce32(&a))
}

/// Runs `step` on the 32-lane chunks of `s` and of every `v[t]` in increasing order, the last
/// partial chunk zero-padded (module docs): the one loop of every kernel.
#[inline(always)]
fn for_each_chunk<const N: usize>(s: &[f32], v: [&[f32]; N], mut step: impl FnMut(&[f32; LANES], [&[f32; LANES]; N])) {
    assert!(v.iter().all(|vt| vt.len() == s.len()), "dots: the vectors differ in length");
    let (k, full) = (s.len(), s.len() / LANES * LANES);
    // SAFETY: p + 32 ≤ full ≤ every slice's length (checked above), and [f32; 32] has the
    // alignment of f32.
    let at = |x: &[f32], p: usize| unsafe { &*(x.as_ptr().add(p) as *const [f32; LANES]) };
    for p in (0..full).step_by(LANES) {
        step(at(s, p), v.map(|vt| at(vt, p)));
    }
    if full < k {
        let pad = |x: &[f32]| {
            let mut c = [0.0f32; LANES];
            c[..k - full].copy_from_slice(&x[full..k]);
            c
        };
        let vc = v.map(pad);
        step(&pad(s), std::array::from_fn(|t| &vc[t]));
    }
}

/// The canonical reduction of 32 lanes.
#[inline(always)]
fn reduce32(a: &[f32; LANES]) -> f32 {
    let r16: [f32; 16] = std::array::from_fn(|l| a[l] + a[l + 16]);
    let r8: [f32; 8] = std::array::from_fn(|l| r16[l] + r16[l + 8]);
    let r4: [f32; 4] = std::array::from_fn(|l| r8[l] + r8[l + 4]);
    (r4[0] + r4[2]) + (r4[1] + r4[3])
}

/// `o[t] = dot(s, v[t])` for t < N with `kernel`; every `v[t]` as long as `s`.
#[inline(always)]
fn dots<const N: usize>(kernel: Kernel, s: &[f32], v: [&[f32]; N]) -> [f32; N] {
    debug_assert!(v.iter().all(|v| v.len() == s.len()));
    match kernel {
        Kernel::Portable => dots_portable(s, v),
        // SAFETY (both): `Kernel::available` only offers a variant whose features this CPU
        // has, and every slice is `s.len()` long (the kernels read only inside it).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::dots_avx2(s, v) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { x86::dots_avx512(s, v) },
    }
}

/// `out[j] = dot(x, w[j])` for the rows `w` `[out.len(), K]`, one row after another: the
/// weights stream strictly front to back. (Four rows per pass sharing the loads of x was
/// measured slower here, by ~30% at one thread: four interleaved streams defeat the
/// hardware prefetcher, and the loads of x were never the bottleneck.)
#[inline(always)]
fn rows_block(kernel: Kernel, out: &mut [f32], x: &[f32], w: &[f32]) {
    let k = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(k)) {
        *o = dots(kernel, x, [row])[0];
    }
}

/// `o[j·R + i] = dot(x[i], w[j])` for x `[R, K]` and the rows w `[NJ, K]`: each weight row is
/// loaded once per four rows of x.
#[inline(always)]
fn cols_block(kernel: Kernel, o: &mut [f32], x: &[f32], w: &[f32], r: usize, k: usize) {
    for (wj, oj) in w.chunks_exact(k).zip(o.chunks_exact_mut(r)) {
        let mut i = 0;
        while i + 4 <= r {
            let xr = |s: usize| &x[(i + s) * k..(i + s + 1) * k];
            oj[i..i + 4].copy_from_slice(&dots(kernel, wj, [xr(0), xr(1), xr(2), xr(3)]));
            i += 4;
        }
        for i in i..r {
            oj[i] = dots(kernel, wj, [&x[i * k..(i + 1) * k]])[0];
        }
    }
}

/// Fewest multiply-adds worth a rayon task of their own: waking a sleeping worker costs
/// tens of microseconds.
const RAYON_MIN_WORK: usize = 65536;
/// Fewest multiply-adds worth a team member of their own: a spinning helper starts within a
/// microsecond or two, and 16K multiply-adds stream 64 KB of weights (several microseconds).
const TEAM_MIN_WORK: usize = 16384;

/// Fewest weight rows of `work_per_row` multiply-adds that make `work` multiply-adds.
fn min_rows(work_per_row: usize, work: usize) -> usize {
    (work / work_per_row.max(1)).max(1)
}

/// Runs `f(first weight row, its outputs)` over `out` split into contiguous blocks of whole
/// weight rows (`per_row` outputs each), on `team` when given, else on the rayon pool.
fn for_row_blocks(
    team: Option<&mut Team>,
    out: &mut [f32],
    per_row: usize,
    work_per_row: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    match team {
        Some(team) => team.for_chunks(out, per_row, min_rows(work_per_row, TEAM_MIN_WORK), f),
        None => {
            // One contiguous block per thread (each streams its part of `w` front to back).
            let n = out.len() / per_row;
            let rows = n.div_ceil(rayon::current_num_threads()).max(min_rows(work_per_row, RAYON_MIN_WORK));
            out.par_chunks_mut(rows * per_row).enumerate().for_each(|(blk, o)| f(blk * rows, o));
        }
    }
}

/// out `[N]` = w `[N, K]` · x `[K]`: one token's linear layer.
pub fn matvec(out: &mut [f32], x: &[f32], w: &[f32], k: usize, n: usize) {
    matvec_on(Kernel::best(), None, out, x, w, k, n)
}

/// `matvec` with a chosen kernel (tests and benchmarks pass one), on `team` when given (else
/// the rayon pool).
pub fn matvec_on(kernel: Kernel, team: Option<&mut Team>, out: &mut [f32], x: &[f32], w: &[f32], k: usize, n: usize) {
    assert!(x.len() >= k && w.len() >= n * k && out.len() >= n, "matvec: operand too short");
    if k == 0 {
        return out[..n].fill(0.0);
    }
    // Dispatch inside each block, so the whole loop is compiled for the kernel's features.
    for_row_blocks(team, &mut out[..n], 1, k, |j0, o| {
        let w = &w[j0 * k..][..o.len() * k];
        match kernel {
            Kernel::Portable => rows_block(Kernel::Portable, o, &x[..k], w),
            // SAFETY (both): the kernel was offered by `Kernel::available`, so the CPU has
            // its features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::rows_block_avx2(o, &x[..k], w) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::rows_block_avx512(o, &x[..k], w) },
        }
    });
}

/// out `[R, N]` = x `[R, K]` · w `[N, K]`ᵀ for a few rows R (batched decoding): each thread
/// streams its block of `w`'s rows once for all R rows. Element (r, j) is the same sum
/// `matvec` forms (module docs), whatever R is and however the rows are split. `scratch`
/// holds the transposed result `[N, R]` (at least N·R values).
pub fn matvec_rows(out: &mut [f32], scratch: &mut [f32], x: &[f32], w: &[f32], r: usize, k: usize, n: usize) {
    matvec_rows_on(Kernel::best(), None, out, scratch, x, w, r, k, n)
}

/// `matvec_rows` with a chosen kernel (tests and benchmarks pass one), on `team` when given
/// (else the rayon pool); the bits are the same either way.
#[allow(clippy::too_many_arguments)]
pub fn matvec_rows_on(
    kernel: Kernel,
    team: Option<&mut Team>,
    out: &mut [f32],
    scratch: &mut [f32],
    x: &[f32],
    w: &[f32],
    r: usize,
    k: usize,
    n: usize,
) {
    assert!(x.len() >= r * k && w.len() >= n * k && out.len() >= r * n, "matvec_rows: operand too short");
    assert!(r <= 1 || scratch.len() >= r * n, "matvec_rows: scratch too short");
    if r == 1 {
        return matvec_on(kernel, team, out, x, w, k, n);
    }
    if r == 0 || n == 0 {
        return;
    }
    if k == 0 {
        return out[..r * n].fill(0.0);
    }
    for_row_blocks(team, &mut scratch[..n * r], r, k * r, |j0, o| {
        let w = &w[j0 * k..][..o.len() / r * k];
        match kernel {
            Kernel::Portable => cols_block(Kernel::Portable, o, &x[..r * k], w, r, k),
            // SAFETY (both): as in `matvec_on`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::cols_block_avx2(o, &x[..r * k], w, r, k) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::cols_block_avx512(o, &x[..r * k], w, r, k) },
        }
    });
    for (i, row) in out[..r * n].chunks_exact_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = scratch[j * r + i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // lane and row indices mirror the module docs
mod x86 {
    use super::{Kernel, cols_block, rows_block};
    use std::arch::x86_64::*;

    // The loops compiled with the kernel's features, so `dots` inlines into them.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_block_avx2(out: &mut [f32], x: &[f32], w: &[f32]) {
        rows_block(Kernel::Avx2, out, x, w)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn rows_block_avx512(out: &mut [f32], x: &[f32], w: &[f32]) {
        rows_block(Kernel::Avx512, out, x, w)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn cols_block_avx2(o: &mut [f32], x: &[f32], w: &[f32], r: usize, k: usize) {
        cols_block(Kernel::Avx2, o, x, w, r, k)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn cols_block_avx512(o: &mut [f32], x: &[f32], w: &[f32], r: usize, k: usize) {
        cols_block(Kernel::Avx512, o, x, w, r, k)
    }

    /// The canonical reduction of 32 lanes held as four 8-lane registers (lanes 0–7, 8–15,
    /// 16–23, 24–31).
    #[inline(always)]
    unsafe fn reduce_ymm(a: [__m256; 4]) -> f32 {
        // SAFETY: register-only; inlined into the AVX2 kernels.
        unsafe {
            // r16 = lanes l and l + 16; r8 = r16's l and l + 8.
            let r8 = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
            let r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps::<1>(r8));
            // [r4[0] + r4[2], r4[1] + r4[3], ..]
            let r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
            _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps::<0b01>(r2, r2)))
        }
    }

    /// `dots` on AVX2+FMA. SAFETY: the CPU has AVX2 and FMA; every `v[t]` is `s.len()` long.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_avx2<const N: usize>(s: &[f32], v: [&[f32]; N]) -> [f32; N] {
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        super::for_each_chunk(s, v, |sc, vc| {
            for q in 0..4 {
                // SAFETY: 8·q + 8 ≤ 32, inside each chunk.
                unsafe {
                    let sv = _mm256_loadu_ps(sc.as_ptr().add(8 * q));
                    for t in 0..N {
                        acc[t][q] = _mm256_fmadd_ps(sv, _mm256_loadu_ps(vc[t].as_ptr().add(8 * q)), acc[t][q]);
                    }
                }
            }
        });
        let mut out = [0.0f32; N];
        for t in 0..N {
            // SAFETY: register-only.
            out[t] = unsafe { reduce_ymm(acc[t]) };
        }
        out
    }

    /// `dots` on AVX-512F. SAFETY: the CPU has AVX-512F; every `v[t]` is `s.len()` long.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn dots_avx512<const N: usize>(s: &[f32], v: [&[f32]; N]) -> [f32; N] {
        let mut lo = [_mm512_setzero_ps(); N];
        let mut hi = [_mm512_setzero_ps(); N];
        super::for_each_chunk(s, v, |sc, vc| {
            // SAFETY: both 16-lane halves lie inside each chunk.
            unsafe {
                let (s0, s1) = (_mm512_loadu_ps(sc.as_ptr()), _mm512_loadu_ps(sc.as_ptr().add(16)));
                for t in 0..N {
                    lo[t] = _mm512_fmadd_ps(s0, _mm512_loadu_ps(vc[t].as_ptr()), lo[t]);
                    hi[t] = _mm512_fmadd_ps(s1, _mm512_loadu_ps(vc[t].as_ptr().add(16)), hi[t]);
                }
            }
        });
        let mut out = [0.0f32; N];
        for t in 0..N {
            // r16 = lo + hi; then its 8-lane halves, as reduce_ymm.
            let r16 = _mm512_add_ps(lo[t], hi[t]);
            let top = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(r16)));
            let r8 = _mm256_add_ps(_mm512_castps512_ps256(r16), top);
            let r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps::<1>(r8));
            let r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
            out[t] = _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps::<0b01>(r2, r2)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::matmul_forward_slow;
    use crate::ops::testing::*;

    /// Odd widths (tails of every length class) and row counts that are not multiples of the
    /// four-row tile nor of the thread split.
    const SHAPES: &[(usize, usize)] = &[(1, 1), (7, 13), (31, 5), (32, 4), (33, 200), (100, 3), (768, 65), (577, 31)];

    #[test]
    fn matvec_matches_the_f64_reference_with_every_kernel() {
        let mut rng = crate::rng::Rng::new(12);
        for &(k, n) in SHAPES {
            let x = randn(&mut rng, k);
            let w = randn(&mut rng, n * k);
            let mut want = vec![0.0; n];
            matmul_forward_slow(&mut want, &f64s(&x), &f64s(&w), 1, k, n);
            for kernel in Kernel::available() {
                let mut out = vec![f32::NAN; n];
                matvec_on(kernel, None, &mut out, &x, &w, k, n);
                assert_close(&out, &want, f32_tol(k), &format!("matvec {} k={k} n={n}", kernel.name()));
            }
        }
    }

    /// The SIMD kernels give the portable reference's bits: the order is the one the module
    /// docs define, not merely close to it.
    #[test]
    fn every_kernel_gives_the_portable_bits() {
        let mut rng = crate::rng::Rng::new(13);
        for &(k, n) in SHAPES {
            let x = randn(&mut rng, k);
            let w = randn(&mut rng, n * k);
            let reference: Vec<f32> = w.chunks_exact(k).map(|row| dot_fma(&x, row)).collect();
            for kernel in Kernel::available() {
                let mut out = vec![0.0; n];
                matvec_on(kernel, None, &mut out, &x, &w, k, n);
                for j in 0..n {
                    assert_eq!(out[j].to_bits(), reference[j].to_bits(), "{} k={k} row {j}", kernel.name());
                }
            }
        }
    }

    /// dot_fma's order, spelt out: 32 fused accumulators, then the halving tree.
    #[test]
    fn dot_fma_is_the_documented_order() {
        let mut rng = crate::rng::Rng::new(14);
        for k in [0, 1, 5, 31, 32, 33, 64, 95, 200] {
            let a = randn(&mut rng, k);
            let b = randn(&mut rng, k);
            let mut acc = [0.0f32; LANES];
            for p in 0..k.div_ceil(LANES) * LANES {
                let (x, y) = if p < k { (a[p], b[p]) } else { (0.0, 0.0) };
                acc[p % LANES] = x.mul_add(y, acc[p % LANES]);
            }
            let mut r = acc.to_vec();
            while r.len() > 1 {
                let h = r.len() / 2;
                r = (0..h).map(|l| r[l] + r[l + h]).collect();
            }
            let want = if k == 0 { 0.0 } else { r[0] };
            assert_eq!(dot_fma(&a, &b).to_bits(), want.to_bits(), "k={k}");
        }
    }

    /// Every element of the batched product is bit-identical to the one-row `matvec`'s (what
    /// makes a greedy reply the same alone or batched), for row counts around the tile size,
    /// widths with and without a tail, and every kernel.
    #[test]
    fn matvec_rows_equals_matvec_bit_for_bit() {
        let mut rng = crate::rng::Rng::new(21);
        for &(k, n) in &[(1, 3), (13, 7), (64, 33), (577, 65), (96, 3000)] {
            let w = randn(&mut rng, n * k);
            for r in [2, 3, 4, 5, 7, 8, 9, 16] {
                let x = randn(&mut rng, r * k);
                for kernel in Kernel::available() {
                    let (mut out, mut scratch) = (vec![0.0; r * n], vec![0.0; r * n]);
                    matvec_rows_on(kernel, None, &mut out, &mut scratch, &x, &w, r, k, n);
                    for i in 0..r {
                        let mut one = vec![0.0; n];
                        matvec(&mut one, &x[i * k..(i + 1) * k], &w, k, n);
                        for j in 0..n {
                            let (got, want) = (out[i * n + j], one[j]);
                            assert!(
                                got.to_bits() == want.to_bits(),
                                "{} r={r} k={k} n={n} ({i}, {j}): {got} vs {want}",
                                kernel.name()
                            );
                        }
                    }
                }
            }
        }
    }

    /// The decoding team's row split gives the rayon path's bits, for every kernel, team size
    /// and row count (blocks of whole weight rows, tails included).
    #[test]
    fn a_team_gives_the_rayon_bits() {
        let mut rng = crate::rng::Rng::new(23);
        let mut teams: Vec<Team> = (1..=4).map(|t| Team::new(t).unwrap()).collect();
        for &(k, n) in &[(13, 7), (64, 33), (577, 65), (96, 3000), (288, 1025)] {
            let w = randn(&mut rng, n * k);
            for r in [1, 3, 4, 5] {
                let x = randn(&mut rng, r * k);
                for kernel in Kernel::available() {
                    let (mut want, mut scratch) = (vec![0.0; r * n], vec![0.0; r * n]);
                    matvec_rows_on(kernel, None, &mut want, &mut scratch, &x, &w, r, k, n);
                    for team in teams.iter_mut() {
                        let mut got = vec![f32::NAN; r * n];
                        matvec_rows_on(kernel, Some(&mut *team), &mut got, &mut scratch, &x, &w, r, k, n);
                        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{} team of {} r={r} k={k} n={n}", kernel.name(), team.threads());
                    }
                }
            }
        }
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let mut rng = crate::rng::Rng::new(22);
        let (k, n) = (300, 1001);
        let x = randn(&mut rng, 3 * k);
        let w = randn(&mut rng, n * k);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (mut one, mut three, mut scratch) = (vec![0.0; n], vec![0.0; 3 * n], vec![0.0; 3 * n]);
            pool.install(|| {
                matvec(&mut one, &x[..k], &w, k, n);
                matvec_rows(&mut three, &mut scratch, &x, &w, 3, k, n);
            });
            (one, three)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (a1, a3) = run(1);
        let (b1, b3) = run(3);
        assert_eq!(bits(&a1), bits(&b1));
        assert_eq!(bits(&a3), bits(&b3));
        assert_eq!(bits(&a1), bits(&a3[..n]));
    }
}
