//! AdamW (Loshchilov & Hutter) in PyTorch's formulation, over the whole parameter arena:
//! `p ← p − lr·wd·p` (decoupled decay, matrices only), `m ← β1·m + (1−β1)·g`,
//! `v ← β2·v + (1−β2)·g²`, `p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + eps)`.
//! The moments share the parameters' layout; every element is independent, so the parallel
//! update is deterministic.

use crate::params::ParamLayout;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates applied so far (t in the bias corrections).
    pub step: u64,
    /// First and second moments, same layout as the parameters.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// (arena range, weight decay applies), one per tensor.
    segments: Vec<(std::ops::Range<usize>, bool)>,
}

const CHUNK: usize = 1 << 14;

impl AdamW {
    /// Zero moments; an error (not an abort) when they cannot be allocated.
    pub fn new(cfg: AdamWConfig, layout: &ParamLayout) -> anyhow::Result<Self> {
        Self::for_tensors(cfg, &layout.tensors, layout.total)
    }

    /// Over an arena of `total` values described by `tensors` (e.g. LoRA adapters).
    pub fn for_tensors(cfg: AdamWConfig, tensors: &[crate::params::TensorInfo], total: usize) -> anyhow::Result<Self> {
        let segments = tensors.iter().map(|t| (t.range(), t.decays())).collect();
        let m = crate::memory::try_vec_f32(total, "AdamW's first moments")?;
        let v = crate::memory::try_vec_f32(total, "AdamW's second moments")?;
        Ok(AdamW { cfg, step: 0, m, v, segments })
    }

    /// Restricts the update of `tensor` (an arena range of `[rows, c]`) to the given row
    /// runs: the other rows are skipped entirely (no decay, moments untouched). Used by
    /// `--compact-vocab` for the embedding and classifier rows of ids the data never holds.
    pub fn keep_rows(&mut self, tensor: std::ops::Range<usize>, c: usize, runs: &[std::ops::Range<usize>]) {
        let Some(at) = self.segments.iter().position(|(r, _)| *r == tensor) else { return };
        let (_, decays) = self.segments.remove(at);
        let parts = runs.iter().map(|r| (tensor.start + r.start * c..tensor.start + r.end * c, decays));
        self.segments.splice(at..at, parts);
    }

    /// One update with learning rate `lr`; `grad_mult` multiplies every gradient first (it
    /// folds loss-scale removal and clipping into the same pass).
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f64, grad_mult: f32) {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2 = 1.0 - beta2.powi(self.step as i32);
        let step_size = (lr / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
        for (range, decays) in &self.segments {
            let decay = if *decays { 1.0 - (lr * weight_decay) as f32 } else { 1.0 };
            let p = &mut params[range.clone()];
            let g = &grads[range.clone()];
            let m = &mut self.m[range.clone()];
            let v = &mut self.v[range.clone()];
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        let g = g * grad_mult;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *p *= decay;
                        *p -= step_size * *m / (v.sqrt() * inv_sqrt_bc2 + eps);
                    }
                });
        }
    }
}

/// Σ g² over the arena in f64, in fixed chunks summed in order: bit-reproducible for any
/// thread count. `partials` is caller-provided scratch of `partials_len(total)` values.
pub fn sum_squares(grads: &[f32], partials: &mut [f64]) -> f64 {
    partials[..grads.len().div_ceil(CHUNK)].par_iter_mut().zip(grads.par_chunks(CHUNK)).for_each(|(out, g)| {
        *out = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
    });
    partials[..grads.len().div_ceil(CHUNK)].iter().sum()
}

/// Gradient multiplier for global-norm clipping, as `torch.nn.utils.clip_grad_norm_`:
/// `min(1, max_norm / (norm + 1e-6))`; `max_norm = 0` disables clipping.
pub fn clip_multiplier(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 { (max_norm / (norm + 1e-6)).min(1.0) as f32 } else { 1.0 }
}

pub fn partials_len(total: usize) -> usize {
    total.div_ceil(CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// Scalar reference of PyTorch's AdamW for one element over several steps.
    fn reference(p0: f64, grads: &[f64], lr: f64, cfg: AdamWConfig, decays: bool) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, &g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            if decays {
                p *= 1.0 - lr * cfg.weight_decay;
            }
            m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
            v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
            let mhat = m / (1.0 - cfg.beta1.powi(t));
            let vhat = v / (1.0 - cfg.beta2.powi(t));
            p -= lr * mhat / (vhat.sqrt() + cfg.eps);
        }
        p
    }

    #[test]
    fn matches_scalar_reference_and_skips_decay_on_norms() {
        let cfg = ModelConfig::preset("stories260k").unwrap();
        let layout = ParamLayout::new(&cfg);
        let mut params = layout.init(1);
        let start = params.clone();
        let opt_cfg = AdamWConfig { beta1: 0.8, beta2: 0.9, eps: 1e-6, weight_decay: 0.5 };
        let mut opt = AdamW::new(opt_cfg, &layout).unwrap();
        let gseq: Vec<Vec<f32>> =
            (0..4).map(|s| (0..layout.total).map(|i| ((i * 7 + s * 13) % 11) as f32 * 0.1 - 0.5).collect()).collect();
        for g in &gseq {
            opt.update(&mut params, g, 1e-2, 2.0);
        }
        let norm = layout.find("model.layers.0.input_layernorm.weight").unwrap().offset;
        let matrix = layout.find("model.layers.0.mlp.gate_proj.weight").unwrap().offset + 5;
        for (i, decays) in [(norm, false), (matrix, true)] {
            let grads: Vec<f64> = gseq.iter().map(|g| 2.0 * g[i] as f64).collect();
            let want = reference(start[i] as f64, &grads, 1e-2, opt_cfg, decays);
            assert!((params[i] as f64 - want).abs() < 1e-6, "element {i}: {} vs {want}", params[i]);
        }
    }

    #[test]
    fn sum_squares_is_exact_enough() {
        let g: Vec<f32> = (0..100_003).map(|i| (i % 17) as f32 - 8.0).collect();
        let mut partials = vec![0.0; partials_len(g.len())];
        let want: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum();
        assert_eq!(sum_squares(&g, &mut partials), want);
    }
}
