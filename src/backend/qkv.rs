//! The tail of attention's backward that every backend shares: QK-norm's backward (a per-head
//! RMSNorm backward and its gain gradients) and the assembly of the q/k/v projection
//! outputs' gradient `dqkv`, written straight into its column blocks (no per-part buffers,
//! no separate join pass).

use super::{LayerActs, QkNormGrads, Weights};
use crate::ops::rmsnorm::{rmsnorm_backward_row, rmsnorm_dw};
use crate::ops::rows_per_task;
use rayon::prelude::*;

/// Fills `dqkv` `[N, H·D + 2·KV·D]` = [dq_raw | dk_raw | dv] from the post-RoPE-backward
/// gradients dq `[N, H·D]`, dk and dv `[N, KV·D]`. With QK-norm (gains in `w`, saved
/// pre-norm projections and 1/rms in `acts`), dq_raw and dk_raw are dq and dk taken back
/// through the norm and the gain gradients are accumulated into `norm_grads`; without it they
/// are dq and dk.
///
/// QK-norm is an RMSNorm over each head's D values, y = x̂ ⊙ w with x̂ = x·r, r = 1/rms(x);
/// with g = w ⊙ dy: `dx = r · (g − x̂ · mean(g ⊙ x̂))`, `dw += Σ_(rows, heads) dy ⊙ x̂`.
/// The gain sums run in one fixed order, so results do not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn qkv_backward(
    dqkv: &mut [f32],
    norm_grads: QkNormGrads,
    dq: &[f32],
    dk: &[f32],
    dv: &[f32],
    acts: &LayerActs,
    w: &Weights,
    n: usize,
    h: usize,
    kv: usize,
    d: usize,
) {
    let (qd, kd) = (h * d, kv * d);
    let width = qd + 2 * kd;
    let norm = match (w.q_norm, w.k_norm) {
        (Some(qn), Some(kn)) => Some((qn, kn)),
        _ => None,
    };
    let rows = rows_per_task(width);
    dqkv[..n * width].par_chunks_mut(rows * width).enumerate().for_each(|(blk, out)| {
        for (r, dst) in out.chunks_exact_mut(width).enumerate() {
            let i = blk * rows + r;
            let (dst_q, rest) = dst.split_at_mut(qd);
            let (dst_k, dst_v) = rest.split_at_mut(kd);
            let (dq, dk) = (&dq[i * qd..(i + 1) * qd], &dk[i * kd..(i + 1) * kd]);
            match norm {
                Some((qn, kn)) => {
                    let (q_raw, k_raw) = (&acts.q_raw[i * qd..(i + 1) * qd], &acts.k_raw[i * kd..(i + 1) * kd]);
                    let heads = dst_q.chunks_exact_mut(d).zip(dq.chunks_exact(d)).zip(q_raw.chunks_exact(d));
                    for (hh, ((dx, dy), x)) in heads.enumerate() {
                        rmsnorm_backward_row(dx, dy, acts.q_rstd[i * h + hh], x, qn, false);
                    }
                    let heads = dst_k.chunks_exact_mut(d).zip(dk.chunks_exact(d)).zip(k_raw.chunks_exact(d));
                    for (hh, ((dx, dy), x)) in heads.enumerate() {
                        rmsnorm_backward_row(dx, dy, acts.k_rstd[i * kv + hh], x, kn, false);
                    }
                }
                None => {
                    dst_q.copy_from_slice(dq);
                    dst_k.copy_from_slice(dk);
                }
            }
            dst_v.copy_from_slice(&dv[i * kd..(i + 1) * kd]);
        }
    });
    if let (Some(_), Some(dqn), Some(dkn)) = (norm, norm_grads.q_norm, norm_grads.k_norm) {
        rmsnorm_dw(dqn, &dq[..n * qd], &acts.q_rstd[..n * h], &acts.q_raw[..n * qd], d);
        rmsnorm_dw(dkn, &dk[..n * kd], &acts.k_rstd[..n * kv], &acts.k_raw[..n * kd], d);
    }
}
