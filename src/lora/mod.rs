//! LoRA adapters as HF PEFT defines them: a targeted projection `y = x·Wᵀ` becomes
//! `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with A `[r, IC]`, B `[OC, r]` and `s = alpha / r`; W stays frozen.
//! PEFT's initialisation: A kaiming-uniform with a = √5, i.e. U(−1/√IC, 1/√IC) (drawn here
//! from the seeded RNG), B = 0, so training starts from the base model exactly.
//!
//! **How it runs.** Just before a layer's kernels, `merge_layer` writes that layer's weights
//! with every adapter folded in, `W_eff = W + s·B·A`, into one layer-sized scratch (cost
//! 2·OC·IC·r per target, small next to the 2·N·OC·IC of the projection itself for r ≪ N).
//! Forward and dx kernels on every backend are unchanged (weights are kernel inputs), so the
//! MIL kernels take adapters without recompiling. The frozen base gets no gradient: the
//! classifier, norm and base dW GEMMs are skipped and `lora_backward` computes only
//! `dB += s·dyᵀ·(x·Aᵀ)` and `dA += s·(dy·B)ᵀ·x` from the saved activations (low-rank GEMMs).
//!
//! Adapter tensors are named with PEFT's safetensors keys
//! (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`), in one arena whose
//! layout the AdamW moments share.

use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::matmul::{Operand, sgemm};
use crate::params::{ParamLayout, TensorInfo, TensorKind};
use crate::prof;
use crate::rng::Rng;
use anyhow::{Result, bail, ensure};
use std::ops::Range;

pub mod peft;

/// A projection LoRA can adapt (`--lora-targets`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// The short name `--lora-targets` takes.
    pub fn short(self) -> &'static str {
        ["q", "k", "v", "o", "gate", "up", "down"][self as usize]
    }

    /// The HF module name (also PEFT's `target_modules` entry).
    pub fn module(self) -> &'static str {
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"][self as usize]
    }

    /// The module's path inside a decoder layer.
    pub fn path(self) -> String {
        let block = if self <= Target::O { "self_attn" } else { "mlp" };
        format!("{block}.{}", self.module())
    }

    /// (OC, IC) of the projection's weight.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (c, f, q, kv) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim());
        match self {
            Target::Q => (q, c),
            Target::K | Target::V => (kv, c),
            Target::O => (c, q),
            Target::Gate | Target::Up => (f, c),
            Target::Down => (c, f),
        }
    }

    /// A comma-separated list of short (`q`) or module (`q_proj`) names, or `all`.
    pub fn parse_list(spec: &str) -> Result<Vec<Target>> {
        if spec.trim() == "all" {
            return Ok(Target::ALL.to_vec());
        }
        let mut out = Vec::new();
        for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some(t) = Target::ALL.into_iter().find(|t| t.short() == name || t.module() == name) else {
                let valid: Vec<&str> = Target::ALL.iter().map(|t| t.short()).collect();
                bail!("unknown LoRA target '{name}': valid targets are {} (or 'all')", valid.join(", "));
            };
            if !out.contains(&t) {
                out.push(t);
            }
        }
        ensure!(!out.is_empty(), "--lora-targets is empty: name at least one of q, k, v, o, gate, up, down");
        out.sort();
        Ok(out)
    }
}

/// Rank, scaling and targets of a LoRA run.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// s = alpha / r (PEFT without rsLoRA).
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        ensure!(self.rank > 0, "--lora-rank must be at least 1");
        ensure!(self.alpha.is_finite() && self.alpha > 0.0, "--lora-alpha must be a positive number");
        for &t in &self.targets {
            let (oc, ic) = t.dims(cfg);
            ensure!(
                self.rank <= oc.min(ic),
                "--lora-rank {} exceeds the {} projection's smaller side ({})",
                self.rank,
                t.module(),
                oc.min(ic)
            );
        }
        Ok(())
    }
}

impl LoraConfig {
    /// Adapter parameters over all layers: Σ over targets of r·(IC + OC), per layer.
    pub fn adapter_count(&self, cfg: &ModelConfig) -> usize {
        let per_layer: usize = self.targets.iter().map(|t| t.dims(cfg)).map(|(oc, ic)| self.rank * (oc + ic)).sum();
        per_layer * cfg.n_layers
    }
}

/// Adds a LoRA run's own memory to `est` (which already counts activations and scratch):
/// the frozen base (f32, or with `base_bf16` its layers at 2 bytes), the adapters with
/// gradients and AdamW moments (4 arenas), and the merge scratch (one layer's weights, s·B,
/// two `[N, r]`).
pub fn memory_estimate(
    cfg: &ModelConfig,
    lora: &LoraConfig,
    n: usize,
    base_bf16: bool,
    est: &mut crate::memory::Estimate,
) {
    use crate::memory::{bytes, f32_bytes};
    let max_oc = lora.targets.iter().map(|t| t.dims(cfg).0).max().unwrap_or(0);
    let base = ParamLayout::new(cfg);
    let layer = (0..cfg.n_layers).map(|l| base.layer_range(l).len()).max().unwrap_or(0);
    let layers = base.layer_span().len();
    let frozen = if base_bf16 {
        f32_bytes(&[cfg.param_count() - layers]) + bytes(2, &[layers])
    } else {
        f32_bytes(&[cfg.param_count()])
    };
    est.add(if base_bf16 { "frozen weights (layers in bf16)" } else { "frozen weights" }, frozen)
        .add("LoRA adapters, gradients and AdamW state", f32_bytes(&[4, lora.adapter_count(cfg)]))
        .add("LoRA merge scratch", f32_bytes(&[layer + max_oc * lora.rank + 2 * n * lora.rank]));
}

/// One adapted projection of one layer.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub layer: usize,
    pub target: Target,
    /// `[r, IC]` range in the adapter arena
    pub a: Range<usize>,
    /// `[OC, r]` range in the adapter arena
    pub b: Range<usize>,
    /// (OC, IC)
    pub oc: usize,
    pub ic: usize,
    /// Where the projection's `[OC, IC]` rows start inside its layer's range of the base arena.
    pub w_offset: usize,
}

/// The adapter arena: per layer, per target in `Target` order, A then B.
#[derive(Clone, Debug)]
pub struct LoraLayout {
    pub cfg: LoraConfig,
    pub tensors: Vec<TensorInfo>,
    pub adapters: Vec<Adapter>,
    pub total: usize,
}

/// PEFT's key prefix for a layer's module.
pub fn peft_key(layer: usize, target: Target, which: char) -> String {
    format!("base_model.model.model.layers.{layer}.{}.lora_{which}.weight", target.path())
}

impl LoraLayout {
    pub fn new(model: &ModelConfig, base: &ParamLayout, lora: &LoraConfig) -> Result<Self> {
        lora.validate(model)?;
        let r = lora.rank;
        let (mut tensors, mut adapters, mut offset) = (Vec::new(), Vec::new(), 0);
        for l in 0..model.n_layers {
            let layer_start = base.layer_range(l).start;
            for &target in &lora.targets {
                let (oc, ic) = target.dims(model);
                let a = offset..offset + r * ic;
                let b = a.end..a.end + oc * r;
                offset = b.end;
                tensors.push(TensorInfo {
                    name: peft_key(l, target, 'A'),
                    shape: vec![r, ic],
                    offset: a.start,
                    kind: TensorKind::Matrix,
                });
                tensors.push(TensorInfo {
                    name: peft_key(l, target, 'B'),
                    shape: vec![oc, r],
                    offset: b.start,
                    kind: TensorKind::Matrix,
                });
                let w_name = format!("model.layers.{l}.{}.weight", target.path());
                let w = base.find(&w_name).expect("every target exists in a decoder layer");
                adapters.push(Adapter { layer: l, target, a, b, oc, ic, w_offset: w.offset - layer_start });
            }
        }
        Ok(LoraLayout { cfg: lora.clone(), tensors, adapters, total: offset })
    }

    /// PEFT's init: A ~ U(−1/√IC, 1/√IC) (kaiming-uniform, a = √5), B = 0. Each A draws from
    /// its own stream of `seed`.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut buf = vec![0.0f32; self.total];
        for (i, ad) in self.adapters.iter().enumerate() {
            let bound = 1.0 / (ad.ic as f64).sqrt();
            let mut rng = Rng::derive(seed ^ 0x4c6f_5241, i as u64 + 1);
            for x in &mut buf[ad.a.clone()] {
                *x = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            }
        }
        buf
    }

    /// The adapters of layer `l`.
    pub fn layer(&self, l: usize) -> &[Adapter] {
        let per = self.cfg.targets.len();
        &self.adapters[l * per..(l + 1) * per]
    }

    pub fn find(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Adds `s·B·A` to every targeted projection of the whole base arena `params` (for
    /// `convert --merge-lora` and generation).
    pub fn merge_into(&self, par: Par, base: &ParamLayout, params: &mut [f32], adapters: &[f32]) {
        let mut sb = Vec::new();
        for l in 0..base.n_layers() {
            let range = base.layer_range(l);
            merge_adapters(par, self.layer(l), self.cfg.scale(), &mut params[range], adapters, &mut sb);
        }
    }
}

/// `layer_w` (one layer's range of the base arena) `+= s·B·A` for each adapter of that layer.
/// `sb` is scratch for s·B (grown once to the largest OC·r).
pub fn merge_adapters(par: Par, layer: &[Adapter], s: f32, layer_w: &mut [f32], adapters: &[f32], sb: &mut Vec<f32>) {
    for ad in layer {
        let r = ad.a.len() / ad.ic;
        sb.clear();
        sb.extend(adapters[ad.b.clone()].iter().map(|&x| s * x));
        let w = &mut layer_w[ad.w_offset..ad.w_offset + ad.oc * ad.ic];
        sgemm(par, ad.oc, ad.ic, r, Operand::n(sb, r), Operand::n(&adapters[ad.a.clone()], ad.ic), w, ad.ic, true);
    }
}

/// Scratch of the adapter backward, `[N, r]` each.
pub struct LoraScratch {
    pub u: Vec<f32>,
    pub v: Vec<f32>,
}

/// Gradients of one adapter of `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, accumulated:
/// `u = x·Aᵀ`, `dB [OC, r] += s·dyᵀ·u`, `dA [r, IC] += s·(dy·B)ᵀ·x`.
/// `dy` is `[N, OC]` with row stride `ld_dy` (a column block of a stacked projection's
/// gradient), x `[N, IC]`, a `[r, IC]`, b `[OC, r]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    par: Par,
    da: &mut [f32],
    db: &mut [f32],
    scratch: &mut LoraScratch,
    dy: &[f32],
    ld_dy: usize,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    ad: &Adapter,
    s: f32,
) {
    let (oc, ic) = (ad.oc, ad.ic);
    let r = a.len() / ic;
    let (u, v) = (&mut scratch.u[..n * r], &mut scratch.v[..n * r]);
    let t = prof::gemm("lora bwd u = x·Aᵀ", n, r, ic);
    sgemm(par, n, r, ic, Operand::n(x, ic), Operand::t(a, ic), u, r, false);
    u.iter_mut().for_each(|x| *x *= s);
    drop(t);
    let t = prof::gemm("lora bwd dB += dyᵀ·u", oc, r, n);
    sgemm(par, oc, r, n, Operand::t(dy, ld_dy), Operand::n(u, r), db, r, true);
    drop(t);
    let t = prof::gemm("lora bwd v = dy·B", n, r, oc);
    sgemm(par, n, r, oc, Operand::n(dy, ld_dy), Operand::n(b, r), v, r, false);
    v.iter_mut().for_each(|x| *x *= s);
    drop(t);
    let _t = prof::gemm("lora bwd dA += vᵀ·x", r, ic, n);
    sgemm(par, r, ic, n, Operand::t(v, r), Operand::n(x, ic), da, ic, true);
}
