//! The kernel boundary: a backend implements the per-layer kernel set and nothing else. The
//! model orchestration (`crate::model`) does the CPU glue between kernels — RMSNorm of the
//! residual stream, residual adds, the classifier and loss — and every weight-gradient (dW)
//! GEMM, so that on accelerator backends the dW work can overlap the next kernel. The trainer,
//! optimizer, data and telemetry never see which backend runs.
//!
//! Kernel names say what they compute; the original Objective-C system's kernels map onto
//! them as: sdpaFwd + woFwd → `attention_forward`; ffnFused → `ffn_forward`;
//! ffnBwdW2t + ffnBwdW13t → `ffn_backward_dx`; wotBwd + sdpaBwd1 + sdpaBwd2 + qBwd + kvBwd →
//! `attention_backward_dx`.

pub mod cpu;
pub mod qkv;

use crate::config::ModelConfig;
use crate::lora::apply::Stack;
use crate::params::LayerTensors;
use anyhow::Result;

/// Activations one layer saves in its forward pass for its backward pass. Sized once from the
/// config and batch shape; N = B·T rows. Backends write them in the layout documented here.
#[derive(Debug, Default)]
pub struct LayerActs {
    /// `[N, C]` residual stream entering the layer
    pub x_in: Vec<f32>,
    /// `[N]` 1/rms of x_in
    pub rstd1: Vec<f32>,
    /// `[N, C]` RMSNorm(x_in) ⊙ attn_norm: the attention input
    pub xn1: Vec<f32>,
    /// `[N, H·D]` q projection before QK-norm (QK-norm models only, else empty)
    pub q_raw: Vec<f32>,
    /// `[N, KV·D]` k projection before QK-norm (QK-norm models only, else empty)
    pub k_raw: Vec<f32>,
    /// `[N·H]` 1/rms of each q head (QK-norm only)
    pub q_rstd: Vec<f32>,
    /// `[N·KV]` 1/rms of each k head (QK-norm only)
    pub k_rstd: Vec<f32>,
    /// `[N, H·D]` queries after QK-norm and RoPE
    pub q: Vec<f32>,
    /// `[N, KV·D]` keys after QK-norm and RoPE
    pub k: Vec<f32>,
    /// `[N, KV·D]` values
    pub v: Vec<f32>,
    /// `[B, H, T, T]` softmax probabilities (zero above the diagonal); written by the `cpu`
    /// backend only (the MIL kernels recompute them in the backward)
    pub probs: Vec<f32>,
    /// `[N, H·D]` attention output before the output projection
    pub attn: Vec<f32>,
    /// `[N, C]` residual stream after attention: x_in + attn·Woᵀ
    pub x_mid: Vec<f32>,
    /// `[N]` 1/rms of x_mid
    pub rstd2: Vec<f32>,
    /// `[N, C]` RMSNorm(x_mid) ⊙ ffn_norm: the FFN input
    pub xn2: Vec<f32>,
    /// `[N, 2·F]` xn2·[W1; W3]ᵀ: per row, gate_proj output h1 then up_proj output h3
    pub h13: Vec<f32>,
    /// `[N, F]` silu(h1) ⊙ h3 (input of W2)
    pub gate: Vec<f32>,
    /// LoRA with `--bf16-matmul` only (else empty): u = s·x·Aᵀ of every adapter, `[N, R]`
    /// per stack, stacks in order (`crate::lora::apply::Stack::block`)
    pub lora_u: Vec<f32>,
}

impl LayerActs {
    /// Zeroed buffers for one layer at micro-batch shape (B, T); `probs` stays empty unless
    /// `keep_probs` (see `Backend::keeps_probs`). Allocated fallibly: callers estimate the
    /// total first (`crate::memory`), but a limit that shrinks after the estimate still gets
    /// an error rather than an abort.
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, keep_probs: bool) -> Result<Self> {
        let n = b * t;
        let (c, f, qd, kd) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim());
        let qk = usize::from(cfg.qk_norm);
        let z = |len: usize| crate::memory::try_vec_f32(len, "a layer's saved activations");
        Ok(LayerActs {
            x_in: z(n * c)?,
            rstd1: z(n)?,
            xn1: z(n * c)?,
            q_raw: z(qk * n * qd)?,
            k_raw: z(qk * n * kd)?,
            q_rstd: z(qk * n * cfg.n_heads)?,
            k_rstd: z(qk * n * cfg.n_kv_heads)?,
            q: z(n * qd)?,
            k: z(n * kd)?,
            v: z(n * kd)?,
            probs: z(usize::from(keep_probs) * b * cfg.n_heads * t * t)?,
            attn: z(n * qd)?,
            x_mid: z(n * c)?,
            rstd2: z(n)?,
            xn2: z(n * c)?,
            h13: z(n * 2 * f)?,
            gate: z(n * f)?,
            lora_u: Vec::new(),
        })
    }
}

impl LayerGrads {
    pub fn new(cfg: &ModelConfig, b: usize, t: usize) -> Result<Self> {
        let n = b * t;
        let (f, qd, kd) = (cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim());
        let z = |len: usize| crate::memory::try_vec_f32(len, "the layer gradient buffers");
        Ok(LayerGrads {
            dattn: z(n * qd)?,
            dqkv: z(n * (qd + 2 * kd))?,
            dgate: z(n * f)?,
            dh13: z(n * 2 * f)?,
            lora_v: Vec::new(),
        })
    }
}

/// Gradients of one layer's intermediate tensors that the dx kernels produce and the dW GEMMs
/// consume. One set, reused by every layer.
#[derive(Debug, Default)]
pub struct LayerGrads {
    /// `[N, H·D]` ∂/∂attn (= d_o · Wo), for dWo
    pub dattn: Vec<f32>,
    /// `[N, (H + 2·KV)·D]` ∂/∂(q|k|v projection outputs), before QK-norm, for dWqkv
    pub dqkv: Vec<f32>,
    /// `[N, F]` ∂/∂gate (= d_out · W2)
    pub dgate: Vec<f32>,
    /// `[N, 2·F]` ∂/∂h13, for dW13
    pub dh13: Vec<f32>,
    /// LoRA with `--bf16-matmul` only (else empty): v = s·dy·B of the current layer's
    /// adapters, laid out like `LayerActs::lora_u`
    pub lora_v: Vec<f32>,
}

/// Weight-gradient slices that live inside attention kernels (QK-norm gains).
pub struct QkNormGrads<'a> {
    pub q_norm: Option<&'a mut [f32]>,
    pub k_norm: Option<&'a mut [f32]>,
}

pub type Weights<'a> = LayerTensors<&'a [f32]>;

/// A layer's projections for LoRA over a bf16 base with bf16 GEMMs (`train --bf16-matmul`):
/// the frozen matrices as bf16 bits, stacked as in the arena (`LayerTensors`), and the
/// adapters, which are applied beside the base GEMM (`y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `dx = dy·W +
/// s·(dy·B)·A`, through `crate::lora::apply`) instead of being merged into it. The `Weights`
/// passed with it supply the (widened) norm gains and biases; its matrices are empty.
/// The forward saves u = s·x·Aᵀ in `LayerActs::lora_u` and the input gradient leaves
/// v = s·dy·B in `LayerGrads::lora_v`, for the adapter backward.
#[derive(Clone, Copy)]
pub struct LowpWeights<'a> {
    /// `[(H + 2·KV)·D, C]`
    pub wqkv: &'a [u16],
    /// `[C, H·D]`
    pub wo: &'a [u16],
    /// `[2·F, C]`
    pub w13: &'a [u16],
    /// `[C, F]`
    pub w2: &'a [u16],
    /// The adapters by input (`crate::lora::apply::GROUPS`: q k v, o, gate up, down); `None`:
    /// none of that group adapted.
    pub stacks: [Option<Stack<'a>>; 4],
    /// alpha / r
    pub scale: f32,
    /// Run the attention core's products on bf16 as well (`--bf16-attention`).
    pub bf16_attention: bool,
}

/// The per-layer kernel set. Every method sees one layer; weights are inputs on every call
/// (a compiled kernel serves all layers and all steps). Shapes (B, T) are fixed when the
/// backend is constructed.
pub trait Backend: Send {
    fn name(&self) -> &'static str;

    /// The micro-batch shape (B, T) the kernels were built for.
    fn shape(&self) -> (usize, usize);

    /// Whether the model should run the dW GEMMs on a CPU worker while this backend
    /// evaluates the next kernels: worthwhile only when the kernels run elsewhere (an
    /// accelerator); the `cpu` backend would compete with itself for the same cores.
    fn overlaps_dw(&self) -> bool {
        false
    }

    /// Whether `attention_forward` saves the attention probabilities in `LayerActs::probs`
    /// (`[B, H, T, T]`, the largest activation at long T); a backend that recomputes them in
    /// its backward says false and the buffer is never allocated.
    fn keeps_probs(&self) -> bool {
        true
    }

    /// `Some(v)`: the weights passed to the kernels stay the same while `v` does, so a
    /// backend may keep them staged per layer between calls; `None` (the initial state): no
    /// such promise, stage them on every call.
    fn set_weights_version(&mut self, _version: Option<u64>) {}

    /// Update `update` (0-based, counted over the whole run) is about to start. Backends that
    /// compile weights into their kernels (static mode) decide from it when to recompile.
    fn begin_update(&mut self, _update: usize) {}

    /// Kernel compiles that running update `update` would make beyond those made so far.
    fn compiles_needed(&self, _update: usize) -> usize {
        0
    }

    /// Kernels this backend's runner has compiled in this process (the Neural Engine fails
    /// past about 119 per process).
    fn compiles(&self) -> usize {
        0
    }

    /// The classifier, if this backend runs it: `logits [N, V] = xf [N, C] · Eᵀ` for `e`
    /// `[V, C]`; returns false (the default) to leave it to the model's f32 GEMM. Its
    /// backward (dxf and dE) always stays on the CPU with the dW GEMMs.
    fn classifier_forward(&mut self, _logits: &mut [f32], _xf: &[f32], _e: &[f32]) -> Result<bool> {
        Ok(false)
    }

    /// Reads `acts.xn1`; writes q, k, v (and the QK-norm taps), attn (and, if it keeps
    /// them, probs) into `acts`,
    /// and `o` `[N, C]` = attn · Woᵀ.
    fn attention_forward(&mut self, o: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()>;

    /// Reads `acts.xn2`; writes h13, gate into `acts` and `out` `[N, C]` = gate · W2ᵀ.
    fn ffn_forward(&mut self, out: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()>;

    /// From `d_out` `[N, C]` (gradient of the FFN output): fills `g.dgate`, `g.dh13`
    /// and overwrites `dxn` `[N, C]` with the gradient of the FFN input xn2.
    fn ffn_backward_dx(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        d_out: &[f32],
        acts: &LayerActs,
        w: &Weights,
    ) -> Result<()>;

    /// From `d_o` `[N, C]` (gradient of the attention block output): fills `g.dattn` and
    /// `g.dqkv`, accumulates the QK-norm gain gradients, and overwrites `dxn` `[N, C]`
    /// with the gradient of the attention input xn1.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_dx(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        norm_grads: QkNormGrads,
        d_o: &[f32],
        acts: &LayerActs,
        w: &Weights,
    ) -> Result<()>;

    /// Whether the `*_lowp` kernels (bf16 GEMMs over `LowpWeights`) run on this backend.
    fn has_lowp(&self) -> bool {
        false
    }

    /// `attention_forward` with the projections of `lw` (bf16 base plus adapters).
    fn attention_forward_lowp(
        &mut self,
        _o: &mut [f32],
        _acts: &mut LayerActs,
        _w: &Weights,
        _lw: &LowpWeights,
    ) -> Result<()> {
        anyhow::bail!("the {} backend has no bf16 GEMMs (--bf16-matmul runs on the cpu backend)", self.name())
    }

    /// `ffn_forward` with the projections of `lw`.
    fn ffn_forward_lowp(
        &mut self,
        _out: &mut [f32],
        _acts: &mut LayerActs,
        _w: &Weights,
        _lw: &LowpWeights,
    ) -> Result<()> {
        anyhow::bail!("the {} backend has no bf16 GEMMs (--bf16-matmul runs on the cpu backend)", self.name())
    }

    /// `ffn_backward_dx` with the projections of `lw`.
    #[allow(clippy::too_many_arguments)]
    fn ffn_backward_dx_lowp(
        &mut self,
        _dxn: &mut [f32],
        _g: &mut LayerGrads,
        _d_out: &[f32],
        _acts: &LayerActs,
        _w: &Weights,
        _lw: &LowpWeights,
    ) -> Result<()> {
        anyhow::bail!("the {} backend has no bf16 GEMMs (--bf16-matmul runs on the cpu backend)", self.name())
    }

    /// `attention_backward_dx` with the projections of `lw`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_dx_lowp(
        &mut self,
        _dxn: &mut [f32],
        _g: &mut LayerGrads,
        _norm_grads: QkNormGrads,
        _d_o: &[f32],
        _acts: &LayerActs,
        _w: &Weights,
        _lw: &LowpWeights,
    ) -> Result<()> {
        anyhow::bail!("the {} backend has no bf16 GEMMs (--bf16-matmul runs on the cpu backend)", self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shape whose activations cannot exist (2⁴⁰ rows of stories260K: petabytes) is an
    /// error, not the allocator's abort that `vec![0.0; n]` gave.
    #[test]
    fn impossible_activations_are_an_error() {
        let cfg = ModelConfig::preset("stories260k").unwrap();
        let t = 1usize << 40;
        let err = LayerActs::new(&cfg, 1, t, false).unwrap_err().to_string();
        assert!(err.contains("saved activations"), "{err}");
        let err = LayerGrads::new(&cfg, 1, t).unwrap_err().to_string();
        assert!(err.contains("layer gradient"), "{err}");
    }
}
