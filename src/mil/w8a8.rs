//! W8A8 variants of the forward kernels for inference and decoding (issue 13 item 2), with
//! their CPU int8 reference.
//!
//! Weights are fixed when decoding, so they are baked into the program: int8 per output
//! channel (scale = max|row| / 127, round half to even) through `constexpr_affine_dequantize`;
//! every linear layer's input is quantized per tensor with a calibrated scale (`quantize`,
//! then `dequantize` back to fp16 for the 1×1 `conv`). Activations `[1, C, 1, S]` fp16, as
//! everywhere in `mil`. Kernels:
//! - `linear_w8a8`: `y [1, OC, 1, S] = W · x` (the q/k/v, o and classifier projections);
//! - `ffn_fwd_w8a8`: `W2 · (silu(W1·x) ⊙ W3·x)`, the gate quantized before W2.
//!
//! The reference (`linear_ref`, `ffn_ref`) is the integer path: the same activation
//! quantization, i8·i8 products summed exactly, scaled by activation scale · row scale; SiLU
//! in f64. Differences from the program: the fp16 rounding of each dequantized weight and of
//! each op's output, and — in the FFN — the gate quantized from fp16 values, which can land
//! one step from the reference's where they round apart.

use super::KernelProgram;
use super::benchprog::quantize_rows;
use super::graph::{Builder, V, one_input, one_input_kernel};
use anyhow::{Result, ensure};

/// A weight matrix `[OC, IC]` (HF layout, row = output feature) quantized per row.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub oc: usize,
    pub ic: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

impl QMatrix {
    pub fn new(w: &[f32], oc: usize, ic: usize) -> Result<QMatrix> {
        ensure!(w.len() == oc * ic, "weight has {} values, [{oc}, {ic}] needs {}", w.len(), oc * ic);
        ensure!(w.iter().all(|x| x.is_finite()), "weight holds NaN or infinity; int8 quantization needs finite values");
        let (q, scales) = quantize_rows(w, ic);
        Ok(QMatrix { oc, ic, q, scales })
    }
}

/// A per-tensor activation scale for values up to `max_abs`: max_abs / 127 rounded to fp16
/// (the scale `quantize` takes is an fp16 constant).
pub fn act_scale(max_abs: f32) -> f32 {
    let s = if max_abs > 0.0 && max_abs.is_finite() { max_abs / 127.0 } else { 1.0 };
    half::f16::from_f32(s).to_f32().max(f32::from(half::f16::MIN_POSITIVE))
}

fn qlinear(b: &mut Builder, name: &str, x: &V, w: &QMatrix, scale: f32) -> V {
    let xq = b.quantize(&format!("{name}_xq"), x, scale);
    let xd = b.dequantize(&format!("{name}_xd"), &xq, scale);
    let wd = b.int8_weight(&format!("{name}_w"), &[w.oc, w.ic, 1, 1], &w.q, &w.scales);
    b.conv(name, &xd, &wd)
}

fn check_s(s: usize) -> Result<()> {
    ensure!(
        s.is_multiple_of(super::emit::SPATIAL_GRANULE) && s <= super::emit::MAX_DIM,
        "positions S = {s} must be a multiple of 16 up to 65536"
    );
    Ok(())
}

/// `y = W · x` with x `[1, IC, 1, S]` quantized at `scale`.
pub fn linear_w8a8(name: &str, w: &QMatrix, s: usize, scale: f32) -> Result<KernelProgram> {
    check_s(s)?;
    let (mut b, sig, x) = one_input([1, w.ic, 1, s]);
    let y = qlinear(&mut b, "y", &x, w, scale);
    Ok(one_input_kernel(name, b, sig, y))
}

/// The SwiGLU FFN: `W2 · (silu(W1·x) ⊙ W3·x)`; `x_scale` quantizes x, `g_scale` the gate.
pub fn ffn_fwd_w8a8(
    w1: &QMatrix,
    w3: &QMatrix,
    w2: &QMatrix,
    s: usize,
    x_scale: f32,
    g_scale: f32,
) -> Result<KernelProgram> {
    check_s(s)?;
    ensure!(
        w1.ic == w3.ic && w1.oc == w3.oc && w2.ic == w1.oc && w2.oc == w1.ic,
        "W1, W3 [F, C] and W2 [C, F] disagree"
    );
    let (mut b, sig, x) = one_input([1, w1.ic, 1, s]);
    // x is quantized once and feeds both W1 and W3
    let xq = b.quantize("x_q", &x, x_scale);
    let xd = b.dequantize("x_d", &xq, x_scale);
    let w1d = b.int8_weight("w1", &[w1.oc, w1.ic, 1, 1], &w1.q, &w1.scales);
    let w3d = b.int8_weight("w3", &[w3.oc, w3.ic, 1, 1], &w3.q, &w3.scales);
    let h1 = b.conv("h1", &xd, &w1d);
    let h3 = b.conv("h3", &xd, &w3d);
    let sig1 = b.unary("sig", "sigmoid", &h1);
    let silu = b.binary("silu", "mul", &h1, &sig1);
    let gate = b.binary("gate", "mul", &silu, &h3);
    let y = qlinear(&mut b, "out", &gate, w2, g_scale);
    Ok(one_input_kernel("ffn_fwd_w8a8", b, sig, y))
}

/// The integer reference of `linear_w8a8`: x `[IC, S]` → y `[OC, S]`.
pub fn linear_ref(w: &QMatrix, x: &[f32], s: usize, scale: f32) -> Vec<f64> {
    let xq: Vec<i64> = x.iter().map(|&v| super::sim::quantize(v, scale) as i64).collect();
    let mut y = vec![0f64; w.oc * s];
    for o in 0..w.oc {
        let mut acc = vec![0i64; s];
        for i in 0..w.ic {
            let wq = w.q[o * w.ic + i] as i64;
            for p in 0..s {
                acc[p] += wq * xq[i * s + p];
            }
        }
        for p in 0..s {
            y[o * s + p] = acc[p] as f64 * scale as f64 * w.scales[o] as f64;
        }
    }
    y
}

/// The integer reference of `ffn_fwd_w8a8` (SiLU and the gate product in f64).
pub fn ffn_ref(w1: &QMatrix, w3: &QMatrix, w2: &QMatrix, x: &[f32], s: usize, x_scale: f32, g_scale: f32) -> Vec<f64> {
    let h1 = linear_ref(w1, x, s, x_scale);
    let h3 = linear_ref(w3, x, s, x_scale);
    let gate: Vec<f32> = h1.iter().zip(&h3).map(|(&a, &b)| (a / (1.0 + (-a).exp()) * b) as f32).collect();
    linear_ref(w2, &gate, s, g_scale)
}
