//! Rotary position embedding, HF "rotate-half" convention: within each head, element i pairs
//! with i + D/2 and rotates by angle `pos · θ^(−2i/D)`, i < D/2.
//! (llama2.c's Meta layout pairs 2i with 2i+1; checkpoints are permuted on import instead.)

use crate::config::{Llama3Scaling, ModelConfig, RopeScaling};
use rayon::prelude::*;

/// cos/sin of every (position, frequency) pair, `[T_max, D/2]` each, built once per model.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

/// The `D/2` rotation frequencies in HF's f32 arithmetic: `1 / θ^(2i/D)`, then
/// - linear scaling: each divided by `factor` (f32 by f32, as `inv_freq /= factor` in
///   transformers' `_compute_linear_scaling_rope_parameters`);
/// - Llama 3 scaling: wavelengths `λ = 2π/f` beyond `orig / low_freq_factor` slowed by
///   `factor`, those below `orig / high_freq_factor` kept, and between them
///   `(1 − s)·f/factor + s·f` with `s = (orig/λ − low) / (high − low)` (transformers'
///   `_compute_llama3_parameters`, operation for operation in f32).
pub fn inv_freq(d: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32)).collect();
    match scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|&f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3(s)) => llama3(&base, s),
    }
}

fn llama3(base: &[f32], s: &Llama3Scaling) -> Vec<f32> {
    let orig = s.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = ((orig / s.low_freq_factor) as f32, (orig / s.high_freq_factor) as f32);
    let factor = s.factor as f32;
    base.iter()
        .map(|&f| {
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                return scaled;
            }
            let smooth =
                ((orig as f32) / wavelen - s.low_freq_factor as f32) / (s.high_freq_factor - s.low_freq_factor) as f32;
            (1.0 - smooth) * scaled / factor + smooth * scaled
        })
        .collect()
}

/// `inv_freq` in f64 throughout, for the naive reference.
pub fn inv_freq_f64(d: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    let base = (0..d / 2).map(|i| theta.powf(-((2 * i) as f64) / d as f64));
    let s = match scaling {
        None => return base.collect(),
        Some(RopeScaling::Linear { factor }) => return base.map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3(s)) => s,
    };
    let orig = s.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (orig / s.low_freq_factor, orig / s.high_freq_factor);
    base.map(|f| {
        let wavelen = 2.0 * std::f64::consts::PI / f;
        if wavelen < high_wavelen {
            f
        } else if wavelen > low_wavelen {
            f / s.factor
        } else {
            let smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
            (1.0 - smooth) * f / s.factor + smooth * f
        }
    })
    .collect()
}

impl RopeTable {
    /// Unscaled RoPE with base θ (see `with_freqs`).
    pub fn new(max_t: usize, d: usize, theta: f64) -> Self {
        Self::with_freqs(max_t, &inv_freq(d, theta, None))
    }

    /// The table for a model's config (θ and any scaling).
    pub fn for_config(max_t: usize, cfg: &ModelConfig) -> Self {
        Self::with_freqs(max_t, &inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref()))
    }

    /// Angles `pos · inv_freq` in f32, as transformers computes them, so positions far into
    /// the context round the same way; cos and sin of that f32 angle are then taken in f64
    /// and rounded once.
    pub fn with_freqs(max_t: usize, inv_freq: &[f32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_t * half);
        let mut sin = Vec::with_capacity(max_t * half);
        for pos in 0..max_t {
            for &f in inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { cos, sin, half }
    }
}

/// Rotates x `[N, NH·D]` in place; row r is position `r % T`.
/// `x1' = x1·cos − x2·sin`, `x2' = x2·cos + x1·sin` for pairs (x1, x2) = (x[i], x[i+D/2]).
pub fn rope_forward(x: &mut [f32], table: &RopeTable, n: usize, t: usize, nh: usize) {
    rotate(x, table, n, t, nh, 1.0);
}

/// The rotation is orthogonal, so its gradient is the inverse rotation (angle negated):
/// `dx1 = dy1·cos + dy2·sin`, `dx2 = dy2·cos − dy1·sin`. Applied to dx in place.
pub fn rope_backward(dx: &mut [f32], table: &RopeTable, n: usize, t: usize, nh: usize) {
    rotate(dx, table, n, t, nh, -1.0);
}

fn rotate(x: &mut [f32], table: &RopeTable, n: usize, t: usize, nh: usize, sign: f32) {
    let width = nh * 2 * table.half;
    assert!(table.cos.len() >= t * table.half, "RoPE table shorter than the sequence");
    x[..n * width].par_chunks_mut(width).enumerate().for_each(|(row, xr)| rotate_row(xr, table, row % t, sign));
}

/// Rotates one row `[NH·D]` at position `pos` (KV-cache decoding: one token at a time).
pub fn rope_forward_at(x: &mut [f32], table: &RopeTable, pos: usize) {
    assert!(table.cos.len() > pos * table.half, "position {pos} beyond the RoPE table");
    rotate_row(x, table, pos, 1.0);
}

fn rotate_row(xr: &mut [f32], table: &RopeTable, pos: usize, sign: f32) {
    let half = table.half;
    let cos = &table.cos[pos * half..(pos + 1) * half];
    let sin = &table.sin[pos * half..(pos + 1) * half];
    for head in xr.chunks_exact_mut(2 * half) {
        let (x1, x2) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            let s = sign * sin[i];
            x1[i] = a * cos[i] - b * s;
            x2[i] = b * cos[i] + a * s;
        }
    }
}

/// f64 reference: the same rotation with angles computed in f64 from scratch.
/// `inv_freq` `[D/2]` from `inv_freq_f64`.
pub fn rope_forward_slow(out: &mut [f64], inp: &[f64], n: usize, t: usize, nh: usize, d: usize, inv_freq: &[f64]) {
    let half = d / 2;
    for r in 0..n {
        let pos = (r % t) as f64;
        for h in 0..nh {
            let base = r * nh * d + h * d;
            for i in 0..half {
                let angle = pos * inv_freq[i];
                let (a, b) = (inp[base + i], inp[base + i + half]);
                out[base + i] = a * angle.cos() - b * angle.sin();
                out[base + i + half] = b * angle.cos() + a * angle.sin();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::*;
    use crate::rng::Rng;

    #[test]
    fn fast_matches_naive_and_backward_inverts() {
        let mut rng = Rng::new(8);
        for &(b, t, nh, d) in &[(1, 1, 1, 2), (2, 7, 3, 14), (1, 33, 2, 64), (3, 13, 5, 6)] {
            let n = b * t;
            let table = RopeTable::new(t, d, 10000.0);
            let x = randn(&mut rng, n * nh * d);
            let mut y = x.clone();
            rope_forward(&mut y, &table, n, t, nh);
            let mut y_r = vec![0.0; x.len()];
            rope_forward_slow(&mut y_r, &f64s(&x), n, t, nh, d, &inv_freq_f64(d, 10000.0, None));
            assert_close(&y, &y_r, 1e-5, "rope fwd");
            // Orthogonal map: backward of forward is the identity.
            rope_backward(&mut y, &table, n, t, nh);
            assert_close(&y, &f64s(&x), 1e-5, "rope inverse");
        }
    }

    #[test]
    fn backward_matches_finite_differences_of_reference() {
        let (n, t, nh, d) = (4, 4, 2, 6);
        let mut rng = Rng::new(9);
        let x = randn(&mut rng, n * nh * d);
        let proj = f64s(&randn(&mut rng, x.len()));
        let loss = |v: &[f64]| {
            let mut y = vec![0.0; v.len()];
            rope_forward_slow(&mut y, v, n, t, nh, d, &inv_freq_f64(d, 1e6, None));
            dot64(&y, &proj)
        };
        // The fast backward of `proj` is the analytic gradient of Σ proj ⊙ rope(x).
        let mut g: Vec<f32> = proj.iter().map(|&v| v as f32).collect();
        rope_backward(&mut g, &RopeTable::new(t, d, 1e6), n, t, nh);
        let mut numeric = vec![0.0; x.len()];
        let xs = f64s(&x);
        for i in 0..x.len() {
            let mut p = xs.clone();
            p[i] += 1e-6;
            let fp = loss(&p);
            p[i] -= 2e-6;
            numeric[i] = (fp - loss(&p)) / 2e-6;
        }
        assert_close(&g, &numeric, 1e-5, "rope grad");
    }

    #[test]
    fn llama3_scaling_f32_matches_f64_in_all_three_bands() {
        // Llama 3.1's published values: θ 5e5, D 128, factor 8, low 1, high 4, orig 8192.
        let s = RopeScaling::Llama3(Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let (d, theta) = (128, 5e5);
        let fast = inv_freq(d, theta, Some(&s));
        let slow = inv_freq_f64(d, theta, Some(&s));
        let plain = inv_freq_f64(d, theta, None);
        let (mut kept, mut slowed, mut between) = (0, 0, 0);
        for i in 0..d / 2 {
            assert!((fast[i] as f64 - slow[i]).abs() <= 2e-6 * slow[i], "{i}: {} vs {}", fast[i], slow[i]);
            let ratio = slow[i] / plain[i];
            if ratio == 1.0 {
                kept += 1;
            } else if (ratio - 0.125).abs() < 1e-12 {
                slowed += 1;
            } else {
                assert!(ratio > 0.125 && ratio < 1.0, "{i}: ratio {ratio}");
                between += 1;
            }
        }
        assert!(kept > 0 && slowed > 0 && between > 0, "bands {kept} {slowed} {between}");
    }

    /// Linear scaling: every frequency divided by the factor, in f32 by the f32 factor (as
    /// PyTorch divides an f32 tensor by a Python float), so position `p` of the scaled table
    /// is position `p / factor` of the plain one.
    #[test]
    fn linear_scaling_divides_every_frequency() {
        let (d, theta) = (16, 1e4);
        for factor in [2.0, 2.5, 1.1] {
            let s = RopeScaling::Linear { factor };
            let fast = inv_freq(d, theta, Some(&s));
            let plain = inv_freq(d, theta, None);
            for (f, p) in fast.iter().zip(&plain) {
                assert_eq!(f.to_bits(), (p / factor as f32).to_bits());
            }
            let slow = inv_freq_f64(d, theta, Some(&s));
            for (f, p) in slow.iter().zip(inv_freq_f64(d, theta, None)) {
                assert!((f - p / factor).abs() <= 1e-15 * p);
            }
        }
        // Integer factor: position 4 scaled by 2 is position 2 unscaled, exactly.
        let scaled = RopeTable::with_freqs(5, &inv_freq(d, theta, Some(&RopeScaling::Linear { factor: 2.0 })));
        let plain = RopeTable::new(5, d, theta);
        let half = d / 2;
        assert_eq!(scaled.cos[4 * half..5 * half], plain.cos[2 * half..3 * half]);
        assert_eq!(scaled.sin[4 * half..5 * half], plain.sin[2 * half..3 * half]);
    }
}
