//! The `cpu` backend: the kernel set on the crate's own ops and a real GEMM, in f32.

use super::qkv::qkv_backward;
use super::{Backend, LayerActs, LayerGrads, QkNormGrads, Weights};
use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::attention::{AttnBackwardScratch, AttnDims, attention_backward, attention_forward};
use crate::ops::matmul::{Operand, bias_forward, matmul_backward_dx, matmul_forward, sgemm};
use crate::ops::rmsnorm::rmsnorm_forward;
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
    /// `[N, H·D]`, `[N, KV·D]`, `[N, KV·D]`: attention's q/k/v gradients (after RoPE
    /// backward), before QK-norm's backward writes them into `dqkv`
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl CpuBackend {
    /// All scratch is sized here, once; the kernels never allocate.
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, par: Par) -> Self {
        let n = b * t;
        let dims = AttnDims { b, t, h: cfg.n_heads, kv: cfg.n_kv_heads, d: cfg.head_dim };
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
            dq: vec![0.0; n * cfg.q_dim()],
            dk: vec![0.0; n * cfg.kv_dim()],
            dv: vec![0.0; n * cfg.kv_dim()],
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
        // The fused projection's row blocks Wq `[QD, C]`, Wk, Wv `[KD, C]`, each product
        // written straight into its own buffer (no fused output to split).
        let (wq, rest) = w.wqkv.split_at(qd * c);
        let (wk, wv) = rest.split_at(kd * c);
        let norm = w.q_norm.zip(w.k_norm);
        let (q_out, k_out) =
            if norm.is_some() { (&mut acts.q_raw, &mut acts.k_raw) } else { (&mut acts.q, &mut acts.k) };
        let xn1 = Operand::n(&acts.xn1, c);
        sgemm(par, n, qd, c, xn1, Operand::t(wq, c), q_out, qd, false);
        sgemm(par, n, kd, c, xn1, Operand::t(wk, c), k_out, kd, false);
        sgemm(par, n, kd, c, xn1, Operand::t(wv, c), &mut acts.v, kd, false);
        if let Some(bias) = w.bqkv {
            let (bq, rest) = bias.split_at(qd);
            let (bk, bv) = rest.split_at(kd);
            bias_forward(q_out, bq);
            bias_forward(k_out, bk);
            bias_forward(&mut acts.v, bv);
        }
        if let Some((qn, kn)) = norm {
            rmsnorm_forward(&mut acts.q, &mut acts.q_rstd, &acts.q_raw, qn, n * h, d, eps);
            rmsnorm_forward(&mut acts.k, &mut acts.k_rstd, &acts.k_raw, kn, n * kv, d, eps);
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
        qkv_backward(&mut g.dqkv, norm_grads, &self.dq, &self.dk, &self.dv, acts, w, n, h, kv, d);
        matmul_backward_dx(par, dxn, &g.dqkv, w.wqkv, n, c, qd + 2 * kd, false);
        Ok(())
    }
}
