//! The attention core with its six products on bf16 inputs and f32 accumulation, for
//! `--bf16-matmul` (as PyTorch's bf16 autocast runs scaled-dot-product attention): q, k, v,
//! the probabilities P, dout and dS are rounded to bf16 where they enter a product; the
//! scores, the softmax, P as saved for backward, `rowsum(P ⊙ dP)` and dS stay f32.
//!
//! Same task split, causal blocking, saved state and outputs as `attention_forward` /
//! `attention_backward` (whose doc comments give the math); the products run on
//! `gemm_bf16::pairs`, twice the multiply-adds per instruction of the f32 kernel. Each task
//! packs its kv head's K and V (and each query head's Q and dout in backward) once, into
//! per-thread scratch that grows once to the largest head, and reuses them across causal
//! blocks and the query heads of the group.

use super::{
    AttnBackwardScratch, AttnDims, backward_tasks, blocks, scatter_backward, scatter_heads, softmax_backward_block,
    softmax_block,
};
use crate::ops::gemm_bf16::pairs::{Pairs, gemm, pack_panels, pack_rows, panels_len};
use rayon::prelude::*;
use std::cell::RefCell;

/// Columns per panel of a packed B operand (`gemm_bf16::pairs`).
const NR: usize = 32;

/// One thread's packed operands.
#[derive(Default)]
struct Packs {
    /// The kv head's two B operands (forward: Kᵀ, V; backward: Vᵀ, K).
    kv: [Vec<u32>; 2],
    /// The query head's two B operands in backward: dout, Q.
    head: [Vec<u32>; 2],
    /// The A operand of one causal block.
    a: Vec<u32>,
}

thread_local! {
    static PACKS: RefCell<Packs> = RefCell::new(Packs::default());
}

/// The first `len` words of `v`, grown (zeroed) if shorter.
fn grow(v: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if v.len() < len {
        v.resize(len, 0);
    }
    &mut v[..len]
}

/// A head's `[T, D]` rows (row stride `ld`) as a B operand: `trans` with k = D running along
/// the rows (for q·kᵀ and dout·vᵀ, stride `NR·⌈D/2⌉`), otherwise with k = T running down them
/// (for p·v, dS·k, Pᵀ·dout, dSᵀ·q, stride `NR·⌈T/2⌉`). Returns the stride.
fn pack_head(dst: &mut Vec<u32>, src: &[f32], ld: usize, t: usize, d: usize, trans: bool) -> usize {
    let (x, k) = if trans { (t, d) } else { (d, t) };
    let stride = NR * k.div_ceil(2);
    pack_panels(grow(dst, panels_len(x, stride)), stride, src, ld, trans, x, k);
    stride
}

/// The B operand `src` (panels of `stride`) from pair `c0/2` on: rows c0.. of its source.
fn window(src: &[u32], stride: usize, c0: usize) -> Pairs<'_> {
    Pairs::Panels { data: &src[NR * (c0 / 2)..], stride }
}

/// `attention_forward` with bf16 products: out `[N, H·D]`, probs `[B, H, T, T]` (f32),
/// out_hm `[B, H, T, D]` scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_bf16(
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
    let scale = dims.scale();
    let kp_d = d.div_ceil(2);
    let probs = &mut probs[..dims.probs_len()];
    probs.par_chunks_mut(g * t * t).zip(out_hm.par_chunks_mut(g * t * d)).enumerate().for_each(|(task, (p, o))| {
        let (bi, kvh) = (task / kv, task % kv);
        PACKS.with_borrow_mut(|packs| {
            let Packs { kv: [kt, vn], a, .. } = packs;
            let kh = dims.kv_rows(k, bi, kvh);
            let vh = dims.kv_rows(v, bi, kvh);
            let kt_stride = pack_head(kt, kh, kw, t, d, true);
            let vn_stride = pack_head(vn, vh, kw, t, d, false);
            let (kt, vn) =
                (Pairs::Panels { data: kt, stride: kt_stride }, Pairs::Panels { data: vn, stride: vn_stride });
            for (gi, (p, o)) in p.chunks_exact_mut(t * t).zip(o.chunks_exact_mut(t * d)).enumerate() {
                let qh = dims.q_rows(q, bi, kvh * g + gi);
                for (r0, r1) in blocks(t) {
                    let rows = r1 - r0;
                    let p_blk = &mut p[r0 * t..r1 * t];
                    let qa = grow(a, rows * kp_d);
                    pack_rows(qa, kp_d, &qh[r0 * qw..], qw, rows, d);
                    gemm(rows, r1, kp_d, Pairs::Rows { data: qa, ld: kp_d }, kt, p_blk, t, false);
                    softmax_block(p_blk, r0, r1, t, scale);
                    let kp_r = r1.div_ceil(2);
                    let pa = grow(a, rows * kp_r);
                    pack_rows(pa, kp_r, p_blk, t, rows, r1);
                    gemm(rows, d, kp_r, Pairs::Rows { data: pa, ld: kp_r }, vn, &mut o[r0 * d..], d, false);
                }
            }
        });
    });
    scatter_heads(out, out_hm, dims.b, t, h, d);
}

/// `attention_backward` with bf16 products; dq `[N, H·D]`, dk and dv `[N, KV·D]` are
/// overwritten, `probs` is the forward's f32 `[B, H, T, T]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_bf16(
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
    let scale = dims.scale();
    let kp_d = d.div_ceil(2);
    backward_tasks(&mut scratch, dims).for_each(|(task, (((ds, dqh), dkh), dvh))| {
        let (bi, kvh) = (task / kv, task % kv);
        PACKS.with_borrow_mut(|packs| {
            let Packs { kv: [vt, kn], head: [don, qn], a } = packs;
            let kh = dims.kv_rows(k, bi, kvh);
            let vh = dims.kv_rows(v, bi, kvh);
            let vt_stride = pack_head(vt, vh, kw, t, d, true);
            let kn_stride = pack_head(kn, kh, kw, t, d, false);
            let (vt, kn) =
                (Pairs::Panels { data: vt, stride: vt_stride }, Pairs::Panels { data: kn, stride: kn_stride });
            for gi in 0..g {
                let head = kvh * g + gi;
                let qh = dims.q_rows(q, bi, head);
                let doh = dims.q_rows(dout, bi, head);
                let p = dims.head_probs(probs, bi, head);
                let ds = &mut ds[gi * t * t..(gi + 1) * t * t];
                let first = gi == 0;
                // As in `attention_backward`: row block [r0, r1) is live in columns [0, r1),
                // column block [c0, c1) in rows [c0, T); nothing outside is read.
                for (r0, r1) in blocks(t) {
                    let rows = r1 - r0;
                    let ds_blk = &mut ds[r0 * t..r1 * t];
                    let da = grow(a, rows * kp_d);
                    pack_rows(da, kp_d, &doh[r0 * qw..], qw, rows, d);
                    gemm(rows, r1, kp_d, Pairs::Rows { data: da, ld: kp_d }, vt, ds_blk, t, false);
                    softmax_backward_block(ds_blk, &p[r0 * t..r1 * t], r1, t, scale);
                    let kp_r = r1.div_ceil(2);
                    let sa = grow(a, rows * kp_r);
                    pack_rows(sa, kp_r, ds_blk, t, rows, r1);
                    let dq_blk = &mut dqh[gi * t * d + r0 * d..];
                    gemm(rows, d, kp_r, Pairs::Rows { data: sa, ld: kp_r }, kn, dq_blk, d, false);
                }
                let do_stride = pack_head(don, doh, qw, t, d, false);
                let q_stride = pack_head(qn, qh, qw, t, d, false);
                for (c0, c1) in blocks(t) {
                    // Rows c0.. of P and dS (columns c0..c1) are A with k down the rows; the
                    // B operands start at pair c0/2 (blocks start at even positions).
                    let (cols, rows) = (c1 - c0, t - c0);
                    let (kp_r, a_stride) = (rows.div_ceil(2), NR * rows.div_ceil(2));
                    let pa = grow(a, panels_len(cols, a_stride));
                    pack_panels(pa, a_stride, &p[c0 * t + c0..], t, false, cols, rows);
                    let pa = Pairs::Panels { data: pa, stride: a_stride };
                    gemm(cols, d, kp_r, pa, window(don, do_stride, c0), &mut dvh[c0 * d..], d, !first);
                    let sa = grow(a, panels_len(cols, a_stride));
                    pack_panels(sa, a_stride, &ds[c0 * t + c0..], t, false, cols, rows);
                    let sa = Pairs::Panels { data: sa, stride: a_stride };
                    gemm(cols, d, kp_r, sa, window(qn, q_stride, c0), &mut dkh[c0 * d..], d, !first);
                }
            }
        });
    });
    scatter_backward(dq, dk, dv, &scratch, dims);
}

#[cfg(test)]
mod tests {
    use super::super::attention_forward_slow;
    use super::*;
    use crate::ops::Par;
    use crate::ops::attention::{attention_backward, attention_forward};
    use crate::ops::testing::*;
    use crate::rng::Rng;

    /// Relative L2 distance.
    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// Forward against the f64 reference, and forward and backward against the f32 core,
    /// within bf16's rounding (relative L2 ≤ 1e-2; measured 1.3e-3 to 4.1e-3: each rounded
    /// input carries up to 2⁻⁹ relative error) but not equal to it (the products did run on
    /// bf16). Shapes cover partial causal blocks, odd T and odd D (the
    /// zero-padded last pair), D = 64 and 128, group sizes 1 to 4, and one and two threads.
    #[test]
    fn matches_f32_core_within_bf16_rounding() {
        let mut rng = Rng::new(77);
        let shapes = [
            AttnDims { b: 1, t: 1, h: 1, kv: 1, d: 2 },
            AttnDims { b: 2, t: 7, h: 4, kv: 2, d: 6 },
            AttnDims { b: 1, t: 13, h: 3, kv: 3, d: 7 },
            AttnDims { b: 2, t: 65, h: 6, kv: 2, d: 10 },
            AttnDims { b: 1, t: 150, h: 4, kv: 1, d: 64 },
            AttnDims { b: 1, t: 70, h: 4, kv: 2, d: 128 }, // Qwen3's head width
        ];
        for dims in shapes {
            let AttnDims { b, t, h, kv, d } = dims;
            let n = b * t;
            let q = randn(&mut rng, n * h * d);
            let k = randn(&mut rng, n * kv * d);
            let v = randn(&mut rng, n * kv * d);
            let dout = randn(&mut rng, n * h * d);
            let run = |bf16: bool, threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let mut out = vec![0.0; n * h * d];
                    let mut probs = vec![0.0; dims.probs_len()];
                    let mut hm = vec![0.0; n * h * d];
                    if bf16 {
                        attention_forward_bf16(&mut out, &mut probs, &mut hm, &q, &k, &v, dims);
                    } else {
                        attention_forward(Par::seq(), &mut out, &mut probs, &mut hm, &q, &k, &v, dims);
                    }
                    let (mut dq, mut dk, mut dv) = (vec![0.0; n * h * d], vec![0.0; n * kv * d], vec![0.0; n * kv * d]);
                    let mut ds = vec![0.0; dims.probs_len()];
                    let (mut dk_hm, mut dv_hm) = (vec![0.0; n * kv * d], vec![0.0; n * kv * d]);
                    let scratch =
                        AttnBackwardScratch { ds: &mut ds, dq_hm: &mut hm, dk_hm: &mut dk_hm, dv_hm: &mut dv_hm };
                    if bf16 {
                        attention_backward_bf16(&mut dq, &mut dk, &mut dv, scratch, &dout, &probs, &q, &k, &v, dims);
                    } else {
                        attention_backward(
                            Par::seq(),
                            &mut dq,
                            &mut dk,
                            &mut dv,
                            scratch,
                            &dout,
                            &probs,
                            &q,
                            &k,
                            &v,
                            dims,
                        );
                    }
                    [out, dq, dk, dv]
                })
            };
            let want = run(false, 1);
            let mut out_ref = vec![0.0; n * h * d];
            attention_forward_slow(&mut out_ref, &f64s(&q), &f64s(&k), &f64s(&v), dims);
            let out_ref: Vec<f32> = out_ref.iter().map(|&x| x as f32).collect();
            for threads in [1, 2] {
                let got = run(true, threads);
                assert!(rel(&got[0], &out_ref) <= 1e-2, "fwd vs f64 {dims:?}: {:.2e}", rel(&got[0], &out_ref));
                for (name, (g, w)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                    let e = rel(g, w);
                    assert!(e <= 1e-2, "{name} {dims:?} threads {threads}: {e:.2e} from the f32 core");
                    if t * d >= 16 {
                        assert!(e > 0.0, "{name} {dims:?}: identical to the f32 core, so bf16 never ran");
                    }
                }
            }
        }
    }
}
