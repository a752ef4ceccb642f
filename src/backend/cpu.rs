//! The `cpu` backend: the kernel set on the crate's own ops and a real GEMM, in f32.

use super::{Backend, LayerActs, LayerGrads, QkNormGrads, Weights};
use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::attention::{AttnBackwardScratch, AttnDims, attention_backward, attention_forward};
use crate::ops::matmul::{bias_forward, matmul_backward_dx, matmul_forward};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::{RopeTable, rope_backward, rope_forward};
use crate::ops::swiglu::{swiglu_backward, swiglu_forward};
use anyhow::Result;
use rayon::prelude::*;

pub struct CpuBackend {
    par: Par,
    /// C, F, N = B·T
    c: usize,
    f: usize,
    n: usize,
    dims: AttnDims,
    eps: f32,
    rope: RopeTable,
    /// `[B, H, T, D]` head-major attention output / dq
    hm_q: Vec<f32>,
    /// `[B, KV, T, D]` head-major dk, dv
    hm_k: Vec<f32>,
    hm_v: Vec<f32>,
    /// `[B, H, T, T]` dP → dS
    ds: Vec<f32>,
    /// `[N, (H + 2·KV)·D]` fused projection output, split into q, k, v after the GEMM
    qkv: Vec<f32>,
    /// `[N, H·D]`, `[N, KV·D]`, `[N, KV·D]`: attention's q/k/v gradients (after RoPE
    /// backward), gathered into the fused `dqkv` for one dx and one dW GEMM
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// `[N, H·D]`, `[N, KV·D]`: q/k gradients through QK-norm backward (QK-norm only)
    dq_raw: Vec<f32>,
    dk_raw: Vec<f32>,
}

/// Copies the column blocks of `src` `[N, Σ widths]` into separate `[N, width]` buffers.
fn split_columns(src: &[f32], dsts: [(&mut [f32], usize); 3]) {
    let w: usize = dsts.iter().map(|d| d.1).sum();
    let mut at = 0;
    for (dst, width) in dsts {
        let rows = crate::ops::rows_per_task(w);
        dst.par_chunks_mut(rows * width).zip(src.par_chunks(rows * w)).for_each(|(d, s)| {
            for (d, s) in d.chunks_exact_mut(width).zip(s.chunks_exact(w)) {
                d.copy_from_slice(&s[at..at + width]);
            }
        });
        at += width;
    }
}

/// The inverse of `split_columns`: `[N, width]` buffers side by side into `dst` `[N, Σ widths]`.
fn join_columns(dst: &mut [f32], srcs: [(&[f32], usize); 3]) {
    let w: usize = srcs.iter().map(|s| s.1).sum();
    let rows = crate::ops::rows_per_task(w);
    dst.par_chunks_mut(rows * w).enumerate().for_each(|(blk, d)| {
        for (r, d) in d.chunks_exact_mut(w).enumerate() {
            let row = blk * rows + r;
            let mut at = 0;
            for (src, width) in &srcs {
                d[at..at + width].copy_from_slice(&src[row * width..(row + 1) * width]);
                at += width;
            }
        }
    });
}

impl CpuBackend {
    /// All scratch is sized here, once; the kernels never allocate.
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, par: Par) -> Self {
        let n = b * t;
        let dims = AttnDims { b, t, h: cfg.n_heads, kv: cfg.n_kv_heads, d: cfg.head_dim };
        let qk = if cfg.qk_norm { 1 } else { 0 };
        CpuBackend {
            par,
            c: cfg.dim,
            f: cfg.ffn_dim,
            n,
            dims,
            eps: cfg.norm_eps as f32,
            rope: RopeTable::for_config(t, cfg),
            hm_q: vec![0.0; n * cfg.q_dim()],
            hm_k: vec![0.0; n * cfg.kv_dim()],
            hm_v: vec![0.0; n * cfg.kv_dim()],
            ds: vec![0.0; dims.probs_len()],
            qkv: vec![0.0; n * (cfg.q_dim() + 2 * cfg.kv_dim())],
            dq: vec![0.0; n * cfg.q_dim()],
            dk: vec![0.0; n * cfg.kv_dim()],
            dv: vec![0.0; n * cfg.kv_dim()],
            dq_raw: vec![0.0; qk * n * cfg.q_dim()],
            dk_raw: vec![0.0; qk * n * cfg.kv_dim()],
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn shape(&self) -> (usize, usize) {
        (self.dims.b, self.dims.t)
    }

    fn attention_forward(&mut self, o: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()> {
        let (par, n, c, eps) = (self.par, self.n, self.c, self.eps);
        let AttnDims { t, h, kv, d, .. } = self.dims;
        let (qd, kd) = (h * d, kv * d);
        matmul_forward(par, &mut self.qkv, &acts.xn1, w.wqkv, n, c, qd + 2 * kd);
        if let Some(bias) = w.bqkv {
            bias_forward(&mut self.qkv, bias);
        }
        match (w.q_norm, w.k_norm) {
            (Some(qn), Some(kn)) => {
                split_columns(&self.qkv, [(&mut acts.q_raw, qd), (&mut acts.k_raw, kd), (&mut acts.v, kd)]);
                rmsnorm_forward(&mut acts.q, &mut acts.q_rstd, &acts.q_raw, qn, n * h, d, eps);
                rmsnorm_forward(&mut acts.k, &mut acts.k_rstd, &acts.k_raw, kn, n * kv, d, eps);
            }
            _ => split_columns(&self.qkv, [(&mut acts.q, qd), (&mut acts.k, kd), (&mut acts.v, kd)]),
        }
        rope_forward(&mut acts.q, &self.rope, n, t, h);
        rope_forward(&mut acts.k, &self.rope, n, t, kv);
        attention_forward(par, &mut acts.attn, &mut acts.probs, &mut self.hm_q, &acts.q, &acts.k, &acts.v, self.dims);
        matmul_forward(par, o, &acts.attn, w.wo, n, qd, c);
        Ok(())
    }

    fn ffn_forward(&mut self, out: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()> {
        let (par, n, c, f) = (self.par, self.n, self.c, self.f);
        matmul_forward(par, &mut acts.h13, &acts.xn2, w.w13, n, c, 2 * f);
        swiglu_forward(&mut acts.gate, &acts.h13, f);
        matmul_forward(par, out, &acts.gate, w.w2, n, f, c);
        Ok(())
    }

    fn ffn_backward_dx(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        d_out: &[f32],
        acts: &LayerActs,
        w: &Weights,
    ) -> Result<()> {
        let (par, n, c, f) = (self.par, self.n, self.c, self.f);
        matmul_backward_dx(par, &mut g.dgate, d_out, w.w2, n, f, c, false);
        swiglu_backward(&mut g.dh13, &g.dgate, &acts.h13, f);
        matmul_backward_dx(par, dxn, &g.dh13, w.w13, n, c, 2 * f, false);
        Ok(())
    }

    fn attention_backward_dx(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        norm_grads: QkNormGrads,
        d_o: &[f32],
        acts: &LayerActs,
        w: &Weights,
    ) -> Result<()> {
        let (par, n, c) = (self.par, self.n, self.c);
        let AttnDims { t, h, kv, d, .. } = self.dims;
        let (qd, kd) = (h * d, kv * d);
        matmul_backward_dx(par, &mut g.dattn, d_o, w.wo, n, qd, c, false);
        let scratch = AttnBackwardScratch {
            ds: &mut self.ds,
            dq_hm: &mut self.hm_q,
            dk_hm: &mut self.hm_k,
            dv_hm: &mut self.hm_v,
        };
        let (dq, dk) = (&mut self.dq, &mut self.dk);
        attention_backward(
            par,
            dq,
            dk,
            &mut self.dv,
            scratch,
            &g.dattn,
            &acts.probs,
            &acts.q,
            &acts.k,
            &acts.v,
            self.dims,
        );
        rope_backward(dq, &self.rope, n, t, h);
        rope_backward(dk, &self.rope, n, t, kv);
        // With QK-norm, the q/k gradients so far are post-norm; the norm's backward takes them
        // to the raw projection outputs.
        let (dq, dk): (&[f32], &[f32]) = match (w.q_norm, w.k_norm, norm_grads.q_norm, norm_grads.k_norm) {
            (Some(qn), Some(kn), Some(dqn), Some(dkn)) => {
                rmsnorm_backward(&mut self.dq_raw, dqn, &self.dq, &acts.q_rstd, &acts.q_raw, qn, n * h, d, false);
                rmsnorm_backward(&mut self.dk_raw, dkn, &self.dk, &acts.k_rstd, &acts.k_raw, kn, n * kv, d, false);
                (&self.dq_raw, &self.dk_raw)
            }
            _ => (&self.dq, &self.dk),
        };
        join_columns(&mut g.dqkv, [(dq, qd), (dk, kd), (&self.dv, kd)]);
        matmul_backward_dx(par, dxn, &g.dqkv, w.wqkv, n, c, qd + 2 * kd, false);
        Ok(())
    }
}
