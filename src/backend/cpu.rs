//! The `cpu` backend: the kernel set on the crate's own ops and a real GEMM, in f32.

use super::qkv::qkv_backward;
use super::{Backend, LayerActs, LayerGrads, LowpWeights, QkNormGrads, Weights};
use crate::config::ModelConfig;
use crate::lora::apply::{Stack, adapter_down, adapter_dx, adapter_dy_b, adapter_up};
use crate::ops::Par;
use crate::ops::attention::bf16::{attention_backward_bf16, attention_forward_bf16};
use crate::ops::attention::{AttnBackwardScratch, AttnDims, attention_backward, attention_forward};
use crate::ops::gemm_bf16::{Bf16Gemm, Bf16Rhs};
use crate::ops::matmul::{Operand, bias_forward, matmul_backward_dx, matmul_forward, sgemm};
use crate::ops::rmsnorm::rmsnorm_forward;
use crate::ops::rope::{RopeTable, rope_backward, rope_forward};
use crate::ops::swiglu::{swiglu_backward, swiglu_forward};
use crate::prof;
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
    /// The bf16 GEMM's packing scratch, made by the first `*_lowp` call.
    bf16: Option<Bf16Gemm>,
}

/// The projections a kernel multiplies by: the f32 weights, or a bf16 base with adapters.
#[derive(Clone, Copy)]
enum Proj<'a> {
    F32,
    Lowp(&'a LowpWeights<'a>),
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
            bf16: None,
        }
    }

    /// Makes the bf16 GEMM's scratch on first use (fallible).
    fn lowp_gemm(&mut self) -> Result<&mut Bf16Gemm> {
        if self.bf16.is_none() {
            self.bf16 = Some(Bf16Gemm::new(self.n)?);
        }
        Ok(self.bf16.as_mut().expect("made above"))
    }
}

/// y (leading dimension `ldy`, columns `0..oc`) = x `[N, IC]` · Wᵀ for the bf16 `w` `[OC, IC]`.
#[allow(clippy::too_many_arguments)]
fn lowp_forward(
    gemm: &mut Bf16Gemm,
    par: Par,
    y: &mut [f32],
    ldy: usize,
    x: &[f32],
    w: &[u16],
    n: usize,
    ic: usize,
    oc: usize,
) {
    let _t = prof::gemm("bf16 base fwd x·Wᵀ", n, oc, ic);
    gemm.gemm(par, n, oc, ic, x, ic, Bf16Rhs::T(w, ic), y, ldy, false);
}

/// dx `[N, IC]` = dy · W for the bf16 `w` `[OC, IC]` (dy of leading dimension `ldy`, columns
/// `0..oc`).
#[allow(clippy::too_many_arguments)]
fn lowp_dx(
    gemm: &mut Bf16Gemm,
    par: Par,
    dx: &mut [f32],
    dy: &[f32],
    ldy: usize,
    w: &[u16],
    n: usize,
    ic: usize,
    oc: usize,
) {
    let _t = prof::gemm("bf16 base dx dy·W", n, ic, oc);
    gemm.gemm(par, n, ic, oc, dy, ldy, Bf16Rhs::N(w, ic), dx, ic, false);
}

/// The input-gradient side of stack `st` beside a bf16 dx GEMM: v = s·dy_m·B_m for each
/// member (its dy columns start at `col(slot)` of `dy`, row stride `ldy`), saved in `v_store`
/// for the adapter backward, then dx += v·A.
#[allow(clippy::too_many_arguments)]
fn stack_dx(
    par: Par,
    dx: &mut [f32],
    v_store: &mut [f32],
    dy: &[f32],
    ldy: usize,
    st: &Stack,
    col: impl Fn(usize) -> usize,
    n: usize,
    s: f32,
) {
    let v = &mut v_store[st.block(n)];
    for m in st.iter() {
        adapter_dy_b(par, v, &dy[col(m.slot)..], ldy, st, &m, n, s);
    }
    adapter_dx(par, dx, v, st, n);
}

impl CpuBackend {
    fn attention_forward_with(&mut self, o: &mut [f32], acts: &mut LayerActs, w: &Weights, p: Proj) -> Result<()> {
        let (par, n, c, eps) = (self.par, self.n, self.c, self.eps);
        let AttnDims { t, h, kv, d, .. } = self.dims;
        let (qd, kd) = (h * d, kv * d);
        let norm = w.q_norm.zip(w.k_norm);
        let (q_out, k_out) =
            if norm.is_some() { (&mut acts.q_raw, &mut acts.k_raw) } else { (&mut acts.q, &mut acts.k) };
        match p {
            Proj::F32 => {
                // The fused projection's row blocks Wq `[QD, C]`, Wk, Wv `[KD, C]`, each
                // product written straight into its own buffer (no fused output to split).
                let (wq, rest) = w.wqkv.split_at(qd * c);
                let (wk, wv) = rest.split_at(kd * c);
                let xn1 = Operand::n(&acts.xn1, c);
                let _t = prof::gemm("f32 base fwd x·Wᵀ (q)", n, qd, c);
                sgemm(par, n, qd, c, xn1, Operand::t(wq, c), q_out, qd, false);
                drop(_t);
                let _t = prof::gemm("f32 base fwd x·Wᵀ (k, v)", n, kd, c);
                sgemm(par, n, kd, c, xn1, Operand::t(wk, c), k_out, kd, false);
                sgemm(par, n, kd, c, xn1, Operand::t(wv, c), &mut acts.v, kd, false);
            }
            Proj::Lowp(lw) => {
                let (wq, rest) = lw.wqkv.split_at(qd * c);
                let (wk, wv) = rest.split_at(kd * c);
                let g = self.lowp_gemm()?;
                let x = &acts.xn1;
                lowp_forward(g, par, q_out, qd, x, wq, n, c, qd);
                lowp_forward(g, par, k_out, kd, x, wk, n, c, kd);
                lowp_forward(g, par, &mut acts.v, kd, x, wv, n, c, kd);
                if let Some(st) = &lw.stacks[0] {
                    let u = &mut acts.lora_u[st.block(n)];
                    adapter_down(par, u, x, st, n, lw.scale);
                    for m in st.iter() {
                        let (y, ld) = match m.slot {
                            0 => (&mut *q_out, qd),
                            1 => (&mut *k_out, kd),
                            _ => (&mut acts.v, kd),
                        };
                        adapter_up(par, y, ld, u, st, &m, n);
                    }
                }
            }
        }
        let _t = prof::op("qkv bias, qk-norm, rope fwd");
        let (q_out, k_out) =
            if norm.is_some() { (&mut acts.q_raw, &mut acts.k_raw) } else { (&mut acts.q, &mut acts.k) };
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
        drop(_t);
        let (attn, probs, hm) = (&mut acts.attn, &mut acts.probs, &mut self.hm_q);
        let _t = prof::op("attention core fwd (QKᵀ, softmax, PV)");
        if matches!(p, Proj::Lowp(lw) if lw.bf16_attention) {
            attention_forward_bf16(attn, probs, hm, &acts.q, &acts.k, &acts.v, self.dims);
        } else {
            attention_forward(par, attn, probs, hm, &acts.q, &acts.k, &acts.v, self.dims);
        }
        drop(_t);
        match p {
            Proj::F32 => {
                let _t = prof::gemm("f32 base fwd x·Wᵀ", n, c, qd);
                matmul_forward(par, o, &acts.attn, w.wo, n, qd, c)
            }
            Proj::Lowp(lw) => {
                lowp_forward(self.lowp_gemm()?, par, o, c, &acts.attn, lw.wo, n, qd, c);
                if let Some(st) = &lw.stacks[1] {
                    let u = &mut acts.lora_u[st.block(n)];
                    adapter_down(par, u, &acts.attn, st, n, lw.scale);
                    st.iter().for_each(|m| adapter_up(par, o, c, u, st, &m, n));
                }
            }
        }
        Ok(())
    }

    fn ffn_forward_with(&mut self, out: &mut [f32], acts: &mut LayerActs, w: &Weights, p: Proj) -> Result<()> {
        let (par, n, c, f) = (self.par, self.n, self.c, self.f);
        match p {
            Proj::F32 => {
                let _t = prof::gemm("f32 base fwd x·Wᵀ", n, 2 * f, c);
                matmul_forward(par, &mut acts.h13, &acts.xn2, w.w13, n, c, 2 * f)
            }
            Proj::Lowp(lw) => {
                lowp_forward(self.lowp_gemm()?, par, &mut acts.h13, 2 * f, &acts.xn2, lw.w13, n, c, 2 * f);
                if let Some(st) = &lw.stacks[2] {
                    let u = &mut acts.lora_u[st.block(n)];
                    adapter_down(par, u, &acts.xn2, st, n, lw.scale);
                    for m in st.iter() {
                        let col = if m.slot == 4 { 0 } else { f };
                        adapter_up(par, &mut acts.h13[col..], 2 * f, u, st, &m, n);
                    }
                }
            }
        }
        {
            let _t = prof::op("swiglu fwd");
            swiglu_forward(&mut acts.gate, &acts.h13, f);
        }
        match p {
            Proj::F32 => {
                let _t = prof::gemm("f32 base fwd x·Wᵀ", n, c, f);
                matmul_forward(par, out, &acts.gate, w.w2, n, f, c)
            }
            Proj::Lowp(lw) => {
                lowp_forward(self.lowp_gemm()?, par, out, c, &acts.gate, lw.w2, n, f, c);
                if let Some(st) = &lw.stacks[3] {
                    let u = &mut acts.lora_u[st.block(n)];
                    adapter_down(par, u, &acts.gate, st, n, lw.scale);
                    st.iter().for_each(|m| adapter_up(par, out, c, u, st, &m, n));
                }
            }
        }
        Ok(())
    }

    fn ffn_backward_dx_with(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        d_out: &[f32],
        acts: &LayerActs,
        w: &Weights,
        p: Proj,
    ) -> Result<()> {
        let (par, n, c, f) = (self.par, self.n, self.c, self.f);
        match p {
            Proj::F32 => {
                let _t = prof::gemm("f32 base dx dy·W", n, f, c);
                matmul_backward_dx(par, &mut g.dgate, d_out, w.w2, n, f, c, false)
            }
            Proj::Lowp(lw) => {
                lowp_dx(self.lowp_gemm()?, par, &mut g.dgate, d_out, c, lw.w2, n, f, c);
                if let Some(st) = &lw.stacks[3] {
                    stack_dx(par, &mut g.dgate, &mut g.lora_v, d_out, c, st, |_| 0, n, lw.scale);
                }
            }
        }
        {
            let _t = prof::op("swiglu bwd");
            swiglu_backward(&mut g.dh13, &g.dgate, &acts.h13, f);
        }
        match p {
            Proj::F32 => {
                let _t = prof::gemm("f32 base dx dy·W", n, c, 2 * f);
                matmul_backward_dx(par, dxn, &g.dh13, w.w13, n, c, 2 * f, false)
            }
            Proj::Lowp(lw) => {
                lowp_dx(self.lowp_gemm()?, par, dxn, &g.dh13, 2 * f, lw.w13, n, c, 2 * f);
                if let Some(st) = &lw.stacks[2] {
                    let col = |slot| if slot == 4 { 0 } else { f };
                    stack_dx(par, dxn, &mut g.lora_v, &g.dh13, 2 * f, st, col, n, lw.scale);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_backward_dx_with(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        norm_grads: QkNormGrads,
        d_o: &[f32],
        acts: &LayerActs,
        w: &Weights,
        p: Proj,
    ) -> Result<()> {
        let (par, n, c) = (self.par, self.n, self.c);
        let AttnDims { t, h, kv, d, .. } = self.dims;
        let (qd, kd) = (h * d, kv * d);
        match p {
            Proj::F32 => {
                let _t = prof::gemm("f32 base dx dy·W", n, qd, c);
                matmul_backward_dx(par, &mut g.dattn, d_o, w.wo, n, qd, c, false)
            }
            Proj::Lowp(lw) => {
                lowp_dx(self.lowp_gemm()?, par, &mut g.dattn, d_o, c, lw.wo, n, qd, c);
                if let Some(st) = &lw.stacks[1] {
                    stack_dx(par, &mut g.dattn, &mut g.lora_v, d_o, c, st, |_| 0, n, lw.scale);
                }
            }
        }
        let scratch = AttnBackwardScratch {
            ds: &mut self.ds,
            dq_hm: &mut self.hm_q,
            dk_hm: &mut self.hm_k,
            dv_hm: &mut self.hm_v,
        };
        let (dq, dk) = (&mut self.dq, &mut self.dk);
        let (dv, d_attn) = (&mut self.dv, &g.dattn);
        let _t = prof::op("attention core bwd");
        let (probs, q, k, v) = (&acts.probs, &acts.q, &acts.k, &acts.v);
        if matches!(p, Proj::Lowp(lw) if lw.bf16_attention) {
            attention_backward_bf16(dq, dk, dv, scratch, d_attn, probs, q, k, v, self.dims);
        } else {
            attention_backward(par, dq, dk, dv, scratch, d_attn, probs, q, k, v, self.dims);
        }
        drop(_t);
        let _t = prof::op("rope, qk-norm, bias bwd");
        rope_backward(dq, &self.rope, n, t, h);
        rope_backward(dk, &self.rope, n, t, kv);
        qkv_backward(&mut g.dqkv, norm_grads, &self.dq, &self.dk, &self.dv, acts, w, n, h, kv, d);
        drop(_t);
        let width = qd + 2 * kd;
        match p {
            Proj::F32 => {
                let _t = prof::gemm("f32 base dx dy·W", n, c, width);
                matmul_backward_dx(par, dxn, &g.dqkv, w.wqkv, n, c, width, false)
            }
            Proj::Lowp(lw) => {
                lowp_dx(self.lowp_gemm()?, par, dxn, &g.dqkv, width, lw.wqkv, n, c, width);
                if let Some(st) = &lw.stacks[0] {
                    let col = |slot| [0, qd, qd + kd][slot];
                    stack_dx(par, dxn, &mut g.lora_v, &g.dqkv, width, st, col, n, lw.scale);
                }
            }
        }
        Ok(())
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
        self.attention_forward_with(o, acts, w, Proj::F32)
    }

    fn ffn_forward(&mut self, out: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()> {
        self.ffn_forward_with(out, acts, w, Proj::F32)
    }

    fn ffn_backward_dx(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        d_out: &[f32],
        acts: &LayerActs,
        w: &Weights,
    ) -> Result<()> {
        self.ffn_backward_dx_with(dxn, g, d_out, acts, w, Proj::F32)
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
        self.attention_backward_dx_with(dxn, g, norm_grads, d_o, acts, w, Proj::F32)
    }

    fn has_lowp(&self) -> bool {
        true
    }

    fn attention_forward_lowp(
        &mut self,
        o: &mut [f32],
        acts: &mut LayerActs,
        w: &Weights,
        lw: &LowpWeights,
    ) -> Result<()> {
        self.attention_forward_with(o, acts, w, Proj::Lowp(lw))
    }

    fn ffn_forward_lowp(&mut self, out: &mut [f32], acts: &mut LayerActs, w: &Weights, lw: &LowpWeights) -> Result<()> {
        self.ffn_forward_with(out, acts, w, Proj::Lowp(lw))
    }

    fn ffn_backward_dx_lowp(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        d_out: &[f32],
        acts: &LayerActs,
        w: &Weights,
        lw: &LowpWeights,
    ) -> Result<()> {
        self.ffn_backward_dx_with(dxn, g, d_out, acts, w, Proj::Lowp(lw))
    }

    fn attention_backward_dx_lowp(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        norm_grads: QkNormGrads,
        d_o: &[f32],
        acts: &LayerActs,
        w: &Weights,
        lw: &LowpWeights,
    ) -> Result<()> {
        self.attention_backward_dx_with(dxn, g, norm_grads, d_o, acts, w, Proj::Lowp(lw))
    }
}
