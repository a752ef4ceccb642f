//! Integer block dot products: for each block b of 32 values of one weight row and one
//! quantized activation row, the exact i32 sum `Σ w_i·x_i` (Q8_0: w the signed bytes; Q4_0:
//! nibble − 8; Q4_1: the nibble itself). The scalar loop is the reference; AVX2, AVX-512 VNNI
//! and NEON `sdot` variants are chosen once at run time. All of them compute the same
//! integers exactly (no saturation can occur: |w| ≤ 128, |x| ≤ 127, so a pair of products
//! is at most 32,512 < 2¹⁵ in `maddubs`, and a block sum at most 32·128·127 < 2³¹), so
//! everything downstream is bit-identical whichever variant ran.

use super::matvec::QKind;
use half::f16;

/// Bytes of one block's quantized values: Q8_0 32, Q4_x 16.
pub const fn block_qbytes(kind: QKind) -> usize {
    match kind {
        QKind::Q8_0 => 32,
        QKind::Q4_0 | QKind::Q4_1 => 16,
    }
}

/// `out[b]` = block b's integer dot of weight values `w` (`out.len()` blocks, packed as
/// `kind`) with activations `x` `[32·out.len()]`.
pub type IsumFn = fn(QKind, &[u8], &[i8], &mut [i32]);

/// One weight row and one activation row, block by block (`wd`, `wm`, `xd`, `xs` have one
/// entry per block; `wm` is empty unless Q4_1).
#[derive(Clone, Copy)]
pub struct RowOperands<'a> {
    pub kind: QKind,
    pub wq: &'a [u8],
    pub wd: &'a [f16],
    pub wm: &'a [f16],
    pub xq: &'a [i8],
    pub xd: &'a [f32],
    pub xs: &'a [f32],
}

impl RowOperands<'_> {
    /// Panics unless every slice covers `wd.len()` blocks (what the fused kernels read).
    pub fn check(&self) {
        let nb = self.wd.len();
        assert!(
            self.wq.len() >= nb * block_qbytes(self.kind)
                && self.xq.len() >= nb * 32
                && self.xd.len() >= nb
                && self.xs.len() >= nb
                && (self.wm.is_empty() || self.wm.len() >= nb)
                && (self.kind != QKind::Q4_1 || self.wm.len() >= nb),
            "row operands too short for {nb} blocks"
        );
    }
}

/// A whole output element: the integer block sums and the float steps of `matvec.rs`'s
/// module docs in one pass (the SIMD variants keep eight blocks' sums in a register and do
/// the float steps eight lanes at a time, in the same order, so their bits equal the
/// reference `matvec::dot_row`'s).
pub type RowFn = fn(&RowOperands) -> f32;

/// The fused row kernel for this CPU, if it has one (x86 with AVX2 and F16C).
pub fn best_row() -> Option<(RowFn, &'static str)> {
    available_rows().pop()
}

/// Every fused row kernel this CPU runs (tests).
pub fn available_rows() -> Vec<(RowFn, &'static str)> {
    #[allow(unused_mut)]
    let mut v: Vec<(RowFn, &'static str)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
            v.push((x86::row_avx2, "avx2-fused"));
            if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
                v.push((x86::row_vnni, "avx512-vnni-fused"));
            }
        }
    }
    v
}

/// The scalar reference.
pub fn isums_scalar(kind: QKind, w: &[u8], x: &[i8], out: &mut [i32]) {
    let qb = block_qbytes(kind);
    assert!(w.len() >= out.len() * qb && x.len() >= out.len() * 32, "isums: operand too short");
    for (b, o) in out.iter_mut().enumerate() {
        let (w, x) = (&w[b * qb..][..qb], &x[b * 32..][..32]);
        *o = match kind {
            QKind::Q8_0 => w.iter().zip(x).map(|(&w, &x)| (w as i8) as i32 * x as i32).sum(),
            QKind::Q4_0 | QKind::Q4_1 => {
                let off = if kind == QKind::Q4_0 { 8 } else { 0 };
                (0..16)
                    .map(|j| {
                        let (lo, hi) = ((w[j] & 0xf) as i32 - off, (w[j] >> 4) as i32 - off);
                        lo * x[j] as i32 + hi * x[j + 16] as i32
                    })
                    .sum()
            }
        };
    }
}

/// The fastest variant this CPU has, and its name (for messages and benchmarks).
pub fn best() -> (IsumFn, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
            return (x86::isums_vnni, "avx512-vnni");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return (x86::isums_avx2, "avx2");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return (arm::isums_sdot, "neon-sdot");
        }
    }
    (isums_scalar, "scalar")
}

/// Every variant this CPU can run (the scalar reference first), for tests.
pub fn available() -> Vec<(IsumFn, &'static str)> {
    #[allow(unused_mut)]
    let mut v: Vec<(IsumFn, &'static str)> = vec![(isums_scalar, "scalar")];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            v.push((x86::isums_avx2, "avx2"));
        }
        if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
            v.push((x86::isums_vnni, "avx512-vnni"));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push((arm::isums_sdot, "neon-sdot"));
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QKind, RowOperands, block_qbytes};
    use std::arch::x86_64::*;

    /// Block b's 32 weight values as bytes: Q8_0 signed, Q4_0 nibble − 8 (signed), Q4_1 the
    /// nibble (0..15, so signed and unsigned agree).
    #[inline(always)]
    unsafe fn load_w(kind: QKind, w: *const u8) -> __m256i {
        unsafe {
            match kind {
                QKind::Q8_0 => _mm256_loadu_si256(w as *const __m256i),
                QKind::Q4_0 | QKind::Q4_1 => {
                    let raw = _mm_loadu_si128(w as *const __m128i);
                    let m = _mm_set1_epi8(0x0f);
                    let lo = _mm_and_si128(raw, m);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m);
                    let v = _mm256_set_m128i(hi, lo);
                    if kind == QKind::Q4_0 { _mm256_sub_epi8(v, _mm256_set1_epi8(8)) } else { v }
                }
            }
        }
    }

    /// Eight i32 partial sums of one block: |w| (unsigned) times x with w's sign moved onto
    /// it, so `maddubs` (u8 × i8) forms exact signed products. |w| = 128 (w = −128) reads as
    /// the unsigned byte 128, which is right.
    #[inline(always)]
    unsafe fn block_avx2(kind: QKind, w: *const u8, x: *const i8) -> __m256i {
        unsafe {
            let wv = load_w(kind, w);
            let xv = _mm256_loadu_si256(x as *const __m256i);
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
        }
    }

    #[inline(always)]
    unsafe fn block_vnni(kind: QKind, w: *const u8, x: *const i8) -> __m256i {
        unsafe {
            let wv = load_w(kind, w);
            let xv = _mm256_loadu_si256(x as *const __m256i);
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv))
        }
    }

    /// The totals of eight blocks' partial-sum vectors, block i in lane i.
    #[inline(always)]
    unsafe fn reduce8(p: [__m256i; 8]) -> __m256i {
        unsafe {
            let s01 = _mm256_hadd_epi32(p[0], p[1]);
            let s23 = _mm256_hadd_epi32(p[2], p[3]);
            let s45 = _mm256_hadd_epi32(p[4], p[5]);
            let s67 = _mm256_hadd_epi32(p[6], p[7]);
            // Per 128-bit half: [b0, b1, b2, b3] (and b4..b7) sums of that half's lanes.
            let s0123 = _mm256_hadd_epi32(s01, s23);
            let s4567 = _mm256_hadd_epi32(s45, s67);
            let lo = _mm256_permute2x128_si256::<0x20>(s0123, s4567);
            let hi = _mm256_permute2x128_si256::<0x31>(s0123, s4567);
            _mm256_add_epi32(lo, hi)
        }
    }

    #[inline(always)]
    unsafe fn hsum(p: __m256i) -> i32 {
        unsafe {
            let s = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            _mm_cvtsi128_si32(s)
        }
    }

    macro_rules! isums_body {
        ($kind:ident, $w:ident, $x:ident, $out:ident, $block:ident) => {{
            let qb = block_qbytes($kind);
            let nb = $out.len();
            let (w, x) = ($w.as_ptr(), $x.as_ptr());
            let mut b = 0;
            while b + 8 <= nb {
                let mut p = [_mm256_setzero_si256(); 8];
                for (i, p) in p.iter_mut().enumerate() {
                    *p = $block($kind, w.add((b + i) * qb), x.add((b + i) * 32));
                }
                _mm256_storeu_si256($out.as_mut_ptr().add(b) as *mut __m256i, reduce8(p));
                b += 8;
            }
            while b < nb {
                $out[b] = hsum($block($kind, w.add(b * qb), x.add(b * 32)));
                b += 1;
            }
        }};
    }

    /// The fused row (`super::RowFn`): eight blocks per step, their i32 sums in one
    /// register, then lanes += f32(isum) · (dw · dx) [+ mw · sx], eight lanes at a time (lane
    /// = block mod 8, as the reference), the tail blocks one by one.
    macro_rules! row_body {
        ($a:ident, $block:ident) => {{
            let RowOperands { kind, wq, wd, wm, xq, xd, xs } = *$a;
            let (qb, nb) = (block_qbytes(kind), wd.len());
            let (w, x) = (wq.as_ptr(), xq.as_ptr());
            let mut acc = _mm256_setzero_ps();
            let mut b = 0;
            while b + 8 <= nb {
                let mut p = [_mm256_setzero_si256(); 8];
                for (i, p) in p.iter_mut().enumerate() {
                    *p = $block(kind, w.add((b + i) * qb), x.add((b + i) * 32));
                }
                let isum = _mm256_cvtepi32_ps(reduce8(p));
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.as_ptr().add(b) as *const __m128i));
                let dx = _mm256_loadu_ps(xd.as_ptr().add(b));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(isum, _mm256_mul_ps(dw, dx)));
                if kind == QKind::Q4_1 {
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(wm.as_ptr().add(b) as *const __m128i));
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(mw, _mm256_loadu_ps(xs.as_ptr().add(b))));
                }
                b += 8;
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            while b < nb {
                let s = hsum($block(kind, w.add(b * qb), x.add(b * 32)));
                lanes[b % 8] += s as f32 * (wd[b].to_f32() * xd[b]);
                if kind == QKind::Q4_1 {
                    lanes[b % 8] += wm[b].to_f32() * xs[b];
                }
                b += 1;
            }
            ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        }};
    }

    #[target_feature(enable = "avx2,f16c")]
    unsafe fn row_avx2_impl(a: &RowOperands) -> f32 {
        unsafe { row_body!(a, block_avx2) }
    }

    #[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
    unsafe fn row_vnni_impl(a: &RowOperands) -> f32 {
        unsafe { row_body!(a, block_vnni) }
    }

    pub fn row_avx2(a: &RowOperands) -> f32 {
        a.check();
        assert!(
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c"),
            "row_avx2 needs AVX2 and F16C"
        );
        // SAFETY: the features are present and every block read lies inside the slices
        // (both checked above; the detection is cached).
        unsafe { row_avx2_impl(a) }
    }

    pub fn row_vnni(a: &RowOperands) -> f32 {
        a.check();
        assert!(
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("f16c"),
            "row_vnni needs AVX-512 VNNI, VL and F16C"
        );
        // SAFETY: as row_avx2.
        unsafe { row_vnni_impl(a) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn isums_avx2_impl(kind: QKind, w: &[u8], x: &[i8], out: &mut [i32]) {
        unsafe { isums_body!(kind, w, x, out, block_avx2) }
    }

    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn isums_vnni_impl(kind: QKind, w: &[u8], x: &[i8], out: &mut [i32]) {
        unsafe { isums_body!(kind, w, x, out, block_vnni) }
    }

    pub fn isums_avx2(kind: QKind, w: &[u8], x: &[i8], out: &mut [i32]) {
        assert!(w.len() >= out.len() * block_qbytes(kind) && x.len() >= out.len() * 32, "isums: operand too short");
        assert!(std::arch::is_x86_feature_detected!("avx2"), "isums_avx2 needs AVX2");
        // SAFETY: AVX2 is present (checked above; the detection is cached) and every load
        // stays inside `w` and `x` (checked above).
        unsafe { isums_avx2_impl(kind, w, x, out) }
    }

    pub fn isums_vnni(kind: QKind, w: &[u8], x: &[i8], out: &mut [i32]) {
        assert!(w.len() >= out.len() * block_qbytes(kind) && x.len() >= out.len() * 32, "isums: operand too short");
        assert!(
            std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl"),
            "isums_vnni needs AVX-512 VNNI and VL"
        );
        // SAFETY: as isums_avx2, with the VNNI features checked above.
        unsafe { isums_vnni_impl(kind, w, x, out) }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{QKind, block_qbytes};
    use std::arch::aarch64::*;

    /// acc += four-way dot products of signed bytes (the `sdot` instruction, Armv8.2 DotProd).
    #[inline(always)]
    unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: a register-only instruction; the caller enabled the dotprod feature.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn isums_sdot_impl(kind: QKind, w: &[u8], x: &[i8], out: &mut [i32]) {
        let qb = block_qbytes(kind);
        for (b, o) in out.iter_mut().enumerate() {
            // SAFETY: the caller checked that block b lies inside `w` and `x`.
            unsafe {
                let (wp, xp) = (w.as_ptr().add(b * qb), x.as_ptr().add(b * 32));
                let (w0, w1) = match kind {
                    QKind::Q8_0 => (vld1q_s8(wp as *const i8), vld1q_s8(wp.add(16) as *const i8)),
                    QKind::Q4_0 | QKind::Q4_1 => {
                        let raw = vld1q_u8(wp);
                        let lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw));
                        if kind == QKind::Q4_0 {
                            (vsubq_s8(lo, vdupq_n_s8(8)), vsubq_s8(hi, vdupq_n_s8(8)))
                        } else {
                            (lo, hi)
                        }
                    }
                };
                let acc = sdot(vdupq_n_s32(0), w0, vld1q_s8(xp));
                let acc = sdot(acc, w1, vld1q_s8(xp.add(16)));
                *o = vaddvq_s32(acc);
            }
        }
    }

    pub fn isums_sdot(kind: QKind, w: &[u8], x: &[i8], out: &mut [i32]) {
        assert!(w.len() >= out.len() * block_qbytes(kind) && x.len() >= out.len() * 32, "isums: operand too short");
        assert!(std::arch::is_aarch64_feature_detected!("dotprod"), "isums_sdot needs DotProd");
        // SAFETY: DotProd is present and the blocks lie inside the slices (checked above).
        unsafe { isums_sdot_impl(kind, w, x, out) }
    }
}
