//! Llama 3 RoPE scaling in GGUF files. llama.cpp's converter writes no `rope.scaling.*`
//! metadata for it; it stores a `rope_freqs.weight` tensor `[D/2]` of per-frequency divisors
//! instead (1 for short wavelengths, `factor` for long ones, `1 / ((1 − s)/factor + s)` in the
//! band between), which llama.cpp's `ggml_rope_ext` divides each rotation frequency by.
//!
//! This crate models the scaling by its HF parameters (`Llama3Scaling`), so that `convert` to HF
//! writes `rope_scaling` and the forward pass computes transformers' frequencies. Import
//! recovers the parameters from the divisors and accepts them only if recomputing the divisors
//! from them reproduces the tensor bit for bit; export writes the divisors as the converter
//! computes them (in its f32 arithmetic).

use crate::config::Llama3Scaling;
use crate::ops::rope::inv_freq;
use anyhow::{Result, bail, ensure};

/// The tensor llama.cpp keeps the divisors in.
pub const TENSOR: &str = "rope_freqs.weight";

/// The divisor of each of the `D/2` frequencies, as llama.cpp's converter computes it: f32
/// frequencies `1/θ^(2i/D)`, wavelengths `2π/f`, band edges `orig/high` and `orig/low`, and
/// the interpolation `s = (orig/λ − low)/(high − low)`, every operation rounded to f32 as
/// PyTorch rounds it (the fixture tests/fixtures/gguf/llama3_rope.gguf pins this bit for bit).
pub fn divisors(d: usize, theta: f64, s: &Llama3Scaling) -> Vec<f32> {
    let orig = s.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = ((orig / s.low_freq_factor) as f32, (orig / s.high_freq_factor) as f32);
    let (two_pi, factor, low) = ((2.0 * std::f64::consts::PI) as f32, s.factor as f32, s.low_freq_factor as f32);
    let band = (s.high_freq_factor - s.low_freq_factor) as f32;
    inv_freq(d, theta, None)
        .iter()
        .map(|&f| {
            // PyTorch computes `scalar / tensor` as `reciprocal(tensor) · scalar`.
            let wavelen = (1.0 / f) * two_pi;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = ((1.0 / wavelen) * orig as f32 - low) / band;
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The Llama 3 parameters whose divisors are exactly `r` (`D/2` values), `None` when every
/// divisor is 1 (no scaling). `orig_hint` is the file's `rope.scaling.original_context_length`
/// if it has one (this crate's export writes it; llama.cpp's converter does not).
///
/// `factor` is the largest divisor. The interpolated entries fix `s = A·f/2π + B` with
/// `A = orig/(high − low)` and `B = −low/(high − low)`, two equations for three unknowns:
/// with `orig` known they give `low` and `high`; without it `low = 1` (every published
/// Llama 3.x) gives the rest. Candidates are tried rounded to a few grids (coarsest first) and as
/// fitted; one must reproduce every divisor bit for bit.
pub fn recover(r: &[f32], d: usize, theta: f64, orig_hint: Option<usize>) -> Result<Option<Llama3Scaling>> {
    ensure!(
        r.len() == d / 2,
        "tensor '{TENSOR}' has {} entries, but head_dim {d} has {} RoPE frequencies",
        r.len(),
        d / 2
    );
    ensure!(
        r.iter().all(|x| x.is_finite() && *x > 0.0),
        "tensor '{TENSOR}' holds a non-finite or non-positive value, so it is not a set of RoPE frequency divisors"
    );
    if r.iter().all(|&x| x == 1.0) {
        return Ok(None);
    }
    let factor = r.iter().fold(1.0f32, |m, &x| m.max(x)) as f64;
    let x: Vec<f64> = inv_freq(d, theta, None).iter().map(|&f| f as f64 / (2.0 * std::f64::consts::PI)).collect();
    let smooth = |i: usize| (1.0 / r[i] as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
    let mid: Vec<usize> = (0..r.len()).filter(|&i| r[i] > 1.0 && (r[i] as f64) < factor).collect();
    let origs: Vec<usize> = orig_hint.into_iter().chain([8192]).collect();
    // (low, high, orig) before rounding.
    let mut fits: Vec<(f64, f64, usize)> = Vec::new();
    if let (Some(&i), Some(&j)) = (mid.first(), mid.last())
        && i != j
    {
        let a = (smooth(j) - smooth(i)) / (x[j] - x[i]);
        let b = smooth(i) - a * x[i];
        if let Some(o) = orig_hint {
            let band = o as f64 / a;
            fits.push((-b * band, -b * band + band, o));
        }
        let band = -1.0 / b;
        fits.push((1.0, 1.0 + band, (a * band).round() as usize));
    } else if let Some(&i) = mid.first() {
        for &o in &origs {
            fits.push((1.0, 1.0 + (o as f64 * x[i] - 1.0) / smooth(i), o));
        }
    }
    for &o in &origs {
        fits.push((1.0, 4.0, o));
    }
    let grid = |v: f64, step: f64| (v / step).round() * step;
    for (low, high, orig) in fits {
        // The plainest values first: a raw fit that also reproduces the divisors is off by
        // rounding.
        for step in [1.0, 0.25, 1.0 / 64.0, 1e-2, 1e-3, 0.0] {
            let (low, high) = if step == 0.0 { (low, high) } else { (grid(low, step), grid(high, step)) };
            if !(low.is_finite() && high.is_finite() && low > 0.0 && high > low && orig > 0) {
                continue;
            }
            let s = Llama3Scaling {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: orig,
            };
            if divisors(d, theta, &s).iter().zip(r).all(|(a, b)| a.to_bits() == b.to_bits()) {
                return Ok(Some(s));
            }
        }
    }
    bail!(
        "tensor '{TENSOR}' ({r:?}) is not Llama 3 RoPE scaling for any parameters this importer can recover, so \
         the model cannot be imported exactly"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3(factor: f64, low: f64, high: f64, orig: usize) -> Llama3Scaling {
        Llama3Scaling { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: orig }
    }

    /// Published Llama 3.1 / 3.2 shapes and small ones round trip, with and without the hint.
    #[test]
    fn parameters_are_recovered_from_their_divisors() {
        for (d, theta, s, hint_needed) in [
            (128, 500000.0, llama3(8.0, 1.0, 4.0, 8192), false),
            (64, 500000.0, llama3(32.0, 1.0, 4.0, 8192), false),
            (32, 10000.0, llama3(8.0, 1.0, 4.0, 64), false),
            (32, 10000.0, llama3(4.0, 2.0, 8.0, 256), true),
            (12, 10000.0, llama3(8.0, 1.0, 4.0, 64), true),
        ] {
            let r = divisors(d, theta, &s);
            assert!(r.iter().any(|&x| x != 1.0));
            assert_eq!(recover(&r, d, theta, Some(s.original_max_position_embeddings)).unwrap(), Some(s));
            if !hint_needed {
                assert_eq!(recover(&r, d, theta, None).unwrap(), Some(s), "d {d} {s:?}");
            }
        }
        assert_eq!(recover(&[1.0; 8], 16, 10000.0, None).unwrap(), None);
    }

    #[test]
    fn bad_divisors_get_one_sentence_errors() {
        let err = |r: &[f32], d: usize| format!("{:#}", recover(r, d, 10000.0, None).unwrap_err());
        assert!(err(&[1.0; 7], 16).contains("has 7 entries, but head_dim 16 has 8"));
        let mut r = divisors(32, 10000.0, &llama3(8.0, 1.0, 4.0, 64));
        r[3] = f32::NAN;
        assert!(err(&r, 32).contains("non-finite"));
        r[3] = f32::INFINITY;
        assert!(err(&r, 32).contains("non-finite"));
        r[3] = 3.0;
        assert!(err(&r, 32).contains("is not Llama 3 RoPE scaling"), "{}", err(&r, 32));
        let e = err(&r, 32);
        assert!(!e.contains('\n') && e.matches(". ").count() == 0, "{e}");
    }
}
