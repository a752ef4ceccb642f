//! The Neural Engine benchmark programs (`anetrain ane bench`), designed after what the
//! original system measured (facts §1.4): chains of 1×1 convolutions with constant weights
//! over an fp16 input `[1, C, 1, SP]`.
//!
//! - `dispatch`: one conv per program over a channel sweep: per-evaluation overhead;
//! - `peak`: deep chains in one program: sustained throughput;
//! - `sram`: one conv with growing weights: where throughput per weight byte falls off (the
//!   on-chip SRAM cliff);
//! - `int8`: the same chains in FP16 and in W8A8 (weights int8 per output channel through
//!   `constexpr_affine_dequantize`, every conv input quantized per tensor with
//!   `quantize`/`dequantize`).
//!
//! FLOPs: 2·C·C·SP per conv (a multiply-add is 2), so TFLOP/s = FLOPs / seconds / 10¹².
//! Weights: random N(0, 1/C) (the activations keep their scale through a deep chain), fixed
//! by a seed; the input is N(0, 1). W8A8 activations use the scale 2⁻⁴ (±8 in steps of 1/16:
//! ample for unit-variance activations; a power of two, so x / scale is exact in fp16).

use super::KernelProgram;
use super::emit::{MAX_DIM, SPATIAL_GRANULE};
use super::graph::{one_input, one_input_kernel};
use crate::rng::Rng;
use anyhow::{Result, ensure};

/// The per-tensor activation scale of the W8A8 programs.
pub const ACT_SCALE: f32 = 1.0 / 16.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp16,
    W8a8,
}

/// One benchmark program: `depth` convs of C → C over SP positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub ch: usize,
    pub sp: usize,
    pub depth: usize,
    pub precision: Precision,
}

impl Spec {
    pub fn flops(&self) -> f64 {
        2.0 * (self.ch * self.ch * self.sp) as f64 * self.depth as f64
    }

    /// Weight bytes on the device (fp16: 2 per weight; W8A8: 1, plus the per-channel scales).
    pub fn weight_bytes(&self) -> usize {
        let per = match self.precision {
            Precision::Fp16 => 2 * self.ch * self.ch,
            Precision::W8a8 => self.ch * self.ch + 2 * self.ch,
        };
        per * self.depth
    }

    /// Activation bytes in and out (fp16).
    pub fn activation_bytes(&self) -> usize {
        2 * 2 * self.ch * self.sp
    }

    pub fn name(&self) -> String {
        let p = match self.precision {
            Precision::Fp16 => "fp16",
            Precision::W8a8 => "w8a8",
        };
        format!("conv{}x{}_sp{}_{p}", self.depth, self.ch, self.sp)
    }

    /// Refuses sizes the hardware cannot take, naming the limit.
    pub fn check(&self) -> Result<()> {
        ensure!(self.depth >= 1, "{}: a chain needs at least one conv", self.name());
        ensure!(
            self.ch >= 1 && self.ch <= MAX_DIM && self.sp >= 1 && self.sp <= MAX_DIM,
            "{}: channels {} and spatial size {} must each be 1..={MAX_DIM}, the Neural Engine's per-dimension limit",
            self.name(),
            self.ch,
            self.sp
        );
        ensure!(
            self.sp.is_multiple_of(SPATIAL_GRANULE),
            "{}: spatial size {} must be a multiple of {SPATIAL_GRANULE} (narrower surfaces are reported to corrupt silently)",
            self.name(),
            self.sp
        );
        Ok(())
    }

    /// The same program shape at a size the simulator runs in well under a second: at most
    /// 64 channels, 32 positions and 4 convs.
    pub fn small(&self) -> Spec {
        Spec { ch: self.ch.clamp(16, 64), sp: 32, depth: self.depth.min(4), precision: self.precision }
    }
}

/// The weights of one program as the CPU reference needs them.
pub enum Weights {
    /// `[depth][C·C]`, row-major `[out, in]`, exactly the fp16 values the program holds
    Fp16(Vec<Vec<f32>>),
    /// `[depth]`: int8 `[out, in]` and one scale per output channel
    Int8(Vec<(Vec<i8>, Vec<f32>)>),
}

/// Random weights for `spec` from `seed`.
pub fn weights(spec: &Spec, seed: u64) -> Result<Weights> {
    let (c, depth) = (spec.ch, spec.depth);
    crate::memory::ensure_fits(
        &format!("the weights of benchmark program {}", spec.name()),
        crate::memory::bytes(4 + 2, &[depth, c, c]),
        "use fewer channels or a shallower chain",
    )?;
    let mut rng = Rng::new(seed);
    let std = 1.0 / (c as f64).sqrt();
    let mut layer = || -> Vec<f32> { (0..c * c).map(|_| half::f16::from_f64(std * rng.normal()).to_f32()).collect() };
    Ok(match spec.precision {
        Precision::Fp16 => Weights::Fp16((0..depth).map(|_| layer()).collect()),
        Precision::W8a8 => Weights::Int8((0..depth).map(|_| quantize_rows(&layer(), c)).collect()),
    })
}

/// Symmetric int8 per row: scale = max|row| / 127 (rounded to fp16, as the program stores
/// it), q = round-half-even(w / scale) clipped to [−127, 127].
pub fn quantize_rows(w: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::new();
    for row in w.chunks_exact(cols) {
        let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let s = half::f16::from_f32(if max > 0.0 { max / 127.0 } else { 1.0 }).to_f32();
        scales.push(s);
        q.extend(row.iter().map(|&x| (x / s).round_ties_even().clamp(-127.0, 127.0) as i8));
    }
    (q, scales)
}

/// The program for `spec` with `weights`: input `i0_x [1, C, 1, SP]`, output `[1, C, 1, SP]`.
pub fn program(spec: &Spec, weights: &Weights) -> Result<KernelProgram> {
    spec.check()?;
    let (c, sp) = (spec.ch, spec.sp);
    let (mut b, sig, mut x) = one_input([1, c, 1, sp]);
    for l in 0..spec.depth {
        let w = match weights {
            Weights::Fp16(ws) => b.blob(&format!("w{l}"), &[c, c, 1, 1], &ws[l]),
            Weights::Int8(ws) => {
                let (q, s) = &ws[l];
                // every conv input is int8-valued: quantize, then dequantize for the conv
                let xq = b.quantize(&format!("x{l}_q"), &x, ACT_SCALE);
                x = b.dequantize(&format!("x{l}_dq"), &xq, ACT_SCALE);
                b.int8_weight(&format!("w{l}"), &[c, c, 1, 1], q, s)
            }
        };
        x = b.conv(&format!("y{l}"), &x, &w);
    }
    Ok(one_input_kernel(&spec.name(), b, sig, x))
}

/// How the CPU reference treats a W8A8 program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Ref {
    /// The integer path: activations quantized with `quantize`'s rounding, i8·i8 products
    /// summed exactly in integers, scaled by activation scale · row scale; no fp16 anywhere.
    Integer,
    /// The program's arithmetic, exactly: the same quantized activations, weights
    /// dequantized to fp16 (scale · q rounded, as `constexpr_affine_dequantize` defines),
    /// products summed exactly, each layer's output rounded to fp16. A chain compared with
    /// `Integer` drifts: where the two differ by a rounding, the next `quantize` can land one
    /// step (1/16) apart, and such steps spread through later layers; this mode has no drift.
    Program,
}

/// The CPU reference of a program on input `x` `[C, SP]`: f64 convs over the fp16 weights,
/// or for W8A8 one of the `Int8Ref` paths.
pub fn reference(spec: &Spec, weights: &Weights, x: &[f32], mode: Int8Ref) -> Vec<f32> {
    let (c, sp) = (spec.ch, spec.sp);
    let mut cur: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for l in 0..spec.depth {
        let mut next = vec![0f64; c * sp];
        match weights {
            Weights::Fp16(ws) => {
                for o in 0..c {
                    for i in 0..c {
                        let w = ws[l][o * c + i] as f64;
                        for p in 0..sp {
                            next[o * sp + p] += w * cur[i * sp + p];
                        }
                    }
                }
            }
            Weights::Int8(ws) => {
                let (q, s) = &ws[l];
                let xq: Vec<i64> = cur.iter().map(|&v| super::sim::quantize(v as f32, ACT_SCALE) as i64).collect();
                let a = ACT_SCALE as f64;
                for o in 0..c {
                    match mode {
                        Int8Ref::Integer => {
                            let mut acc = vec![0i64; sp];
                            for i in 0..c {
                                let w = q[o * c + i] as i64;
                                for p in 0..sp {
                                    acc[p] += w * xq[i * sp + p];
                                }
                            }
                            for p in 0..sp {
                                next[o * sp + p] = acc[p] as f64 * a * s[o] as f64;
                            }
                        }
                        Int8Ref::Program => {
                            for i in 0..c {
                                let w = half::f16::from_f32(s[o] * q[o * c + i] as f32).to_f64();
                                for p in 0..sp {
                                    next[o * sp + p] += w * (a * xq[i * sp + p] as f64);
                                }
                            }
                            for v in &mut next[o * sp..(o + 1) * sp] {
                                *v = half::f16::from_f64(*v).to_f64();
                            }
                        }
                    }
                }
            }
        }
        cur = next;
    }
    cur.iter().map(|&v| v as f32).collect()
}

/// The programs of each benchmark at the sizes the original system measured.
pub fn suite(kind: &str) -> Result<Vec<Spec>> {
    let s = |ch, sp, depth, precision| Spec { ch, sp, depth, precision };
    use Precision::*;
    Ok(match kind {
        "dispatch" => [256, 512, 1024, 2048, 3072, 4096].iter().map(|&ch| s(ch, 64, 1, Fp16)).collect(),
        "peak" => [
            (512, 32),
            (512, 48),
            (512, 64),
            (512, 96),
            (512, 128),
            (256, 64),
            (256, 128),
            (256, 256),
            (384, 64),
            (384, 128),
        ]
        .iter()
        .map(|&(ch, d)| s(ch, 64, d, Fp16))
        .collect(),
        "sram" => [256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 4608, 5120, 6144]
            .iter()
            .map(|&ch| s(ch, 64, 1, Fp16))
            .chain([s(8192, 32, 1, Fp16)])
            .collect(),
        "int8" => [(512, 128), (512, 64), (256, 256), (256, 128), (384, 128)]
            .iter()
            .flat_map(|&(ch, d)| [s(ch, 4096, d, Fp16), s(ch, 4096, d, W8a8)])
            .collect(),
        other => anyhow::bail!("unknown benchmark `{other}`: dispatch, peak, sram or int8"),
    })
}
