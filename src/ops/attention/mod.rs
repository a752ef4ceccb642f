//! Causal scaled-dot-product attention with grouped-query heads.
//!
//! q `[N, H·D]`, k and v `[N, KV·D]`, row-major with N = B·T; query head h reads kv head
//! `h / (H / KV)` (HF `repeat_interleave`). The softmax probabilities P `[B, H, T, T]` are
//! saved for backward (for T ≤ a few thousand they are cheaper to keep than to recompute).
//!
//! The work splits into one task per (batch, kv head): the task owns the contiguous P rows of
//! its query-head group and head-major scratch, so every product is a small sequential GEMM
//! and all writes are disjoint without locks or unsafe code. A final pass scatters head-major
//! results back into row-major `[N, ·]`.

pub mod bf16;

use super::Par;
use super::exp::{exp, wide_fn};
use super::matmul::Operand;
use super::small;
use rayon::prelude::*;
use std::cell::RefCell;

#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kv: usize,
    pub d: usize,
}

impl AttnDims {
    fn group(&self) -> usize {
        self.h / self.kv
    }
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
    /// Elements of the saved probabilities `[B, H, T, T]`.
    pub fn probs_len(&self) -> usize {
        self.b * self.h * self.t * self.t
    }
    /// Kv head `kvh`'s `[T, D]` rows of batch `bi` in k or v `[N, KV·D]` (row stride KV·D).
    fn kv_rows<'a>(&self, x: &'a [f32], bi: usize, kvh: usize) -> &'a [f32] {
        &x[bi * self.t * self.kv * self.d + kvh * self.d..]
    }
    /// Query head `head`'s `[T, D]` rows of batch `bi` in q, out or dout `[N, H·D]` (row stride
    /// H·D).
    fn q_rows<'a>(&self, x: &'a [f32], bi: usize, head: usize) -> &'a [f32] {
        &x[bi * self.t * self.h * self.d + head * self.d..]
    }
    /// Query head `head`'s `[T, T]` probabilities of batch `bi`.
    fn head_probs<'a>(&self, probs: &'a [f32], bi: usize, head: usize) -> &'a [f32] {
        let tt = self.t * self.t;
        &probs[(bi * self.h + head) * tt..][..tt]
    }
}

/// Query/key blocks for causal skipping: `[r0, r1)` ranges of at most 64 positions.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    const BLOCK: usize = 64;
    (0..t.div_ceil(BLOCK)).map(move |i| (i * BLOCK, ((i + 1) * BLOCK).min(t)))
}

/// Sequential GEMMs inside each (batch, kv-head) task; parallelism comes from the tasks.
fn inner(par: Par) -> Par {
    Par { threads: 1, gemm: par.gemm }
}

/// Calls `f` with one head's `[T, D]` rows of `src` (row stride `ld`) transposed to `[D, T]`, so
/// that products with it (q·kᵀ, dout·vᵀ) read contiguous rows (`ops::small`). The scratch is
/// per thread and grows once to the largest head; `f` must not re-enter.
fn with_transposed<R>(src: &[f32], ld: usize, t: usize, d: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        if buf.len() < t * d {
            buf.resize(t * d, 0.0);
        }
        let tr = &mut buf[..t * d];
        for j in 0..t {
            for (c, &x) in src[j * ld..j * ld + d].iter().enumerate() {
                tr[c * t + j] = x;
            }
        }
        f(tr)
    })
}

/// out `[N, H·D]` = softmax(q·kᵀ/√D + causal mask) · v, probs `[B, H, T, T]` saved,
/// out_hm `[B, H, T, D]` head-major scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    par: Par,
    out: &mut [f32],
    probs: &mut [f32],
    out_hm: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: AttnDims,
) {
    let AttnDims { b: _, t, h, kv, d } = dims;
    let (g, qw, kw) = (dims.group(), h * d, kv * d);
    let seq = inner(par);
    let scale = dims.scale();
    let probs = &mut probs[..dims.probs_len()];
    probs.par_chunks_mut(g * t * t).zip(out_hm.par_chunks_mut(g * t * d)).enumerate().for_each(|(task, (p, o))| {
        let (bi, kvh) = (task / kv, task % kv);
        let kh = dims.kv_rows(k, bi, kvh);
        let vh = dims.kv_rows(v, bi, kvh);
        with_transposed(kh, kw, t, d, |kt| {
            for (gi, (p, o)) in p.chunks_exact_mut(t * t).zip(o.chunks_exact_mut(t * d)).enumerate() {
                let qh = dims.q_rows(q, bi, kvh * g + gi);
                // Causal: query block [r0, r1) sees keys [0, r1) only; nothing above is computed.
                for (r0, r1) in blocks(t) {
                    let rows = r1 - r0;
                    let p_blk = &mut p[r0 * t..r1 * t];
                    small::gemm(seq, rows, r1, d, Operand::n(&qh[r0 * qw..], qw), Operand::n(kt, t), p_blk, t, false);
                    softmax_block(p_blk, r0, r1, t, scale);
                    small::gemm(seq, rows, d, r1, Operand::n(p_blk, t), Operand::n(vh, kw), &mut o[r0 * d..], d, false);
                }
            }
        });
    });
    scatter_heads(out, out_hm, dims.b, t, h, d);
}

wide_fn! {
    /// Rows `[r0, r1)` of a `[T, T]` score matrix `p` (the block `p[r0·T..r1·T]`) ←
    /// causal softmax(scores·scale): row i keeps columns `0..=i`, the rest are zeroed.
    fn softmax_block(p: &mut [f32], r0: usize, r1: usize, t: usize, scale: f32) {
        for (i, row) in (r0..r1).zip(p.chunks_exact_mut(t)) {
            let (live, masked) = row.split_at_mut(i + 1);
            softmax_row(live, scale);
            masked.fill(0.0);
        }
    }
}

/// `row` ← softmax(row·scale), in place. Max and sum in 8 lanes so the loops vectorise (fixed
/// order: the same bits on every machine).
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    const L: usize = 8;
    let mut m = [f32::NEG_INFINITY; L];
    let chunks = row.chunks_exact(L);
    let tail_max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    for c in chunks {
        for i in 0..L {
            m[i] = m[i].max(c[i]);
        }
    }
    let max = m.iter().fold(tail_max, |a, &x| a.max(x));
    // exp in a loop of its own: one body per element is what the loop vectoriser widens
    // (inside the 8-lane sum below, `exp` ran scalar, ~10× slower).
    row.iter_mut().for_each(|s| *s = exp((*s - max) * scale));
    let mut acc = [0.0f32; L];
    let chunks = row.chunks_exact(L);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..L {
            acc[i] += c[i];
        }
    }
    let sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail;
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|s| *s *= inv);
}

/// `[B, NH, T, D]` head-major → `[B·T, NH·D]` row-major.
fn scatter_heads(dst: &mut [f32], src: &[f32], b: usize, t: usize, nh: usize, d: usize) {
    dst[..b * t * nh * d].par_chunks_mut(nh * d).enumerate().for_each(|(row, out)| {
        let (bi, ti) = (row / t, row % t);
        for (hh, o) in out.chunks_exact_mut(d).enumerate() {
            let at = ((bi * nh + hh) * t + ti) * d;
            o.copy_from_slice(&src[at..at + d]);
        }
    });
}

/// Head-major scratch for `attention_backward`.
pub struct AttnBackwardScratch<'a> {
    /// `[B, H, T, T]`: dP, then dS in place.
    pub ds: &'a mut [f32],
    /// `[B, H, T, D]`
    pub dq_hm: &'a mut [f32],
    /// `[B, KV, T, D]`
    pub dk_hm: &'a mut [f32],
    /// `[B, KV, T, D]`
    pub dv_hm: &'a mut [f32],
}

/// One backward task per (batch, kv head), in order: its query-head group's dS rows
/// `[G, T, T]`, dq `[G, T, D]`, and its dk, dv `[T, D]` (head-major scratch).
type BackwardTask<'a> = (usize, (((&'a mut [f32], &'a mut [f32]), &'a mut [f32]), &'a mut [f32]));

fn backward_tasks<'a>(
    scratch: &'a mut AttnBackwardScratch,
    dims: AttnDims,
) -> impl IndexedParallelIterator<Item = BackwardTask<'a>> {
    let AttnDims { t, d, .. } = dims;
    let g = dims.group();
    let AttnBackwardScratch { ds, dq_hm, dk_hm, dv_hm } = scratch;
    ds[..dims.probs_len()]
        .par_chunks_mut(g * t * t)
        .zip(dq_hm.par_chunks_mut(g * t * d))
        .zip(dk_hm.par_chunks_mut(t * d))
        .zip(dv_hm.par_chunks_mut(t * d))
        .enumerate()
}

/// dq `[N, H·D]`, dk and dv `[N, KV·D]` ← the tasks' head-major results.
fn scatter_backward(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], scratch: &AttnBackwardScratch, dims: AttnDims) {
    let AttnDims { b, t, h, kv, d } = dims;
    scatter_heads(dq, scratch.dq_hm, b, t, h, d);
    scatter_heads(dk, scratch.dk_hm, b, t, kv, d);
    scatter_heads(dv, scratch.dv_hm, b, t, kv, d);
}

/// Rows `[r0, r1)` of dS ← P ⊙ (dP − rowsum(P ⊙ dP)) · scale in place over dP, in their live
/// columns `[0, r1)`: `ds` and `p` are the blocks' rows of T.
fn softmax_backward_block(ds: &mut [f32], p: &[f32], r1: usize, t: usize, scale: f32) {
    for (prow, srow) in p.chunks_exact(t).zip(ds.chunks_exact_mut(t)) {
        let (prow, srow) = (&prow[..r1], &mut srow[..r1]);
        let rowsum = super::dot(prow, srow);
        for (s, &pv) in srow.iter_mut().zip(prow) {
            *s = pv * (*s - rowsum) * scale;
        }
    }
}

/// Backward of attention, with S = q·kᵀ/√D and P = softmax(S):
/// `dv = Pᵀ·dout`, `dP = dout·vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`,
/// `dq = dS·k/√D`, `dk = dSᵀ·q/√D`, summing dk and dv over the query heads of each kv group.
/// dq `[N, H·D]`, dk and dv `[N, KV·D]` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    par: Par,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    mut scratch: AttnBackwardScratch,
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: AttnDims,
) {
    let AttnDims { b: _, t, h, kv, d } = dims;
    let (g, qw, kw) = (dims.group(), h * d, kv * d);
    let seq = inner(par);
    let scale = dims.scale();
    backward_tasks(&mut scratch, dims).for_each(|(task, (((ds, dqh), dkh), dvh))| {
        let (bi, kvh) = (task / kv, task % kv);
        let kh = dims.kv_rows(k, bi, kvh);
        let vh = dims.kv_rows(v, bi, kvh);
        with_transposed(vh, kw, t, d, |vt| {
            for gi in 0..g {
                let head = kvh * g + gi;
                let qh = dims.q_rows(q, bi, head);
                let doh = dims.q_rows(dout, bi, head);
                let p = dims.head_probs(probs, bi, head);
                let ds = &mut ds[gi * t * t..(gi + 1) * t * t];
                let first = gi == 0;
                // Row block [r0, r1) of P, dP and dS is only live in columns [0, r1); column
                // block [c0, c1) is only live in rows [c0, T). Entries outside are never read.
                for (r0, r1) in blocks(t) {
                    let rows = r1 - r0;
                    let ds_blk = &mut ds[r0 * t..r1 * t];
                    small::gemm(seq, rows, r1, d, Operand::n(&doh[r0 * qw..], qw), Operand::n(vt, t), ds_blk, t, false);
                    softmax_backward_block(ds_blk, &p[r0 * t..r1 * t], r1, t, scale);
                    let dq_blk = &mut dqh[gi * t * d + r0 * d..];
                    small::gemm(seq, rows, d, r1, Operand::n(ds_blk, t), Operand::n(kh, kw), dq_blk, d, false);
                }
                for (c0, c1) in blocks(t) {
                    let (cols, rows) = (c1 - c0, t - c0);
                    let p_cols = Operand::t(&p[c0 * t + c0..], t);
                    let ds_cols = Operand::t(&ds[c0 * t + c0..], t);
                    let dv_blk = &mut dvh[c0 * d..];
                    small::gemm(seq, cols, d, rows, p_cols, Operand::n(&doh[c0 * qw..], qw), dv_blk, d, !first);
                    let dk_blk = &mut dkh[c0 * d..];
                    small::gemm(seq, cols, d, rows, ds_cols, Operand::n(&qh[c0 * qw..], qw), dk_blk, d, !first);
                }
            }
        });
    });
    scatter_backward(dq, dk, dv, &scratch, dims);
}

/// f64 reference forward; returns nothing saved (the reference recomputes everything).
pub fn attention_forward_slow(out: &mut [f64], q: &[f64], k: &[f64], v: &[f64], dims: AttnDims) {
    let AttnDims { b, t, h, kv, d } = dims;
    let (qw, kw) = (h * d, kv * d);
    let scale = 1.0 / (d as f64).sqrt();
    for bi in 0..b {
        for head in 0..h {
            let kvh = head / dims.group();
            for i in 0..t {
                let qi = &q[(bi * t + i) * qw + head * d..][..d];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[(bi * t + j) * kw + kvh * d..][..d];
                        qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>() * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[(bi * t + i) * qw + head * d + c] =
                        (0..=i).map(|j| e[j] / z * v[(bi * t + j) * kw + kvh * d + c]).sum();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;
    use crate::rng::Rng;

    fn run_fast(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], dims: AttnDims, par: Par) -> [Vec<f32>; 4] {
        let AttnDims { b, t, h, kv, d } = dims;
        let n = b * t;
        let mut out = vec![0.0; n * h * d];
        let mut probs = vec![0.0; dims.probs_len()];
        let mut hm = vec![0.0; n * h * d];
        attention_forward(par, &mut out, &mut probs, &mut hm, q, k, v, dims);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * h * d], vec![0.0; n * kv * d], vec![0.0; n * kv * d]);
        let mut ds = vec![0.0; dims.probs_len()];
        let (mut dk_hm, mut dv_hm) = (vec![0.0; n * kv * d], vec![0.0; n * kv * d]);
        let scratch = AttnBackwardScratch { ds: &mut ds, dq_hm: &mut hm, dk_hm: &mut dk_hm, dv_hm: &mut dv_hm };
        attention_backward(par, &mut dq, &mut dk, &mut dv, scratch, dout, &probs, q, k, v, dims);
        [out, dq, dk, dv]
    }

    #[test]
    fn fast_matches_naive_and_finite_differences() {
        let mut rng = Rng::new(21);
        let shapes = [
            AttnDims { b: 1, t: 1, h: 1, kv: 1, d: 2 },
            AttnDims { b: 2, t: 7, h: 4, kv: 2, d: 6 },
            AttnDims { b: 1, t: 13, h: 3, kv: 3, d: 8 },
            AttnDims { b: 2, t: 33, h: 6, kv: 2, d: 10 },
            AttnDims { b: 1, t: 150, h: 4, kv: 1, d: 8 }, // three causal blocks, the last partial
        ];
        for dims in shapes {
            let AttnDims { b, t, h, kv, d } = dims;
            let n = b * t;
            let q = randn(&mut rng, n * h * d);
            let k = randn(&mut rng, n * kv * d);
            let v = randn(&mut rng, n * kv * d);
            let dout = randn(&mut rng, n * h * d);
            for threads in [1, 2] {
                let [out, dq, dk, dv] = run_fast(&q, &k, &v, &dout, dims, Par { threads, ..Par::seq() });
                let mut out_r = vec![0.0; out.len()];
                attention_forward_slow(&mut out_r, &f64s(&q), &f64s(&k), &f64s(&v), dims);
                assert_close(&out, &out_r, f32_tol(t * d), &format!("attn fwd {dims:?}"));
                // Gradients of Σ dout ⊙ attention(q, k, v) by central differences of the f64
                // reference (exact to ~1e-9), against the fast f32 backward.
                let proj = f64s(&dout);
                let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
                let loss = |q: &[f64], k: &[f64], v: &[f64]| {
                    let mut o = vec![0.0; n * h * d];
                    attention_forward_slow(&mut o, q, k, v, dims);
                    dot64(&o, &proj)
                };
                // At most ~40 coordinates per tensor keep the f64 reference affordable.
                let check = |fast: &[f32], x: &[f64], which: usize, what: &str| {
                    let scale = fast.iter().fold(1.0f64, |m, g| m.max(g.abs() as f64));
                    for i in (0..x.len()).step_by(x.len().div_ceil(40)) {
                        let mut p = x.to_vec();
                        let eval = |p: &[f64]| match which {
                            0 => loss(p, &k64, &v64),
                            1 => loss(&q64, p, &v64),
                            _ => loss(&q64, &k64, p),
                        };
                        p[i] += 1e-6;
                        let fp = eval(&p);
                        p[i] -= 2e-6;
                        let numeric = (fp - eval(&p)) / 2e-6;
                        let err = (fast[i] as f64 - numeric).abs();
                        let tol = 1e-5 * (t as f64).sqrt() * scale;
                        assert!(err <= tol, "{what} {dims:?}[{i}]: fast {} vs numeric {numeric}", fast[i]);
                    }
                };
                check(&dq, &q64, 0, "attn dq");
                check(&dk, &k64, 1, "attn dk");
                check(&dv, &v64, 2, "attn dv");
            }
        }
    }
}
