//! A bf16 × bf16 → f32 GEMM for products with a frozen bf16 weight: `c (+)= a · op(W)`,
//! where `a` is f32 (activations or their gradients, rounded to bf16 while packing, as
//! PyTorch's bf16 autocast rounds them) and `W` holds bf16 bits. Products of two bf16 values
//! are exact in f32; they are accumulated in f32. On x86-64 with AVX-512 BF16 (`vdpbf16ps`:
//! 32 multiply-adds per instruction, twice an f32 FMA's 16) a 12 × 32 register-tile
//! microkernel runs; everywhere else a portable kernel computes the same thing slowly
//! (`available` says which — callers use this GEMM only where it is fast, and fall back to
//! their f32 path elsewhere).
//!
//! Packing: `a` goes into panels of MR rows, `W` into panels of NR columns; both hold
//! consecutive k in pairs (one u32 per (row or column, k-pair): the even k in the low half),
//! which is the operand shape `vdpbf16ps` multiplies. k runs in blocks of `KCP` pairs (C is
//! accumulated across blocks) and n in blocks of `NC` columns, so the packed scratch is a
//! fixed size set once (`Bf16Gemm::new`); a call never allocates.

mod pack;
pub mod pairs;

use super::Par;
use pack::{RhsBlock, pack_a_row, pack_b_panel};
use rayon::prelude::*;

/// Rows of the register tile.
const MR: usize = 12;
/// Columns of the register tile (two 16-lane vectors).
const NR: usize = 32;
/// k-pairs per block.
pub const KCP: usize = 384;
/// Columns per block (a multiple of NR).
pub const NC: usize = 2048;

/// Whether the fast (AVX-512 BF16) kernel runs on this machine.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// GFLOP/s of the microkernel alone on panels that stay in L1 (kp = 64 pairs), run on every
/// thread of `par` at once for ~`budget` seconds: the practical bf16 peak of this machine,
/// the denominator of `anetrain bench lora-gemm`'s share of peak. 0 without AVX-512 BF16.
pub fn kernel_peak_gflops(par: Par, budget: f64) -> f64 {
    if !available() {
        return 0.0;
    }
    const KP: usize = 64;
    const REPS: usize = 2000;
    let ap = vec![0x3f80_3f80u32; KP * MR];
    let bp = vec![0x3f80_3f80u32; KP * NR];
    let run = || {
        let mut t = [0.0f32; MR * NR];
        for _ in 0..REPS {
            tile(true, KP, &ap, &bp, &mut t, NR, MR, NR, true);
        }
        std::hint::black_box(&t);
    };
    let secs = crate::bench::time_best(budget, || {
        (0..par.threads.max(1)).into_par_iter().for_each(|_| run());
    });
    (par.threads.max(1) * REPS * MR * NR * 2 * KP * 2) as f64 / secs / 1e9
}

/// f32 → bf16 bits, round to nearest even (NaN stays a quiet NaN). Branch-free on finite
/// values so that packing loops vectorise.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { ((b >> 16) as u16) | 0x40 } else { rounded }
}

#[inline]
fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The right-hand operand: `W` row-major with leading dimension `ld`, as bf16 bits, or as
/// f32 rounded to bf16 while packing (`*F32`: for a weight kept in f32, such as a tied
/// embedding used as the classifier).
#[derive(Clone, Copy)]
pub enum Bf16Rhs<'a> {
    /// `W` `[n, k]` (a linear layer's `[out, in]`): the product is `a · Wᵀ` (the forward).
    T(&'a [u16], usize),
    /// `W` `[k, n]`: the product is `a · W` (a linear layer's input gradient).
    N(&'a [u16], usize),
    /// `T` with f32 storage.
    TF32(&'a [f32], usize),
    /// `N` with f32 storage.
    NF32(&'a [f32], usize),
}

/// Packed scratch for `gemm`, sized once for at most `max_m` rows.
pub struct Bf16Gemm {
    max_m: usize,
    /// k-pairs per block (`KCP` unless a benchmark chose otherwise)
    kcp: usize,
    /// columns per block, a multiple of NR (`NC` unless a benchmark chose otherwise)
    nc: usize,
    /// `[⌈max_m/MR⌉·MR, kcp]` pairs (row-major: row i's pairs at `i·kp`)
    a: Vec<u32>,
    /// `[nc/NR, kcp, NR]` pairs
    b: Vec<u32>,
}

impl Bf16Gemm {
    /// Scratch for products of up to `max_m` rows: (⌈max_m/12⌉·12 + 2048) · 384 · 4 bytes
    /// (about 4.7 MB at 1,024 rows), allocated fallibly.
    pub fn new(max_m: usize) -> anyhow::Result<Self> {
        Self::with_blocking(max_m, KCP, NC)
    }

    /// `new` with `kcp` k-pairs and `nc` columns per block instead of the defaults (for
    /// benchmarks that tune the blocking; results are the same up to f32 summation order).
    pub fn with_blocking(max_m: usize, kcp: usize, nc: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            kcp >= 1 && nc >= NR && nc.is_multiple_of(NR),
            "bf16 GEMM blocking: k-pairs {kcp} must be >= 1 and columns {nc} a positive multiple of {NR}"
        );
        let a_len = max_m.div_ceil(MR) * MR * kcp;
        let what = "the bf16 GEMM's packing scratch";
        let a = crate::memory::try_zeroed::<u32>(a_len, what)?;
        let b = crate::memory::try_zeroed::<u32>(nc * kcp, what)?;
        Ok(Bf16Gemm { max_m, kcp, nc, a, b })
    }

    /// `c[m×n] (+)= round_bf16(a[m×k]) · op(W)` with `a` row-major of leading dimension
    /// `lda` and `c` of `ldc`; adds into `c` when `accumulate`, overwrites it otherwise.
    /// Panics if a slice is too short for its shape or `m` exceeds the scratch's rows.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &mut self,
        par: Par,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        w: Bf16Rhs,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        self.run(par, m, n, k, a, lda, w, c, ldc, accumulate, true);
    }

    /// Only the packing `gemm` does for this product (`c` is left alone): for benchmarks
    /// that split a call's time into packing and the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn pack_only(
        &mut self,
        par: Par,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        w: Bf16Rhs,
        c: &mut [f32],
        ldc: usize,
    ) {
        self.run(par, m, n, k, a, lda, w, c, ldc, true, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        par: Par,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        w: Bf16Rhs,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
        compute: bool,
    ) {
        assert!(m <= self.max_m, "bf16 gemm: {m} rows, scratch sized for {}", self.max_m);
        if m == 0 || n == 0 {
            return;
        }
        assert!(lda >= k && a.len() >= (m - 1) * lda + k, "bf16 gemm: lhs too short");
        assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "bf16 gemm: dst too short");
        let t_ok = |len: usize, ld: usize| ld >= k && len >= (n - 1) * ld + k;
        let n_ok = |len: usize, ld: usize| k == 0 || (ld >= n && len >= (k - 1) * ld + n);
        let ok = match w {
            Bf16Rhs::T(w, ld) => t_ok(w.len(), ld),
            Bf16Rhs::TF32(w, ld) => t_ok(w.len(), ld),
            Bf16Rhs::N(w, ld) => n_ok(w.len(), ld),
            Bf16Rhs::NF32(w, ld) => n_ok(w.len(), ld),
        };
        assert!(ok, "bf16 gemm: rhs too short");
        if k == 0 {
            if !accumulate {
                (0..m).for_each(|i| c[i * ldc..i * ldc + n].fill(0.0));
            }
            return;
        }
        let fast = available();
        let panels = m.div_ceil(MR);
        let kp_total = k.div_ceil(2);
        // Equal k blocks of at most `self.kcp` pairs: a short last block (480 pairs as
        // 384 + 96) would pass over c once more for little work.
        let kcp = kp_total.div_ceil(kp_total.div_ceil(self.kcp));
        let nc_max = self.nc;
        for pc in (0..kp_total).step_by(kcp) {
            let kp = kcp.min(kp_total - pc);
            let acc = accumulate || pc > 0;
            // A block: rows 0..m, k-pairs pc..pc+kp.
            let a_blk = &mut self.a[..panels * kp * MR];
            let pack_a = |(i, dst): (usize, &mut [u32])| pack_a_row(dst, a, lda, m, k, i, pc);
            if par.threads > 1 {
                a_blk.par_chunks_mut(kp).enumerate().with_min_len(64).for_each(pack_a);
            } else {
                a_blk.chunks_mut(kp).enumerate().for_each(pack_a);
            }
            for jc in (0..n).step_by(nc_max) {
                let nc = nc_max.min(n - jc);
                let qn = nc.div_ceil(NR);
                let b_blk = &mut self.b[..qn * kp * NR];
                let pack_b = |(q, dst): (usize, &mut [u32])| {
                    let j0 = jc + q * NR;
                    match w {
                        Bf16Rhs::T(w, ld) => pack_b_panel(dst, &RhsBlock { w, ld, trans: true, n, k, pc, kp }, j0),
                        Bf16Rhs::N(w, ld) => pack_b_panel(dst, &RhsBlock { w, ld, trans: false, n, k, pc, kp }, j0),
                        Bf16Rhs::TF32(w, ld) => pack_b_panel(dst, &RhsBlock { w, ld, trans: true, n, k, pc, kp }, j0),
                        Bf16Rhs::NF32(w, ld) => pack_b_panel(dst, &RhsBlock { w, ld, trans: false, n, k, pc, kp }, j0),
                    }
                };
                if par.threads > 1 {
                    b_blk.par_chunks_mut(kp * NR).enumerate().for_each(pack_b);
                } else {
                    b_blk.chunks_mut(kp * NR).enumerate().for_each(pack_b);
                }
                if !compute {
                    continue;
                }
                let (a_blk, b_blk) = (&self.a[..panels * kp * MR], &self.b[..qn * kp * NR]);
                // Each task owns MR whole rows of c (columns jc..jc+nc of them).
                let rows = |(p, c_rows): (usize, &mut [f32])| {
                    let mr = MR.min(m - p * MR);
                    // MR rows of kp pairs each.
                    let ap = &a_blk[p * kp * MR..(p + 1) * kp * MR];
                    for q in 0..qn {
                        let nr = NR.min(nc - q * NR);
                        let bp = &b_blk[q * kp * NR..(q + 1) * kp * NR];
                        let cq = &mut c_rows[jc + q * NR..];
                        tile(fast, kp, ap, bp, cq, ldc, mr, nr, acc);
                    }
                };
                // The last row panel may be shorter than MR rows of ldc.
                let c_used = &mut c[..(m - 1) * ldc + n];
                if par.threads > 1 {
                    c_used.par_chunks_mut(MR * ldc).enumerate().for_each(rows);
                } else {
                    c_used.chunks_mut(MR * ldc).enumerate().for_each(rows);
                }
            }
        }
    }
}

/// One `mr × nr` tile of c (its top-left at `c[0]`, leading dimension `ldc`) from an A panel
/// and a B panel of `kp` pairs.
#[allow(clippy::too_many_arguments)]
fn tile(fast: bool, kp: usize, ap: &[u32], bp: &[u32], c: &mut [f32], ldc: usize, mr: usize, nr: usize, acc: bool) {
    let mut t = [0.0f32; MR * NR];
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `available()` checked the CPU features; the panels hold kp·MR and kp·NR
        // pairs (asserted in the kernel).
        unsafe { x86::kernel(kp, ap, bp, &mut t) };
    } else {
        portable_kernel(kp, ap, bp, &mut t);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = fast;
        portable_kernel(kp, ap, bp, &mut t);
    }
    for i in 0..mr {
        let dst = &mut c[i * ldc..i * ldc + nr];
        let src = &t[i * NR..i * NR + nr];
        if acc {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        } else {
            dst.copy_from_slice(src);
        }
    }
}

/// The same products as the AVX-512 kernel, in plain Rust: per pair, the odd k's product
/// then the even k's, added in f32 (the order `vdpbf16ps` documents).
fn portable_kernel(kp: usize, ap: &[u32], bp: &[u32], t: &mut [f32; MR * NR]) {
    for p in 0..kp {
        let b = &bp[p * NR..(p + 1) * NR];
        for i in 0..MR {
            let av = ap[i * kp + p];
            let (alo, ahi) = (from_bf16(av as u16), from_bf16((av >> 16) as u16));
            for (j, &bv) in b.iter().enumerate() {
                let (blo, bhi) = (from_bf16(bv as u16), from_bf16((bv >> 16) as u16));
                let x = &mut t[i * NR + j];
                *x += ahi * bhi;
                *x += alo * blo;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `t [MR, NR] = Σ_p a_p ⊗ b_p` over `kp` packed pairs (A: MR rows of kp pairs; B: kp
    /// rows of NR pairs), in 24 zmm accumulators.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn kernel(kp: usize, ap: &[u32], bp: &[u32], t: &mut [f32; MR * NR]) {
        assert!(ap.len() >= kp * MR && bp.len() >= kp * NR);
        let (a, b) = (ap.as_ptr(), bp.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        for p in 0..kp {
            // SAFETY: p < kp and the lengths were asserted above.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
                for i in 0..MR {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * kp + p) as i32));
                    acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], av, b0);
                    acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], av, b1);
                }
            }
        }
        for i in 0..MR {
            // SAFETY: row i of t holds NR = 32 floats.
            unsafe {
                _mm512_storeu_ps(t.as_mut_ptr().add(i * NR), acc[2 * i]);
                _mm512_storeu_ps(t.as_mut_ptr().add(i * NR + 16), acc[2 * i + 1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::randn;
    use crate::rng::Rng;

    /// Σ_k a[i,k]·op(W)[k,j] in f64 over the bf16-rounded values, and Σ |a·w| for the bound.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], w: Bf16Rhs) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut g) = (0.0f64, 0.0f64);
                for kk in 0..k {
                    let x = from_bf16(to_bf16(a[i * k + kk])) as f64;
                    let y = match w {
                        Bf16Rhs::T(w, ld) => from_bf16(w[j * ld + kk]),
                        Bf16Rhs::N(w, ld) => from_bf16(w[kk * ld + j]),
                        Bf16Rhs::TF32(w, ld) => from_bf16(to_bf16(w[j * ld + kk])),
                        Bf16Rhs::NF32(w, ld) => from_bf16(to_bf16(w[kk * ld + j])),
                    } as f64;
                    s += x * y;
                    g += (x * y).abs();
                }
                out[i * n + j] = s;
                mag[i * n + j] = g;
            }
        }
        (out, mag)
    }

    /// Fast (or portable) against the f64 reference on the same bf16 inputs: the only error
    /// left is f32 accumulation, bounded by k · 2⁻²⁴ · Σ|a·w| (times a small constant). Odd
    /// shapes cover every edge: m past a tile, n past a tile and a column block, k odd and
    /// past a k block.
    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut rng = Rng::new(11);
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 3), (25, 2049 + 40, 7), (12, 32, 2 * KCP + 5), (30, 70, 769)] {
            let a = randn(&mut rng, m * k);
            for (trans, f32_rhs) in [(true, false), (false, false), (true, true), (false, true)] {
                let wf = randn(&mut rng, n * k);
                let w: Vec<u16> = wf.iter().map(|&x| to_bf16(x)).collect();
                let rhs = match (trans, f32_rhs) {
                    (true, false) => Bf16Rhs::T(&w, k),
                    (false, false) => Bf16Rhs::N(&w, n),
                    (true, true) => Bf16Rhs::TF32(&wf, k),
                    (false, true) => Bf16Rhs::NF32(&wf, n),
                };
                let (want, mag) = reference(m, n, k, &a, rhs);
                for threads in [1, 2] {
                    let par = Par { threads, ..Par::seq() };
                    let mut g = Bf16Gemm::new(m).unwrap();
                    let mut c = vec![0.5f32; m * n];
                    g.gemm(par, m, n, k, &a, k, rhs, &mut c, n, true);
                    for i in 0..m * n {
                        let tol = 4.0 * k as f64 * f32::EPSILON as f64 * (mag[i] + 0.5) + 1e-30;
                        let err = (c[i] as f64 - 0.5 - want[i]).abs();
                        assert!(err <= tol, "m{m} n{n} k{k} trans {trans} t{threads} [{i}]: {} vs {}", c[i], want[i]);
                    }
                    // Overwrite mode ignores what c held.
                    c.fill(f32::NAN);
                    g.gemm(par, m, n, k, &a, k, rhs, &mut c, n, false);
                    for i in 0..m * n {
                        let tol = 4.0 * k as f64 * f32::EPSILON as f64 * mag[i] + 1e-30;
                        assert!((c[i] as f64 - want[i]).abs() <= tol, "overwrite [{i}]: {} vs {}", c[i], want[i]);
                    }
                }
            }
        }
    }

    /// Other blockings (several k and column blocks on small shapes) compute the same
    /// products; `with_blocking` refuses column blocks that are not whole register tiles.
    #[test]
    fn other_blockings_match_f64_reference() {
        let mut rng = Rng::new(12);
        let (m, n, k) = (29, 150, 41);
        let a = randn(&mut rng, m * k);
        let w: Vec<u16> = randn(&mut rng, n * k).iter().map(|&x| to_bf16(x)).collect();
        for rhs in [Bf16Rhs::T(&w, k), Bf16Rhs::N(&w, n)] {
            let (want, mag) = reference(m, n, k, &a, rhs);
            for (kcp, nc) in [(1, 32), (5, 64), (7, 96), (KCP, NC)] {
                let mut c = vec![f32::NAN; m * n];
                let mut g = Bf16Gemm::with_blocking(m, kcp, nc).unwrap();
                g.gemm(Par { threads: 2, ..Par::seq() }, m, n, k, &a, k, rhs, &mut c, n, false);
                for i in 0..m * n {
                    let tol = 4.0 * k as f64 * f32::EPSILON as f64 * mag[i] + 1e-30;
                    assert!((c[i] as f64 - want[i]).abs() <= tol, "kcp {kcp} nc {nc} [{i}]: {} vs {}", c[i], want[i]);
                }
            }
        }
        assert!(Bf16Gemm::with_blocking(4, 8, 48).is_err());
        assert!(Bf16Gemm::with_blocking(4, 0, 64).is_err());
    }

    /// Strided operands and destination (a column block of a wider matrix), the way the
    /// stacked q/k/v and gate/up projections use it: columns outside the block stay untouched.
    #[test]
    fn strided_operands_leave_the_rest_alone() {
        let mut rng = Rng::new(5);
        let (m, n, k, lda, ldw, ldc) = (17, 40, 50, 64, 72, 100);
        let a = randn(&mut rng, m * lda);
        let w: Vec<u16> = randn(&mut rng, n * ldw).iter().map(|&x| to_bf16(x)).collect();
        let mut c = vec![7.0f32; m * ldc];
        let mut g = Bf16Gemm::new(m).unwrap();
        g.gemm(Par::seq(), m, n, k, &a, lda, Bf16Rhs::T(&w, ldw), &mut c, ldc, false);
        let dense: Vec<f32> = (0..m).flat_map(|i| a[i * lda..i * lda + k].to_vec()).collect();
        let wd: Vec<u16> = (0..n).flat_map(|j| w[j * ldw..j * ldw + k].to_vec()).collect();
        let (want, mag) = reference(m, n, k, &dense, Bf16Rhs::T(&wd, k));
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                if j < n {
                    let tol = 4.0 * k as f64 * f32::EPSILON as f64 * mag[i * n + j];
                    assert!((got as f64 - want[i * n + j]).abs() <= tol, "[{i},{j}]");
                } else {
                    assert_eq!(got, 7.0, "[{i},{j}] outside the block was written");
                }
            }
        }
    }

    /// Against the exact f32 product of the unrounded activations, the error is the bf16
    /// rounding of `a` (2⁻⁹ relative per element): bounded by 2⁻⁸ · Σ|a·w|, and well above
    /// the f32 GEMM's — this is the documented numerics change of the bf16 path.
    #[test]
    fn activation_rounding_is_the_only_large_error() {
        let mut rng = Rng::new(3);
        let (m, n, k) = (8, 16, 256);
        let a = randn(&mut rng, m * k);
        let w: Vec<u16> = randn(&mut rng, n * k).iter().map(|&x| to_bf16(x)).collect();
        let mut c = vec![0.0f32; m * n];
        Bf16Gemm::new(m).unwrap().gemm(Par::seq(), m, n, k, &a, k, Bf16Rhs::T(&w, k), &mut c, n, false);
        let mut worst = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut g) = (0.0f64, 0.0f64);
                for kk in 0..k {
                    let p = a[i * k + kk] as f64 * from_bf16(w[j * k + kk]) as f64;
                    s += p;
                    g += p.abs();
                }
                let err = (c[i * n + j] as f64 - s).abs();
                assert!(err <= g / 256.0, "[{i},{j}] error {err} over 2^-8 of {g}");
                worst = worst.max(err / g);
            }
        }
        assert!(worst > 1e-6, "activations were not rounded to bf16 (relative error {worst})");
    }

    /// The portable kernel (what runs without AVX-512 BF16) computes the same tile as the
    /// fast one, to f32 accumulation order.
    #[test]
    fn portable_kernel_matches_the_fast_one() {
        let mut rng = Rng::new(9);
        let kp = 37;
        let ap: Vec<u32> = (0..kp * MR)
            .map(|_| to_bf16(rng.normal() as f32) as u32 | ((to_bf16(rng.normal() as f32) as u32) << 16))
            .collect();
        let bp: Vec<u32> = (0..kp * NR)
            .map(|_| to_bf16(rng.normal() as f32) as u32 | ((to_bf16(rng.normal() as f32) as u32) << 16))
            .collect();
        let mut slow = [0.0f32; MR * NR];
        portable_kernel(kp, &ap, &bp, &mut slow);
        assert!(slow.iter().any(|&x| x != 0.0));
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: only the portable kernel ran");
            return;
        }
        let mut c = vec![0.0f32; MR * NR];
        tile(true, kp, &ap, &bp, &mut c, NR, MR, NR, false);
        for (i, (f, s)) in c.iter().zip(&slow).enumerate() {
            assert!((f - s).abs() <= 1e-4 * (1.0 + s.abs()), "[{i}] fast {f} portable {s}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to the even mantissa (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "rounds up to infinity, as RNE does");
        let mut rng = Rng::new(1);
        for _ in 0..10000 {
            let x = (rng.normal() * 1e3) as f32;
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
    }
}
