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
//! classifier, norm and base dW GEMMs are skipped and the adapter backward (`apply`) computes
//! only `dB += s·dyᵀ·(x·Aᵀ)` and `dA += s·(dy·B)ᵀ·x` from the saved activations (low-rank
//! GEMMs, the adapters that share an input stacked). With `--bf16-matmul` the adapters are
//! applied beside the bf16 GEMMs instead of merged (`apply`).
//!
//! Adapter tensors are named with PEFT's safetensors keys
//! (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`), in one arena whose
//! layout the AdamW moments share.

use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::matmul::{Operand, sgemm};
use crate::params::{ParamLayout, TensorInfo, TensorKind};
use crate::rng::Rng;
use anyhow::{Result, bail, ensure};
use rayon::prelude::*;
use std::ops::Range;

pub mod apply;
pub mod peft;

use apply::{GROUPS, Member, Stack};

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
/// the stacked A's, u and v `[N, R]` with R = r · targets, dA `[3r, IC]`); with `--bf16-matmul`
/// also each layer's saved u and one v (`[N, R]` each), always counted (an upper bound: the
/// estimate is made before `--bf16-matmul` is known to be available).
pub fn memory_estimate(
    cfg: &ModelConfig,
    lora: &LoraConfig,
    n: usize,
    base_bf16: bool,
    est: &mut crate::memory::Estimate,
) {
    use crate::memory::{bytes, f32_bytes};
    let max_oc = lora.targets.iter().map(|t| t.dims(cfg).0).max().unwrap_or(0);
    let max_ic = lora.targets.iter().map(|t| t.dims(cfg).1).max().unwrap_or(0);
    let a_stack: usize = lora.targets.iter().map(|t| lora.rank * t.dims(cfg).1).sum();
    let (rows, da) = (lora.rank * lora.targets.len(), 3 * lora.rank * max_ic);
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
        .add("LoRA merge scratch", f32_bytes(&[layer + max_oc * lora.rank + a_stack + 2 * n * rows + da]))
        .add("LoRA saved u, v (--bf16-matmul)", f32_bytes(&[(cfg.n_layers + 1) * n * rows]));
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

    /// Values of layer `l`'s stacked A's (`layer_stacks`).
    pub fn stack_len(&self, l: usize) -> usize {
        self.layer(l).iter().map(|ad| ad.a.len()).sum()
    }

    /// Stacked A rows of a layer (r · targets): the width of its u and v stores.
    pub fn stacked_rows(&self) -> usize {
        self.cfg.rank * self.cfg.targets.len()
    }

    /// Layer `l`'s adapters as stacks by input (`apply::GROUPS`), their A's copied in slot
    /// order into `a_stack` (`stack_len(l)` values; the caller sizes it once).
    pub fn layer_stacks<'a>(&self, a_stack: &'a mut [f32], adapters: &'a [f32], l: usize) -> [Option<Stack<'a>>; 4] {
        let r = self.cfg.rank;
        let mut at = 0;
        for ad in self.layer(l) {
            a_stack[at..at + ad.a.len()].copy_from_slice(&adapters[ad.a.clone()]);
            at += ad.a.len();
        }
        let a_all: &'a [f32] = a_stack;
        let mut stacks = [None; 4];
        let (mut row, mut at) = (0, 0);
        for (g, slots) in GROUPS.iter().enumerate() {
            let mut members = [None; 3];
            let mut count = 0;
            let mut ic = 0;
            for ad in self.layer(l).iter().filter(|ad| slots.contains(&(ad.target as usize))) {
                members[count] =
                    Some(Member { slot: ad.target as usize, b: &adapters[ad.b.clone()], oc: ad.oc, col: count * r });
                count += 1;
                ic = ad.ic;
            }
            if count == 0 {
                continue;
            }
            let rows = count * r;
            stacks[g] = Some(Stack { a: &a_all[at..at + rows * ic], ic, r, rows, first: row, members });
            (row, at) = (row + rows, at + rows * ic);
        }
        stacks
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
            // In place: the base values are already where the merge writes.
            merge_layer_from(par, self.layer(l), self.cfg.scale(), &mut params[range], |_, _| {}, adapters, &mut sb);
        }
    }
}

/// Rows of a targeted matrix per block of `merge_layer_from`: a block of the widest SmolLM2 /
/// Stories110M input (IC = 1,536–3,072) still sits in a 1 MB L2 while it gets its update.
const MERGE_ROWS: usize = 64;

/// `merged` (one layer's range of the arena) ← that layer's base weights with `s·B·A` added
/// for each of its adapters (`layer`).
/// `base(at, dst)` writes the base values of the layer-relative range `[at, at + dst.len())`
/// into `dst` (a copy of the f32 arena, or the bf16 base widened).
///
/// Why blocks: a copy of the whole layer followed by one K = r GEMM per matrix streams every
/// targeted matrix through memory twice (read and write each time); here each block of `MERGE_ROWS`
/// rows is written from the base and gets its rank-r update while still in cache, one pass,
/// with the blocks spread over the rayon pool. `sb` is scratch for s·B.
pub fn merge_layer_from(
    par: Par,
    layer: &[Adapter],
    s: f32,
    merged: &mut [f32],
    base: impl Fn(usize, &mut [f32]) + Sync,
    adapters: &[f32],
    sb: &mut Vec<f32>,
) {
    let seq = Par { threads: 1, gemm: par.gemm };
    // Visit the adapters by offset (a layer has at most one per target).
    let mut order = [0usize; Target::ALL.len()];
    let order = &mut order[..layer.len()];
    order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
    order.sort_unstable_by_key(|&i| layer[i].w_offset);
    let mut done = 0;
    for ad in order.iter().map(|&i| &layer[i]) {
        assert!(ad.w_offset >= done, "merge_layer_from: two adapters overlap");
        base(done, &mut merged[done..ad.w_offset]);
        let r = ad.a.len() / ad.ic;
        sb.clear();
        sb.extend(adapters[ad.b.clone()].iter().map(|&x| s * x));
        let (a, sb, ic) = (&adapters[ad.a.clone()], &sb[..], ad.ic);
        let w = &mut merged[ad.w_offset..ad.w_offset + ad.oc * ic];
        w.par_chunks_mut(MERGE_ROWS * ic).enumerate().for_each(|(blk, w)| {
            let row0 = blk * MERGE_ROWS;
            base(ad.w_offset + row0 * ic, w);
            sgemm(seq, w.len() / ic, ic, r, Operand::n(&sb[row0 * r..], r), Operand::n(a, ic), w, ic, true);
        });
        done = ad.w_offset + ad.oc * ic;
    }
    let end = merged.len();
    base(done, &mut merged[done..end]);
}

/// Scratch of the adapter backward when u and v were not saved (the merged-weights paths):
/// u and v `[N, 3r]` (the widest stack), dA `[3r, IC]` for the widest IC.
pub struct LoraScratch {
    pub u: Vec<f32>,
    pub v: Vec<f32>,
    pub da: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::GemmImpl;

    /// The blocked one-pass merge equals W + s·B·A formed in f64 (blocks taller and shorter
    /// than `MERGE_ROWS`, targets with gaps between them, nonzero B), from a copied base and in
    /// place.
    #[test]
    fn blocked_merge_matches_naive() {
        let base_cfg = ModelConfig::preset("stories260k").unwrap();
        let cfg = ModelConfig { dim: 72, ffn_dim: 200, n_heads: 6, n_kv_heads: 2, ..base_cfg };
        let layout = ParamLayout::new(&cfg);
        let lora = LoraConfig { rank: 4, alpha: 8.0, targets: vec![Target::K, Target::O, Target::Down] };
        let ll = LoraLayout::new(&cfg, &layout, &lora).unwrap();
        let mut rng = Rng::new(3);
        let params: Vec<f32> = (0..layout.total).map(|_| rng.normal() as f32).collect();
        let adapters: Vec<f32> = (0..ll.total).map(|_| rng.normal() as f32).collect();
        let par = Par { threads: 2, gemm: GemmImpl::Gemm };
        let mut in_place = params.clone();
        ll.merge_into(par, &layout, &mut in_place, &adapters);
        for l in 0..cfg.n_layers {
            let range = layout.layer_range(l);
            let mut want: Vec<f64> = params[range.clone()].iter().map(|&x| x as f64).collect();
            for ad in ll.layer(l) {
                let (a, b, r) = (&adapters[ad.a.clone()], &adapters[ad.b.clone()], ad.a.len() / ad.ic);
                for o in 0..ad.oc {
                    for i in 0..ad.ic {
                        let sba: f64 = (0..r).map(|j| b[o * r + j] as f64 * a[j * ad.ic + i] as f64).sum();
                        want[ad.w_offset + o * ad.ic + i] += lora.scale() as f64 * sba;
                    }
                }
            }
            let mut got = vec![f32::NAN; range.len()];
            let src = &params[range.clone()];
            let copy = |at: usize, dst: &mut [f32]| dst.copy_from_slice(&src[at..at + dst.len()]);
            merge_layer_from(par, ll.layer(l), lora.scale(), &mut got, copy, &adapters, &mut Vec::new());
            for (i, ((g, p), w)) in got.iter().zip(&in_place[range.clone()]).zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "layer {l} value {i}: {g} vs {w}");
                assert!((*p as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "layer {l} value {i} in place: {p} vs {w}");
            }
        }
    }
}
