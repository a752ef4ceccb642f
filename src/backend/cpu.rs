//! The `cpu` backend: the kernel set on the crate's own ops and a real GEMM, in f32.

use super::{Backend, LayerActs, LayerGrads, QkNormGrads, Weights};
use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::attention::{AttnBackwardScratch, AttnDims, attention_backward, attention_forward};
use crate::ops::matmul::{matmul_backward_dx, matmul_forward};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::{RopeTable, rope_backward, rope_forward};
use crate::ops::swiglu::{swiglu_backward, swiglu_forward};
use anyhow::Result;

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
    /// `[N, H·D]`, `[N, KV·D]`: post-norm q/k gradients before QK-norm backward (QK-norm only)
    dq_post: Vec<f32>,
    dk_post: Vec<f32>,
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
            rope: RopeTable::new(t, cfg.head_dim, cfg.rope_theta),
            hm_q: vec![0.0; n * cfg.q_dim()],
            hm_k: vec![0.0; n * cfg.kv_dim()],
            hm_v: vec![0.0; n * cfg.kv_dim()],
            ds: vec![0.0; dims.probs_len()],
            dq_post: vec![0.0; qk * n * cfg.q_dim()],
            dk_post: vec![0.0; qk * n * cfg.kv_dim()],
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn attention_forward(&mut self, o: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()> {
        let (par, n, c, eps) = (self.par, self.n, self.c, self.eps);
        let AttnDims { t, h, kv, d, .. } = self.dims;
        let (qd, kd) = (h * d, kv * d);
        match (w.q_norm, w.k_norm) {
            (Some(qn), Some(kn)) => {
                matmul_forward(par, &mut acts.q_raw, &acts.xn1, w.wq, n, c, qd);
                matmul_forward(par, &mut acts.k_raw, &acts.xn1, w.wk, n, c, kd);
                rmsnorm_forward(&mut acts.q, &mut acts.q_rstd, &acts.q_raw, qn, n * h, d, eps);
                rmsnorm_forward(&mut acts.k, &mut acts.k_rstd, &acts.k_raw, kn, n * kv, d, eps);
            }
            _ => {
                matmul_forward(par, &mut acts.q, &acts.xn1, w.wq, n, c, qd);
                matmul_forward(par, &mut acts.k, &acts.xn1, w.wk, n, c, kd);
            }
        }
        matmul_forward(par, &mut acts.v, &acts.xn1, w.wv, n, c, kd);
        rope_forward(&mut acts.q, &self.rope, n, t, h);
        rope_forward(&mut acts.k, &self.rope, n, t, kv);
        attention_forward(par, &mut acts.attn, &mut acts.probs, &mut self.hm_q, &acts.q, &acts.k, &acts.v, self.dims);
        matmul_forward(par, o, &acts.attn, w.wo, n, qd, c);
        Ok(())
    }

    fn ffn_forward(&mut self, out: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()> {
        let (par, n, c, f) = (self.par, self.n, self.c, self.f);
        matmul_forward(par, &mut acts.h1, &acts.xn2, w.w1, n, c, f);
        matmul_forward(par, &mut acts.h3, &acts.xn2, w.w3, n, c, f);
        swiglu_forward(&mut acts.gate, &acts.h1, &acts.h3);
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
        swiglu_backward(&mut g.dh1, &mut g.dh3, &g.dgate, &acts.h1, &acts.h3);
        matmul_backward_dx(par, dxn, &g.dh1, w.w1, n, c, f, false);
        matmul_backward_dx(par, dxn, &g.dh3, w.w3, n, c, f, true);
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
        let qk_norm = w.q_norm.is_some();
        matmul_backward_dx(par, &mut g.dattn, d_o, w.wo, n, qd, c, false);
        // With QK-norm, attention's q/k gradients are post-norm; they go through the norm's
        // backward into g.dq/g.dk. Without it they land in g.dq/g.dk directly.
        let (dq, dk) = if qk_norm { (&mut self.dq_post, &mut self.dk_post) } else { (&mut g.dq, &mut g.dk) };
        let scratch = AttnBackwardScratch {
            ds: &mut self.ds,
            dq_hm: &mut self.hm_q,
            dk_hm: &mut self.hm_k,
            dv_hm: &mut self.hm_v,
        };
        attention_backward(
            par,
            dq,
            dk,
            &mut g.dv,
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
        if let (Some(qn), Some(kn), Some(dqn), Some(dkn)) = (w.q_norm, w.k_norm, norm_grads.q_norm, norm_grads.k_norm) {
            rmsnorm_backward(&mut g.dq, dqn, &self.dq_post, &acts.q_rstd, &acts.q_raw, qn, n * h, d, false);
            rmsnorm_backward(&mut g.dk, dkn, &self.dk_post, &acts.k_rstd, &acts.k_raw, kn, n * kv, d, false);
        }
        matmul_backward_dx(par, dxn, &g.dq, w.wq, n, c, qd, false);
        matmul_backward_dx(par, dxn, &g.dk, w.wk, n, c, kd, true);
        matmul_backward_dx(par, dxn, &g.dv, w.wv, n, c, kd, true);
        Ok(())
    }
}
