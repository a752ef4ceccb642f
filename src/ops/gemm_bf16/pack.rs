//! Packing for `Bf16Gemm`: f32 activations and bf16 (or f32) weights into the k-pair panels
//! the microkernel reads (one u32 per (row or column, k-pair), the even k in the low half).
//!
//! Each packer has a portable `*_slow` twin; with AVX-512F the fast one converts 16 lanes at a
//! time and transposes `W`'s `[n, k]` rows through 16 × 16 u32 register transposes instead of
//! one scattered store per pair. Both give the same bits (tested, NaN, infinities and
//! subnormals included), so which one ran never shows in a result.

use super::{NR, to_bf16};

/// An element the packing turns into bf16 bits.
pub(super) trait ToBits: Copy + Send + Sync {
    fn bits(self) -> u32;
}

impl ToBits for u16 {
    #[inline]
    fn bits(self) -> u32 {
        self as u32
    }
}

impl ToBits for f32 {
    #[inline]
    fn bits(self) -> u32 {
        to_bf16(self) as u32
    }
}

/// Whether the AVX-512F packers run on this machine.
#[cfg(target_arch = "x86_64")]
fn fast() -> bool {
    crate::ops::exp::has_avx512()
}

/// Packs row `i` of `a` (zeros past m), k-pairs `pc..pc + dst.len()` (a zero past k).
pub(super) fn pack_a_row(dst: &mut [u32], a: &[f32], lda: usize, m: usize, k: usize, i: usize, pc: usize) {
    #[cfg(target_arch = "x86_64")]
    if i < m && fast() {
        let (k0, k1) = (2 * pc, (2 * (pc + dst.len())).min(k));
        let row = &a[i * lda + k0..i * lda + k1];
        // SAFETY: AVX-512F was checked by `fast()`; the kernel stays inside `dst` and `row`.
        let done = unsafe { x86::pack_a_row(dst, row) };
        pack_a_row_slow(&mut dst[done..], a, lda, m, k, i, pc + done);
        return;
    }
    pack_a_row_slow(dst, a, lda, m, k, i, pc)
}

/// `pack_a_row`, one pair at a time.
pub(super) fn pack_a_row_slow(dst: &mut [u32], a: &[f32], lda: usize, m: usize, k: usize, i: usize, pc: usize) {
    if i >= m {
        dst.fill(0);
        return;
    }
    let (k0, k1) = (2 * pc, (2 * (pc + dst.len())).min(k));
    let row = &a[i * lda + k0..i * lda + k1];
    let pairs = row.chunks_exact(2);
    let tail = pairs.remainder();
    let full = row.len() / 2;
    for (d, x) in dst[..full].iter_mut().zip(pairs) {
        *d = to_bf16(x[0]) as u32 | ((to_bf16(x[1]) as u32) << 16);
    }
    if let Some(&x) = tail.first() {
        dst[full] = to_bf16(x) as u32;
    }
    dst[full + tail.len()..].fill(0);
}

/// One k block of the right-hand operand `op(W)` being packed: `W` `[n, k]` (`trans`: the
/// product is `a · Wᵀ`) or `[k, n]`, of leading dimension `ld`; k-pairs `pc..pc + kp`.
pub(super) struct RhsBlock<'a, E> {
    pub w: &'a [E],
    pub ld: usize,
    pub trans: bool,
    pub n: usize,
    pub k: usize,
    pub pc: usize,
    pub kp: usize,
}

/// Packs columns `j0..j0+NR` (zeros past n) of block `b` into `dst` (`kp·NR` pairs).
pub(super) fn pack_b_panel<E: ToBits + 'static>(dst: &mut [u32], b: &RhsBlock<E>, j0: usize) {
    // The fast kernels take whole panels (NR columns from j0) and return how many of its
    // pairs they packed; the slow loop does the rest.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if b.n - j0 >= NR && fast() {
        // SAFETY: AVX-512F was checked by `fast()`; the kernels assert that they index
        // inside `dst` and `w`.
        done = unsafe { if b.trans { x86::pack_t(dst, b, j0) } else { x86::pack_n(dst, b, j0) } };
    }
    pack_b_panel_slow(dst, b, j0, done);
}

/// `pack_b_panel` one pair at a time, for pairs `from..kp` of the panel (the fast kernels
/// leave the tail of a panel to it).
pub(super) fn pack_b_panel_slow<E: ToBits + 'static>(dst: &mut [u32], b: &RhsBlock<E>, j0: usize, from: usize) {
    let RhsBlock { w, ld, trans, n, k, pc, kp } = *b;
    let cols = NR.min(n - j0);
    for p in from..kp {
        let kk = 2 * (pc + p);
        let out = &mut dst[p * NR..(p + 1) * NR];
        let at = |j: usize, kk: usize| if trans { w[(j0 + j) * ld + kk] } else { w[kk * ld + j0 + j] };
        for (j, o) in out[..cols].iter_mut().enumerate() {
            let lo = if kk < k { at(j, kk).bits() } else { 0 };
            let hi = if kk + 1 < k { at(j, kk + 1).bits() } else { 0 };
            *o = lo | (hi << 16);
        }
        out[cols..].fill(0);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::NR;
    use super::{RhsBlock, ToBits};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// `to_bf16` on 16 lanes: each lane's bf16 bits in its low half, the high half zero.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round16(x: __m512) -> __m512i {
        let b = _mm512_castps_si512(x);
        let high = _mm512_srli_epi32::<16>(b);
        let lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)))
    }

    /// 16 k-pairs (32 consecutive values) from `p` as packed pairs.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pairs16<E: ToBits + 'static>(p: *const E) -> __m512i {
        // SAFETY (both arms): the caller guarantees 32 readable values at `p`.
        unsafe {
            if TypeId::of::<E>() == TypeId::of::<f32>() {
                let p = p as *const f32;
                let lo = _mm512_cvtepi32_epi16(round16(_mm512_loadu_ps(p)));
                let hi = _mm512_cvtepi32_epi16(round16(_mm512_loadu_ps(p.add(16))));
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            } else {
                _mm512_loadu_si512(p as *const _)
            }
        }
    }

    /// 16 consecutive values from `p`, each as bf16 bits in the low half of a u32 lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widen16<E: ToBits + 'static>(p: *const E) -> __m512i {
        // SAFETY (both arms): the caller guarantees 16 readable values at `p`.
        unsafe {
            if TypeId::of::<E>() == TypeId::of::<f32>() {
                round16(_mm512_loadu_ps(p as *const f32))
            } else {
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const _))
            }
        }
    }

    /// Packs the whole 16-pair groups of `row` (f32) into `dst`; returns how many pairs.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_a_row(dst: &mut [u32], row: &[f32]) -> usize {
        let groups = (row.len() / 32).min(dst.len() / 16);
        for g in 0..groups {
            // SAFETY: values 32g..32g+32 of `row` and pairs 16g..16g+16 of `dst` exist.
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr().add(16 * g) as *mut _, pairs16(row.as_ptr().add(32 * g))) };
        }
        16 * groups
    }

    /// A 16 × 16 transpose of u32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + q], 128-bit lane L: rows 4i..4i+4 of column 4L + q.
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for q in 0..4 {
            let a = _mm512_shuffle_i32x4::<0x44>(u[q], u[4 + q]);
            let b = _mm512_shuffle_i32x4::<0xEE>(u[q], u[4 + q]);
            let c = _mm512_shuffle_i32x4::<0x44>(u[8 + q], u[12 + q]);
            let d = _mm512_shuffle_i32x4::<0xEE>(u[8 + q], u[12 + q]);
            r[q] = _mm512_shuffle_i32x4::<0x88>(a, c);
            r[4 + q] = _mm512_shuffle_i32x4::<0xDD>(a, c);
            r[8 + q] = _mm512_shuffle_i32x4::<0x88>(b, d);
            r[12 + q] = _mm512_shuffle_i32x4::<0xDD>(b, d);
        }
    }

    /// `pack_b_panel` for `W` `[n, k]` and a full panel (NR columns from j0): the 16-pair
    /// groups whose 32 k all lie below `k`, 16 columns at a time through `transpose16`.
    /// Returns how many pairs of the panel it packed.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_t<E: ToBits + 'static>(dst: &mut [u32], b: &RhsBlock<E>, j0: usize) -> usize {
        let RhsBlock { w, ld, k, pc, kp, .. } = *b;
        let full_pairs = (k.saturating_sub(2 * pc) / 2).min(kp);
        let groups = full_pairs / 16;
        assert!(dst.len() >= kp * NR && w.len() >= (j0 + NR - 1) * ld + 2 * (pc + 16 * groups));
        for g in 0..groups {
            let k0 = 2 * (pc + 16 * g);
            for half in 0..NR / 16 {
                let mut r = [_mm512_setzero_si512(); 16];
                for (j, v) in r.iter_mut().enumerate() {
                    // SAFETY: column j0 + 16·half + j < j0 + NR, k0 + 32 ≤ k (asserted above).
                    *v = unsafe { pairs16(w.as_ptr().add((j0 + 16 * half + j) * ld + k0)) };
                }
                transpose16(&mut r);
                for (pp, v) in r.iter().enumerate() {
                    // SAFETY: pair 16g + pp < kp, columns 16·half..+16 of a row of NR.
                    unsafe { _mm512_storeu_si512(dst.as_mut_ptr().add((16 * g + pp) * NR + 16 * half) as *mut _, *v) };
                }
            }
        }
        16 * groups
    }

    /// `pack_b_panel` for `W` `[k, n]` and a full panel: the pairs whose both k lie below `k`,
    /// interleaving two rows 16 columns at a time. Returns how many pairs it packed.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_n<E: ToBits + 'static>(dst: &mut [u32], b: &RhsBlock<E>, j0: usize) -> usize {
        let RhsBlock { w, ld, k, pc, kp, .. } = *b;
        let full_pairs = (k.saturating_sub(2 * pc) / 2).min(kp);
        assert!(dst.len() >= kp * NR && (full_pairs == 0 || w.len() >= (2 * (pc + full_pairs) - 1) * ld + j0 + NR));
        for p in 0..full_pairs {
            let kk = 2 * (pc + p);
            for half in 0..NR / 16 {
                // SAFETY: rows kk, kk + 1 < k and columns j0 + 16·half..+16 < j0 + NR exist
                // (asserted above); pair p < kp of `dst`.
                unsafe {
                    let lo = widen16(w.as_ptr().add(kk * ld + j0 + 16 * half));
                    let hi = widen16(w.as_ptr().add((kk + 1) * ld + j0 + 16 * half));
                    let v = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                    _mm512_storeu_si512(dst.as_mut_ptr().add(p * NR + 16 * half) as *mut _, v);
                }
            }
        }
        full_pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Normal values plus every edge `to_bf16` treats specially: both NaN signs (quiet and
    /// signalling), infinities, zeros, subnormals, values that round up to infinity, ties.
    fn awkward(rng: &mut Rng, len: usize) -> Vec<f32> {
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::from_bits(1),
            f32::from_bits(0x8000_8000),
            f32::MAX,
            f32::MIN,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
        ];
        (0..len)
            .map(|i| if i % 7 == 3 { specials[(i / 7) % specials.len()] } else { (rng.normal() * 10.0) as f32 })
            .collect()
    }

    /// The fast packers give the slow ones' bits on odd shapes (k odd, k blocks starting past
    /// 0, panels past n) for every operand form; without AVX-512F both are the slow one.
    #[test]
    fn fast_packing_matches_slow_bits() {
        let mut rng = Rng::new(21);
        for &(n, k, pc, kp) in &[(64, 96, 0, 48), (40, 75, 5, 32), (33, 33, 0, 17), (96, 200, 16, 84), (70, 31, 0, 16)]
        {
            let wf = awkward(&mut rng, n.max(k) * (n.max(k) + 3));
            let wb: Vec<u16> = wf.iter().map(|&x| to_bf16(x)).collect();
            for trans in [true, false] {
                let ld = if trans { k + 3 } else { n + 3 };
                for j0 in (0..n).step_by(NR) {
                    let (mut fast_f, mut slow_f) = (vec![7u32; kp * NR], vec![9u32; kp * NR]);
                    let bf = RhsBlock { w: &wf[..], ld, trans, n, k, pc, kp };
                    pack_b_panel(&mut fast_f, &bf, j0);
                    pack_b_panel_slow(&mut slow_f, &bf, j0, 0);
                    assert_eq!(fast_f, slow_f, "f32 n{n} k{k} pc{pc} trans {trans} j0 {j0}");
                    let (mut fast_b, mut slow_b) = (vec![7u32; kp * NR], vec![9u32; kp * NR]);
                    let bb = RhsBlock { w: &wb[..], ld, trans, n, k, pc, kp };
                    pack_b_panel(&mut fast_b, &bb, j0);
                    pack_b_panel_slow(&mut slow_b, &bb, j0, 0);
                    assert_eq!(fast_b, slow_b, "bf16 n{n} k{k} pc{pc} trans {trans} j0 {j0}");
                    assert_eq!(fast_b, fast_f, "f32 rounded while packing equals the bf16 copy");
                }
            }
            let (m, lda) = (3, k + 5);
            let a = awkward(&mut rng, m * lda);
            for i in 0..m + 1 {
                let (mut fast, mut slow) = (vec![7u32; kp], vec![9u32; kp]);
                pack_a_row(&mut fast, &a, lda, m, k, i, pc);
                pack_a_row_slow(&mut slow, &a, lda, m, k, i, pc);
                assert_eq!(fast, slow, "a row {i} k{k} pc{pc}");
            }
        }
    }

    /// The slow packer's layout, spelled out on a tiny case: pair p of column j holds W's
    /// (k = 2p, 2p + 1) entries of that column, zeros past k and past n.
    #[test]
    fn panel_layout() {
        let (n, k) = (2, 3);
        let w: Vec<u16> = (1..=6).collect(); // W [n, k] = [[1, 2, 3], [4, 5, 6]]
        let mut dst = vec![0xdead_beefu32; 2 * NR];
        pack_b_panel(&mut dst, &RhsBlock { w: &w[..], ld: k, trans: true, n, k, pc: 0, kp: 2 }, 0);
        assert_eq!(&dst[..3], &[1 | (2 << 16), 4 | (5 << 16), 0]);
        assert_eq!(&dst[NR..NR + 3], &[3, 6, 0]);
        assert!(dst[3..NR].iter().chain(&dst[NR + 3..]).all(|&x| x == 0));
        let mut a_dst = vec![0xdead_beefu32; 3];
        let a = [1.0f32, 2.0, 3.0];
        pack_a_row(&mut a_dst, &a, 3, 1, 3, 0, 0);
        assert_eq!(a_dst, [0x3f80 | (0x4000 << 16), 0x4040, 0]);
    }
}
