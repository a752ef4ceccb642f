//! Quantized weight matrices and their matrix-vector products with int8 activations (W8A8
//! for Q8_0, W4A8 for Q4_0/Q4_1), for decoding.
//!
//! A matrix `[N, K]` is cut along K into blocks of 32. Weights keep ggml's encodings (Q8_0:
//! i8 values with an f16 scale d; Q4_0: nibbles q, value d·(q − 8); Q4_1: d·q + m with an
//! f16 minimum m), stored as three arrays (values, scales, minimums) rather than ggml's
//! interleaved blocks, so rows stream contiguously; a GGUF file's blocks are split into them
//! without changing a bit. Activations are quantized per block of 32 like Q8_0 but with an
//! f32 scale: dx = max|x|/127, q = round(x/dx).
//!
//! One output element, for weight row j and activation row r with blocks b = 0..K/32:
//!
//! ```text
//! isum_b = Σ_{i<32} wq_i · xq_i                       exact i32 (kernels.rs, any variant)
//! lane[b mod 8] += f32(isum_b) · (dw_b · dx_b)        f32, in this order
//! lane[b mod 8] += mw_b · sx_b                        Q4_1 only; sx_b = dx_b · Σ xq_i
//! y = ((lane0 + lane4) + (lane1 + lane5)) + ((lane2 + lane6) + (lane3 + lane7))
//! ```
//!
//! The float steps are one shared function, so a SIMD variant only replaces the integer sums
//! and its results equal the scalar reference bit for bit (tested). Error against the f32
//! product with the dequantized weights: rounding x to xq moves each x_i by at most dx_b/2,
//! so |y − Σ w_i·x_i| ≤ Σ_b (dx_b/2)·Σ_{i∈b}|w_i| plus f32 rounding of the sums (tested
//! against an f64 reference). Against the original f32 weights the weight rounding adds at
//! most Σ_b (dw_b/2)·Σ_{i∈b}|x_i| (Q8_0; Q4_0's step is d, so d/2 likewise).

use super::kernels::{self, IsumFn, RowFn, RowOperands, block_qbytes};
use super::{GgmlType, blocks};
use anyhow::{Result, bail, ensure};
use half::f16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Values per block.
pub const QK: usize = 32;

/// A weight encoding the quantized matvec runs directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl QKind {
    pub fn name(self) -> &'static str {
        match self {
            QKind::Q8_0 => "q8_0",
            QKind::Q4_0 => "q4_0",
            QKind::Q4_1 => "q4_1",
        }
    }

    /// The GGUF tensor type this encoding reads as is.
    pub fn of_ggml(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q8_0 => Some(QKind::Q8_0),
            GgmlType::Q4_0 => Some(QKind::Q4_0),
            GgmlType::Q4_1 => Some(QKind::Q4_1),
            _ => None,
        }
    }
}

/// The integer kernel picked once for this process.
fn kernel() -> &'static (IsumFn, &'static str) {
    static K: OnceLock<(IsumFn, &'static str)> = OnceLock::new();
    K.get_or_init(kernels::best)
}

/// The fused row kernel picked once for this process, if the CPU has one.
fn row_kernel() -> Option<(RowFn, &'static str)> {
    static R: OnceLock<Option<(RowFn, &'static str)>> = OnceLock::new();
    *R.get_or_init(kernels::best_row)
}

/// The name of the integer dot-product variant in use ("avx512-vnni", "avx2", "neon-sdot",
/// "scalar").
pub fn kernel_name() -> &'static str {
    row_kernel().map_or(kernel().1, |r| r.1)
}

/// A quantized weight matrix `[N, K]`, K a multiple of 32.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub kind: QKind,
    pub n: usize,
    pub k: usize,
    /// `[N, K/32, 32]` i8 (Q8_0) or `[N, K/32, 16]` nibble pairs (Q4_x: byte i of a block
    /// holds value i in its low nibble and value i + 16 in its high one, as ggml's)
    qs: Vec<u8>,
    /// `[N, K/32]` scales d
    d: Vec<f16>,
    /// `[N, K/32]` minimums m (Q4_1 only; empty otherwise)
    m: Vec<f16>,
}

impl QMatrix {
    fn alloc(kind: QKind, n: usize, k: usize, what: &str) -> Result<Self> {
        ensure!(
            k.is_multiple_of(QK),
            "{what}: rows of {k} values cannot be quantized in blocks of {QK} ({k} is not a multiple of {QK})"
        );
        let nb = n * (k / QK);
        let bytes = nb as u64 * (block_qbytes(kind) as u64 + 4);
        crate::memory::ensure_fits(&format!("{what} as {}", kind.name()), bytes, "use a smaller model or free memory")?;
        Ok(QMatrix {
            kind,
            n,
            k,
            qs: crate::memory::try_zeroed(nb * block_qbytes(kind), what)?,
            d: crate::memory::try_zeroed(nb, what)?,
            m: if kind == QKind::Q4_1 { crate::memory::try_zeroed(nb, what)? } else { Vec::new() },
        })
    }

    /// Quantizes `w` `[N, K]` (ggml's reference rounding: Q8_0 d = max|w|/127, q = round(w/d);
    /// Q4_0 d = −(the value of largest magnitude)/8, q = min(15, ⌊w/d + 8.5⌋)).
    pub fn quantize(kind: QKind, w: &[f32], n: usize, k: usize, what: &str) -> Result<Self> {
        ensure!(w.len() == n * k, "{what}: {} values for a [{n}, {k}] matrix", w.len());
        let mut q = Self::alloc(kind, n, k, what)?;
        let qb = block_qbytes(kind);
        let mut tmp = Vec::with_capacity(2 + QK);
        for (b, x) in w.chunks_exact(QK).enumerate() {
            let out = &mut q.qs[b * qb..(b + 1) * qb];
            match kind {
                QKind::Q8_0 => {
                    tmp.clear();
                    blocks::quant_q8_0(x, &mut tmp);
                    q.d[b] = f16::from_le_bytes([tmp[0], tmp[1]]);
                    out.copy_from_slice(&tmp[2..]);
                }
                QKind::Q4_0 => {
                    let max = x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    q.d[b] = f16::from_f32(d);
                    let nib = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    for i in 0..16 {
                        out[i] = nib(x[i]) | (nib(x[i + 16]) << 4);
                    }
                }
                QKind::Q4_1 => bail!("{what}: quantizing to q4_1 is not supported (q8_0 and q4_0 are)"),
            }
        }
        Ok(q)
    }

    /// A GGUF tensor's data `[N, K]` of type `ty` (Q8_0, Q4_0 or Q4_1), split into values and
    /// scales without changing them.
    pub fn from_ggml(ty: GgmlType, src: &[u8], n: usize, k: usize, what: &str) -> Result<Self> {
        let Some(kind) = QKind::of_ggml(ty) else {
            bail!("{what} is {}, which quantized decoding cannot use as it is (Q8_0, Q4_0 and Q4_1 can)", ty.name())
        };
        ensure!(
            src.len() as u64 == ty.bytes_for((n * k) as u64)?,
            "{what}: {} bytes for a [{n}, {k}] {} matrix",
            src.len(),
            ty.name()
        );
        let mut q = Self::alloc(kind, n, k, what)?;
        let (bb, qb) = (ty.block_bytes(), block_qbytes(kind));
        let head = bb - qb;
        for (b, blk) in src.chunks_exact(bb).enumerate() {
            q.d[b] = f16::from_le_bytes([blk[0], blk[1]]);
            if kind == QKind::Q4_1 {
                q.m[b] = f16::from_le_bytes([blk[2], blk[3]]);
            }
            q.qs[b * qb..(b + 1) * qb].copy_from_slice(&blk[head..]);
        }
        Ok(q)
    }

    /// The rows of `parts`, one after another (q|k|v, gate|up).
    pub fn concat(parts: &[QMatrix], what: &str) -> Result<Self> {
        let first = parts.first().ok_or_else(|| anyhow::anyhow!("{what}: nothing to stack"))?;
        for p in parts {
            ensure!(
                p.kind == first.kind && p.k == first.k,
                "{what}: parts are {} [_, {}] and {} [_, {}]; stacking needs one encoding and width",
                first.kind.name(),
                first.k,
                p.kind.name(),
                p.k
            );
        }
        let n = parts.iter().map(|p| p.n).sum();
        let mut q = Self::alloc(first.kind, n, first.k, what)?;
        let (mut at_q, mut at_b) = (0, 0);
        for p in parts {
            q.qs[at_q..at_q + p.qs.len()].copy_from_slice(&p.qs);
            q.d[at_b..at_b + p.d.len()].copy_from_slice(&p.d);
            if !p.m.is_empty() {
                q.m[at_b..at_b + p.m.len()].copy_from_slice(&p.m);
            }
            at_q += p.qs.len();
            at_b += p.d.len();
        }
        Ok(q)
    }

    /// Row `i` of the result is row `from(i)` of `self`.
    pub fn permute_rows(&mut self, from: impl Fn(usize) -> usize) {
        let (nb, qb) = (self.k / QK, block_qbytes(self.kind));
        let (qs, d, m) = (self.qs.clone(), self.d.clone(), self.m.clone());
        for i in 0..self.n {
            let s = from(i);
            self.qs[i * nb * qb..(i + 1) * nb * qb].copy_from_slice(&qs[s * nb * qb..(s + 1) * nb * qb]);
            self.d[i * nb..(i + 1) * nb].copy_from_slice(&d[s * nb..(s + 1) * nb]);
            if !m.is_empty() {
                self.m[i * nb..(i + 1) * nb].copy_from_slice(&m[s * nb..(s + 1) * nb]);
            }
        }
    }

    /// Bytes the matrix occupies (what one matvec streams).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len())
    }

    /// Row `j` dequantized into `out` `[K]` (for tests and references).
    pub fn dequant_row(&self, j: usize, out: &mut [f32]) {
        let (nb, qb) = (self.k / QK, block_qbytes(self.kind));
        for b in 0..nb {
            let q = &self.qs[(j * nb + b) * qb..][..qb];
            let d = self.d[j * nb + b].to_f32();
            let o = &mut out[b * QK..(b + 1) * QK];
            match self.kind {
                QKind::Q8_0 => o.iter_mut().zip(q).for_each(|(o, &v)| *o = (v as i8) as f32 * d),
                QKind::Q4_0 | QKind::Q4_1 => {
                    let (off, m) = if self.kind == QKind::Q4_0 { (8, 0.0) } else { (0, self.m[j * nb + b].to_f32()) };
                    for i in 0..16 {
                        o[i] = ((q[i] & 0xf) as i32 - off) as f32 * d + m;
                        o[i + 16] = ((q[i] >> 4) as i32 - off) as f32 * d + m;
                    }
                }
            }
        }
    }
}

/// Activations quantized per block of 32, for up to `R` rows of up to `K` values.
pub struct QActs {
    /// `[R, K]`
    qs: Vec<i8>,
    /// `[R, K/32]` scales dx
    d: Vec<f32>,
    /// `[R, K/32]` dx · Σ xq (Q4_1's minimum term)
    s: Vec<f32>,
    k: usize,
    r: usize,
}

impl QActs {
    /// Buffers for `rows` rows of up to `k` values.
    pub fn new(rows: usize, k: usize) -> Result<Self> {
        let nb = rows * k.div_ceil(QK);
        let qs = vec![0i8; rows * k];
        Ok(QActs { qs, d: crate::memory::try_zeroed(nb, "activation scales")?, s: vec![0.0; nb], k: 0, r: 0 })
    }

    /// Quantizes x `[R, K]`: dx = max|x|/127 and q = round(x·127/max|x|), clamped to ±127 (so
    /// |q| ≤ 127 and the kernels' sums cannot saturate).
    pub fn quantize(&mut self, x: &[f32], r: usize, k: usize) {
        assert!(k.is_multiple_of(QK) && x.len() >= r * k, "QActs::quantize: bad shape");
        assert!(self.qs.len() >= r * k && self.d.len() >= r * k / QK, "QActs::quantize: buffers too small");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { self.quantize_avx2(&x[..r * k]) };
            (self.r, self.k) = (r, k);
            return;
        }
        self.quantize_blocks(&x[..r * k]);
        (self.r, self.k) = (r, k);
    }

    /// `quantize_blocks` compiled for AVX2, where `round` is an instruction sequence rather
    /// than a libm call (the same IEEE operations, so the same bytes).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        self.quantize_blocks(x)
    }

    #[inline(always)]
    fn quantize_blocks(&mut self, x: &[f32]) {
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let q = &mut self.qs[b * QK..(b + 1) * QK];
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(xb) {
                *q = (v * id).round().clamp(-127.0, 127.0) as i8;
                sum += *q as i32;
            }
            self.d[b] = amax / 127.0;
            self.s[b] = self.d[b] * sum as f32;
        }
    }
}

/// The shared float steps (module docs) for one output element: blocks `isum.len()`.
#[inline]
fn combine(isum: &[i32], dw: &[f16], mw: &[f16], dx: &[f32], sx: &[f32], lanes: &mut [f32; 8], first: usize) {
    for (b, &s) in isum.iter().enumerate() {
        let l = (first + b) % 8;
        lanes[l] += s as f32 * (dw[b].to_f32() * dx[b]);
        if !mw.is_empty() {
            lanes[l] += mw[b].to_f32() * sx[b];
        }
    }
}

/// Blocks per integer pass: a multiple of 8, so lane `b mod 8` is the same across passes.
const CHUNK: usize = 64;

/// Weight row `j` and activation row `r`, block by block.
fn row_operands<'a>(w: &'a QMatrix, j: usize, x: &'a QActs, r: usize) -> RowOperands<'a> {
    let (nb, qb) = (w.k / QK, block_qbytes(w.kind));
    RowOperands {
        kind: w.kind,
        wq: &w.qs[j * nb * qb..(j + 1) * nb * qb],
        wd: &w.d[j * nb..(j + 1) * nb],
        wm: if w.m.is_empty() { &[] } else { &w.m[j * nb..(j + 1) * nb] },
        xq: &x.qs[r * w.k..(r + 1) * w.k],
        xd: &x.d[r * nb..(r + 1) * nb],
        xs: &x.s[r * nb..(r + 1) * nb],
    }
}

/// `dot_row` with the fastest kernel: the fused row kernel where the CPU has one (same
/// bits, tested), else the integer kernel and the shared float steps.
#[inline]
fn dot_row_best(w: &QMatrix, j: usize, x: &QActs, r: usize, isums: IsumFn, row: Option<RowFn>) -> f32 {
    match row {
        Some(f) => f(&row_operands(w, j, x, r)),
        None => dot_row(w, j, x, r, isums),
    }
}

/// Weight row `j` · activation row `r` with integer kernel `isums` (the reference float
/// steps).
pub fn dot_row(w: &QMatrix, j: usize, x: &QActs, r: usize, isums: IsumFn) -> f32 {
    let (nb, qb) = (w.k / QK, block_qbytes(w.kind));
    let wq = &w.qs[j * nb * qb..(j + 1) * nb * qb];
    let (wd, wm) = (&w.d[j * nb..(j + 1) * nb], if w.m.is_empty() { &[][..] } else { &w.m[j * nb..(j + 1) * nb] });
    let xq = &x.qs[r * w.k..(r + 1) * w.k];
    let (xd, xs) = (&x.d[r * nb..(r + 1) * nb], &x.s[r * nb..(r + 1) * nb]);
    let mut lanes = [0.0f32; 8];
    let mut buf = [0i32; CHUNK];
    let mut b0 = 0;
    while b0 < nb {
        let len = CHUNK.min(nb - b0);
        isums(w.kind, &wq[b0 * qb..], &xq[b0 * QK..], &mut buf[..len]);
        let mw = if wm.is_empty() { &[][..] } else { &wm[b0..b0 + len] };
        combine(&buf[..len], &wd[b0..b0 + len], mw, &xd[b0..b0 + len], &xs[b0..b0 + len], &mut lanes, b0);
        b0 += len;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// out `[R, N]` = x `[R, K]` (quantized in `x`) · w `[N, K]`ᵀ. Each thread streams its
/// contiguous block of weight rows once for all R rows; element (r, j) is `dot_row(w, j, x,
/// r)` whatever R is, so a row's result is the same alone or batched. `scratch` holds the
/// transposed result `[N, R]` when R > 1.
pub fn qmatvec_rows(out: &mut [f32], scratch: &mut [f32], x: &QActs, w: &QMatrix) {
    let (r, n, k) = (x.r, w.n, w.k);
    assert!(x.k == k, "qmatvec_rows: activations of width {} for a matrix of width {k}", x.k);
    assert!(out.len() >= r * n && (r == 1 || scratch.len() >= r * n), "qmatvec_rows: output too short");
    let (isums, row) = (kernel().0, row_kernel().map(|r| r.0));
    // Contiguous row blocks, one per thread, but never tasks of under 64K multiply-adds.
    let rows = n.div_ceil(rayon::current_num_threads()).max(65536 / (k * r).max(1)).max(1);
    if r == 1 {
        out[..n].par_chunks_mut(rows).enumerate().for_each(|(blk, o)| {
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot_row_best(w, blk * rows + i, x, 0, isums, row);
            }
        });
        return;
    }
    scratch[..n * r].par_chunks_mut(rows * r).enumerate().for_each(|(blk, o)| {
        for (j, oj) in o.chunks_exact_mut(r).enumerate() {
            for (i, v) in oj.iter_mut().enumerate() {
                *v = dot_row_best(w, blk * rows + j, x, i, isums, row);
            }
        }
    });
    for (i, row) in out[..r * n].chunks_exact_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = scratch[j * r + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_matrix(kind: QKind, n: usize, k: usize, rng: &mut Rng) -> QMatrix {
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32 * 0.05).collect();
        match kind {
            QKind::Q4_1 => {
                // Q4_1 only comes from files: build its blocks by hand.
                let mut bytes = Vec::new();
                for _ in 0..n * k / QK {
                    bytes.extend_from_slice(&f16::from_f32(rng.uniform() as f32 * 0.01).to_le_bytes());
                    bytes.extend_from_slice(&f16::from_f32(-(rng.uniform() as f32) * 0.08).to_le_bytes());
                    bytes.extend((0..16).map(|_| (rng.uniform() * 256.0) as u8));
                }
                QMatrix::from_ggml(GgmlType::Q4_1, &bytes, n, k, "w").unwrap()
            }
            _ => QMatrix::quantize(kind, &w, n, k, "w").unwrap(),
        }
    }

    #[test]
    fn every_kernel_variant_equals_the_scalar_reference_exactly() {
        let mut rng = Rng::new(5);
        for kind in [QKind::Q8_0, QKind::Q4_0, QKind::Q4_1] {
            // 37 blocks: four full groups of 8 and a tail of 5; the extremes included.
            let nb = 37;
            let w: Vec<u8> = (0..nb * block_qbytes(kind))
                .map(|i| {
                    if i % 7 == 0 {
                        0x80
                    } else if i % 11 == 0 {
                        0x7f
                    } else {
                        (rng.uniform() * 256.0) as u8
                    }
                })
                .collect();
            let x: Vec<i8> = (0..nb * QK)
                .map(|i| {
                    if i % 5 == 0 {
                        -127
                    } else if i % 13 == 0 {
                        127
                    } else {
                        (rng.uniform() * 255.0 - 127.0) as i8
                    }
                })
                .collect();
            let mut want = vec![0i32; nb];
            kernels::isums_scalar(kind, &w, &x, &mut want);
            // Spot-check the reference itself on block 0.
            let wd = |i: usize| -> i32 {
                match kind {
                    QKind::Q8_0 => w[i] as i8 as i32,
                    _ => {
                        let byte = w[i % 16];
                        let v = if i < 16 { byte & 0xf } else { byte >> 4 } as i32;
                        v - if kind == QKind::Q4_0 { 8 } else { 0 }
                    }
                }
            };
            assert_eq!(want[0], (0..32).map(|i| wd(i) * x[i] as i32).sum::<i32>());
            let variants = kernels::available();
            eprintln!("kernel variants here: {:?}", variants.iter().map(|v| v.1).collect::<Vec<_>>());
            for (f, name) in variants {
                let mut got = vec![0i32; nb];
                f(kind, &w, &x, &mut got);
                assert_eq!(got, want, "{name} {kind:?}");
            }
        }
    }

    #[test]
    fn batched_rows_equal_single_rows_bitwise_and_match_f64_within_the_bound() {
        let mut rng = Rng::new(9);
        for kind in [QKind::Q8_0, QKind::Q4_0, QKind::Q4_1] {
            let (n, k, r) = (70, 96 + 288, 3);
            let w = random_matrix(kind, n, k, &mut rng);
            let x: Vec<f32> = (0..r * k).map(|_| rng.normal() as f32).collect();
            let mut acts = QActs::new(r, k).unwrap();
            acts.quantize(&x, r, k);
            let (mut out, mut scratch) = (vec![0.0; r * n], vec![0.0; r * n]);
            qmatvec_rows(&mut out, &mut scratch, &acts, &w);
            let mut wrow = vec![0.0; k];
            for i in 0..r {
                let mut one = QActs::new(1, k).unwrap();
                one.quantize(&x[i * k..(i + 1) * k], 1, k);
                let mut single = vec![0.0; n];
                qmatvec_rows(&mut single, &mut [], &one, &w);
                for j in 0..n {
                    assert_eq!(out[i * n + j].to_bits(), single[j].to_bits(), "{kind:?} row {i} col {j}");
                    // Every variant gives the scalar reference's bits.
                    for (f, name) in kernels::available() {
                        assert_eq!(dot_row(&w, j, &one, 0, f).to_bits(), single[j].to_bits(), "{name}");
                    }
                    w.dequant_row(j, &mut wrow);
                    let xr = &x[i * k..(i + 1) * k];
                    let exact: f64 = wrow.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let bound: f64 = (0..k / QK)
                        .map(|b| {
                            let amax = xr[b * QK..(b + 1) * QK].iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                            let wsum: f64 = wrow[b * QK..(b + 1) * QK].iter().map(|v| v.abs() as f64).sum();
                            amax / 127.0 / 2.0 * wsum
                        })
                        .sum::<f64>()
                        * 1.001
                        + 1e-5 * wrow.iter().zip(xr).map(|(&a, &b)| (a * b).abs() as f64).sum::<f64>();
                    let err = (out[i * n + j] as f64 - exact).abs();
                    assert!(err <= bound, "{kind:?} ({i}, {j}): error {err:.3e} above the bound {bound:.3e}");
                }
            }
        }
    }

    /// The fused row kernels give the reference float steps' bits (scalar integer sums, then
    /// `combine`) for block counts around the eight-block step and with a tail.
    #[test]
    fn fused_row_kernels_equal_the_reference_bitwise() {
        let mut rng = Rng::new(17);
        let fused = kernels::available_rows();
        eprintln!("fused row kernels here: {:?}", fused.iter().map(|v| v.1).collect::<Vec<_>>());
        for kind in [QKind::Q8_0, QKind::Q4_0, QKind::Q4_1] {
            for nb in [1, 7, 8, 9, 16, 24, 37, 64, 65, 72] {
                let (n, k) = (5, nb * QK);
                let w = random_matrix(kind, n, k, &mut rng);
                let x: Vec<f32> = (0..2 * k).map(|_| rng.normal() as f32).collect();
                let mut acts = QActs::new(2, k).unwrap();
                acts.quantize(&x, 2, k);
                for j in 0..n {
                    for r in 0..2 {
                        let want = dot_row(&w, j, &acts, r, kernels::isums_scalar);
                        for (f, name) in &fused {
                            let got = f(&row_operands(&w, j, &acts, r));
                            assert_eq!(got.to_bits(), want.to_bits(), "{name} {kind:?} nb={nb} ({r}, {j})");
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 build of the activation quantizer gives the portable one's bytes and scales,
    /// halfway cases (x·127/max|x| = n + 0.5, rounded away from zero) included.
    #[test]
    fn activation_quantizer_is_the_same_on_every_path() {
        let mut rng = Rng::new(23);
        let k = 4 * QK;
        let mut x: Vec<f32> = (0..k).map(|_| rng.normal() as f32).collect();
        // Block 0: max 127, so the halves stay halves after scaling.
        for (i, v) in x[..QK].iter_mut().enumerate() {
            *v = [127.0, -0.5, 0.5, 1.5, -2.5, 0.49999997, -126.5, 3.0][i % 8];
        }
        let mut a = QActs::new(1, k).unwrap();
        a.quantize(&x, 1, k);
        let mut b = QActs::new(1, k).unwrap();
        b.quantize_blocks(&x);
        assert_eq!(a.qs, b.qs);
        assert_eq!(a.d, b.d);
        assert_eq!(a.s, b.s);
        assert_eq!(&a.qs[..8], &[127, -1, 1, 2, -3, 0, -127, 3]);
    }

    #[test]
    fn quantizers_match_ggml_blocks() {
        let mut rng = Rng::new(2);
        let (n, k) = (3, 64);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        // Q8_0: the same bytes as the GGUF writer's blocks, and they read back through
        // from_ggml unchanged.
        let mut ggml = Vec::new();
        super::super::quantize(GgmlType::Q8_0, &w, &mut ggml).unwrap();
        let q = QMatrix::quantize(QKind::Q8_0, &w, n, k, "w").unwrap();
        let back = QMatrix::from_ggml(GgmlType::Q8_0, &ggml, n, k, "w").unwrap();
        assert_eq!((q.qs.clone(), q.d.clone()), (back.qs, back.d));
        // Q4_0: within half a step of the input, and dequantized like ggml's decoder.
        let q = QMatrix::quantize(QKind::Q4_0, &w, n, k, "w").unwrap();
        let mut row = vec![0.0; k];
        for j in 0..n {
            q.dequant_row(j, &mut row);
            for b in 0..k / QK {
                let block = &w[j * k + b * QK..][..QK];
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let mut bytes = q.d[j * 2 + b].to_le_bytes().to_vec();
                bytes.extend_from_slice(&q.qs[(j * 2 + b) * 16..][..16]);
                let mut ggml_vals = [0.0; QK];
                blocks::dequant_q4_0(&bytes, &mut ggml_vals);
                assert_eq!(&ggml_vals[..], &row[b * QK..(b + 1) * QK]);
                // Half a step d = amax/8, except that values of the sign opposite to the
                // largest one reach only 7 steps: up to one step off at the far end.
                for (a, c) in block.iter().zip(&row[b * QK..(b + 1) * QK]) {
                    let limit = if a.abs() > amax * 7.0 / 8.0 { amax / 8.0 } else { amax / 16.0 };
                    assert!((a - c).abs() <= limit + amax * 2e-3, "{a} vs {c}");
                }
            }
        }
    }

    #[test]
    fn widths_that_are_not_whole_blocks_are_refused_with_the_reason() {
        let e = QMatrix::quantize(QKind::Q8_0, &[0.0; 2 * 40], 2, 40, "layer 0 wo").unwrap_err();
        assert!(format!("{e:#}").contains("40 is not a multiple of 32"), "{e:#}");
        let e = QMatrix::from_ggml(GgmlType::Q6K, &[0u8; 210], 1, 256, "w").unwrap_err();
        assert!(format!("{e:#}").contains("Q6_K"), "{e:#}");
    }
}
