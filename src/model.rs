//! Layer orchestration over a backend: the forward pass, the loss, and the backward pass with
//! every weight-gradient GEMM. Pre-norm decoder:
//! `x += Attn(RMSNorm(x))`, `x += FFN(RMSNorm(x))`, final RMSNorm, classifier, cross-entropy.
//!
//! All buffers are allocated in `Model::new` from the config and the micro-batch shape
//! (B, T); `forward` and `forward_backward` allocate nothing.

use crate::backend::{Backend, LayerActs, LayerGrads, QkNormGrads};
use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::cross_entropy::{cross_entropy_forward, cross_entropy_fused, loss_sum};
use crate::ops::embedding::{embedding_backward, embedding_forward};
use crate::ops::matmul::{matmul_backward_dw, matmul_backward_dx, matmul_forward};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::params::ParamLayout;
use anyhow::{Result, bail, ensure};
use std::time::Instant;

/// Loss of one micro-batch: the sum over counted targets and their number.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub count: usize,
}

impl LossSum {
    pub fn mean(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum / self.count as f64 }
    }
}

/// Wall time of the last call, per phase, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    pub forward_ms: f64,
    pub backward_ms: f64,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    /// Micro-batch shape: B sequences of T positions.
    pub b: usize,
    pub t: usize,
    par: Par,
    backend: Box<dyn Backend>,
    acts: Vec<LayerActs>,
    /// `[N, C]` residual stream after the last layer
    x_final: Vec<f32>,
    /// `[N]`
    rstd_final: Vec<f32>,
    /// `[N, C]` final-normed stream: classifier input
    xf: Vec<f32>,
    /// `[N, V]` logits; overwritten by dlogits in backward
    logits: Vec<f32>,
    /// `[N]` per-position loss
    losses: Vec<f32>,
    /// `[N, C]` gradient of the residual stream
    dx: Vec<f32>,
    /// `[N, C]` gradient of a norm's output (kernel input); also forward scratch
    dxn: Vec<f32>,
    grads: LayerGrads,
    pub times: PhaseTimes,
}

impl Model {
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, par: Par, backend: Box<dyn Backend>) -> Result<Self> {
        cfg.validate()?;
        ensure!(b > 0, "--batch must be at least 1");
        ensure!(t > 0, "--seq must be at least 1");
        if t > cfg.max_seq_len {
            bail!("--seq {t} exceeds the model's max_position_embeddings ({})", cfg.max_seq_len);
        }
        ensure!(
            backend.shape() == (b, t),
            "the {} backend was built for B={}, T={}, the model for B={b}, T={t}",
            backend.name(),
            backend.shape().0,
            backend.shape().1
        );
        let n = b * t;
        let (c, f, qd, kd) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim());
        let qk = usize::from(cfg.qk_norm);
        let z = |len: usize| vec![0.0f32; len];
        let acts = (0..cfg.n_layers)
            .map(|_| LayerActs {
                x_in: z(n * c),
                rstd1: z(n),
                xn1: z(n * c),
                q_raw: z(qk * n * qd),
                k_raw: z(qk * n * kd),
                q_rstd: z(qk * n * cfg.n_heads),
                k_rstd: z(qk * n * cfg.n_kv_heads),
                q: z(n * qd),
                k: z(n * kd),
                v: z(n * kd),
                probs: z(b * cfg.n_heads * t * t),
                attn: z(n * qd),
                x_mid: z(n * c),
                rstd2: z(n),
                xn2: z(n * c),
                h13: z(n * 2 * f),
                gate: z(n * f),
            })
            .collect();
        let grads = LayerGrads { dattn: z(n * qd), dqkv: z(n * (qd + 2 * kd)), dgate: z(n * f), dh13: z(n * 2 * f) };
        Ok(Model {
            cfg: cfg.clone(),
            layout: ParamLayout::new(cfg),
            b,
            t,
            par,
            backend,
            acts,
            x_final: z(n * c),
            rstd_final: z(n),
            xf: z(n * c),
            logits: z(n * cfg.vocab_size),
            losses: z(n),
            dx: z(n * c),
            dxn: z(n * c),
            grads,
            times: PhaseTimes::default(),
        })
    }

    /// A model on the `cpu` backend.
    pub fn cpu(cfg: &ModelConfig, b: usize, t: usize, par: Par) -> Result<Self> {
        Self::new(cfg, b, t, par, Box::new(crate::backend::cpu::CpuBackend::new(cfg, b, t, par)))
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Rows per micro-batch (B·T).
    pub fn n(&self) -> usize {
        self.b * self.t
    }

    /// Layer `l`'s keys and values `[N, KV·D]` (after QK-norm and RoPE) from the last forward:
    /// what a KV cache holds after prefilling these positions.
    pub fn kv(&self, l: usize) -> (&[f32], &[f32]) {
        (&self.acts[l].k, &self.acts[l].v)
    }

    /// `[N, V]` logits of the last `forward` (not valid after `forward_backward`).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn check_batch(&self, params: &[f32], tokens: &[u32], targets: &[u32]) -> Result<()> {
        let n = self.n();
        ensure!(
            params.len() == self.layout.total,
            "parameter arena has {} values, model needs {}",
            params.len(),
            self.layout.total
        );
        ensure!(tokens.len() == n && targets.len() == n, "micro-batch must hold B·T = {n} tokens and targets");
        Ok(())
    }

    /// Forward pass through the classifier; leaves logits in place. Returns the raw loss.
    pub fn forward(&mut self, params: &[f32], tokens: &[u32], targets: &[u32]) -> Result<LossSum> {
        self.check_batch(params, tokens, targets)?;
        let start = Instant::now();
        self.forward_to_logits(params, tokens)?;
        cross_entropy_forward(&mut self.losses, &self.logits, targets, self.cfg.vocab_size);
        let (sum, count) = loss_sum(&self.losses, targets);
        self.times.forward_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok(LossSum { sum, count })
    }

    fn forward_to_logits(&mut self, params: &[f32], tokens: &[u32]) -> Result<()> {
        let (par, n, c, v) = (self.par, self.n(), self.cfg.dim, self.cfg.vocab_size);
        let eps = self.cfg.norm_eps as f32;
        let layout = &self.layout;
        embedding_forward(&mut self.acts[0].x_in, tokens, layout.view(params, layout.embed), c);
        for l in 0..self.cfg.n_layers {
            let w = layout.layer(params, l);
            let (this, rest) = self.acts[l..].split_first_mut().expect("layer exists");
            let x_out = match rest.first_mut() {
                Some(next) => &mut next.x_in,
                None => &mut self.x_final,
            };
            let scratch = &mut self.dxn; // `[N, C]` block output before the residual add
            rmsnorm_forward(&mut this.xn1, &mut this.rstd1, &this.x_in, w.attn_norm, n, c, eps);
            self.backend.attention_forward(scratch, this, &w)?;
            add(&mut this.x_mid, &this.x_in, scratch);
            rmsnorm_forward(&mut this.xn2, &mut this.rstd2, &this.x_mid, w.ffn_norm, n, c, eps);
            self.backend.ffn_forward(scratch, this, &w)?;
            add(x_out, &this.x_mid, scratch);
        }
        let final_norm = layout.view(params, layout.final_norm);
        rmsnorm_forward(&mut self.xf, &mut self.rstd_final, &self.x_final, final_norm, n, c, eps);
        matmul_forward(par, &mut self.logits, &self.xf, layout.view(params, layout.classifier()), n, c, v);
        Ok(())
    }

    /// Forward and backward of one micro-batch. Gradients of `loss_scale · mean_loss /
    /// accum` are **added** to `grads` (same layout as `params`), so that `accum`
    /// micro-batches sum to the scaled gradient of their average loss.
    pub fn forward_backward(
        &mut self,
        params: &[f32],
        grads: &mut [f32],
        tokens: &[u32],
        targets: &[u32],
        loss_scale: f32,
        accum: usize,
    ) -> Result<LossSum> {
        self.check_batch(params, tokens, targets)?;
        ensure!(grads.len() == params.len(), "gradient arena does not match the parameters");
        let start = Instant::now();
        self.forward_to_logits(params, tokens)?;
        let (par, n, c, v) = (self.par, self.n(), self.cfg.dim, self.cfg.vocab_size);
        let count = targets.iter().filter(|&&t| t != crate::ops::cross_entropy::IGNORE).count();
        let dscale = loss_scale / (count.max(1) * accum.max(1)) as f32;
        cross_entropy_fused(&mut self.losses, &mut self.logits, targets, v, dscale);
        let (sum, count) = loss_sum(&self.losses, targets);
        let mid = Instant::now();
        self.times.forward_ms = (mid - start).as_secs_f64() * 1e3;

        let layout = &self.layout;
        let dlogits = &self.logits;
        // Classifier: dxf = dlogits · E, dE += dlogitsᵀ · xf.
        matmul_backward_dx(par, &mut self.dxn, dlogits, layout.view(params, layout.classifier()), n, c, v, false);
        matmul_backward_dw(par, layout.view_mut(grads, layout.classifier()), dlogits, &self.xf, n, c, v);
        let (final_norm, d_final_norm) = (layout.view(params, layout.final_norm), layout.final_norm);
        rmsnorm_backward(
            &mut self.dx,
            layout.view_mut(grads, d_final_norm),
            &self.dxn,
            &self.rstd_final,
            &self.x_final,
            final_norm,
            n,
            c,
            false,
        );

        let (f, qd, kd) = (self.cfg.ffn_dim, self.cfg.q_dim(), self.cfg.kv_dim());
        for l in (0..self.cfg.n_layers).rev() {
            let w = layout.layer(params, l);
            let gw = layout.layer_mut(grads, l);
            let acts = &self.acts[l];
            let g = &mut self.grads;
            // FFN block: its output gradient is the residual gradient dx.
            self.backend.ffn_backward_dx(&mut self.dxn, g, &self.dx, acts, &w)?;
            matmul_backward_dw(par, gw.w2, &self.dx, &acts.gate, n, f, c);
            matmul_backward_dw(par, gw.w13, &g.dh13, &acts.xn2, n, c, 2 * f);
            rmsnorm_backward(&mut self.dx, gw.ffn_norm, &self.dxn, &acts.rstd2, &acts.x_mid, w.ffn_norm, n, c, true);
            // Attention block.
            let norm_grads = QkNormGrads { q_norm: gw.q_norm, k_norm: gw.k_norm };
            self.backend.attention_backward_dx(&mut self.dxn, g, norm_grads, &self.dx, acts, &w)?;
            matmul_backward_dw(par, gw.wo, &self.dx, &acts.attn, n, qd, c);
            matmul_backward_dw(par, gw.wqkv, &g.dqkv, &acts.xn1, n, c, qd + 2 * kd);
            rmsnorm_backward(&mut self.dx, gw.attn_norm, &self.dxn, &acts.rstd1, &acts.x_in, w.attn_norm, n, c, true);
        }
        embedding_backward(layout.view_mut(grads, layout.embed), &self.dx, tokens, c);
        self.times.backward_ms = mid.elapsed().as_secs_f64() * 1e3;
        Ok(LossSum { sum, count })
    }
}

/// out = a + b, elementwise.
fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}
