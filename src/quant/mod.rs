//! ggml's tensor encodings: the element types a GGUF file may hold, their block sizes, and
//! dequantization of every type this crate reads (plus quantization of the ones it writes).
//!
//! A block of `block_len` values is stored in `block_bytes` bytes; a row's length must be a
//! multiple of `block_len`. Scales are IEEE half floats. The arithmetic follows ggml's
//! reference dequantizers in f32, in the same order of operations, so values equal the `gguf`
//! Python package's bit for bit (tests/gguf_dequant.rs checks every type against it).
//!
//! This module is kept free of file handling so a quantized-decoding path can use the block
//! layouts directly.

pub mod blocks;
pub mod kernels;
pub mod matvec;
pub mod weights;

use anyhow::{Result, bail, ensure};
use half::{bf16, f16};

/// A ggml element type, by its id in GGUF tensor infos.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

/// Names of ggml type ids this crate does not read, for error messages.
fn unsupported_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16..=23 => "an IQ quantization",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31..=33 => "Q4_0_4_4/4_8/8_8 (repacked)",
        34 | 35 => "TQ1_0/TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

impl GgmlType {
    /// The type with GGUF id `id`, or an error naming it.
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            other => match unsupported_name(other) {
                Some(name) => bail!(
                    "tensor type {name} (ggml type {other}) is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
                ),
                None => bail!("unknown ggml tensor type {other}"),
            },
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => blocks::QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => blocks::Q4_0_BYTES,
            GgmlType::Q4_1 => blocks::Q4_1_BYTES,
            GgmlType::Q5_0 => blocks::Q5_0_BYTES,
            GgmlType::Q5_1 => blocks::Q5_1_BYTES,
            GgmlType::Q8_0 => blocks::Q8_0_BYTES,
            GgmlType::Q4K => blocks::Q4_K_BYTES,
            GgmlType::Q5K => blocks::Q5_K_BYTES,
            GgmlType::Q6K => blocks::Q6_K_BYTES,
        }
    }

    /// Bytes that `n` values occupy, or an error when `n` is not a whole number of blocks (or
    /// the size overflows).
    pub fn bytes_for(self, n: u64) -> Result<u64> {
        let bl = self.block_len() as u64;
        ensure!(n.is_multiple_of(bl), "{} values are not a whole number of {} blocks of {bl}", n, self.name());
        (n / bl).checked_mul(self.block_bytes() as u64).ok_or_else(|| anyhow::anyhow!("tensor size overflows"))
    }
}

/// Decodes `out.len()` values of type `ty` from `src`, which must hold exactly that many.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<()> {
    let expected = ty.bytes_for(out.len() as u64)?;
    ensure!(
        src.len() as u64 == expected,
        "{} data is {} bytes, {} values need {expected}",
        ty.name(),
        src.len(),
        out.len()
    );
    let bl = ty.block_len();
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            let f = match ty {
                GgmlType::Q4_0 => blocks::dequant_q4_0,
                GgmlType::Q4_1 => blocks::dequant_q4_1,
                GgmlType::Q5_0 => blocks::dequant_q5_0,
                GgmlType::Q5_1 => blocks::dequant_q5_1,
                GgmlType::Q8_0 => blocks::dequant_q8_0,
                GgmlType::Q4K => blocks::dequant_q4_k,
                GgmlType::Q5K => blocks::dequant_q5_k,
                GgmlType::Q6K => blocks::dequant_q6_k,
                _ => unreachable!("float types handled above"),
            };
            for (o, b) in out.chunks_exact_mut(bl).zip(src.chunks_exact(bb)) {
                f(b, o);
            }
        }
    }
    Ok(())
}

/// Encodes `src` as type `ty` (F32, F16, BF16 or Q8_0), appending to `out`.
pub fn quantize(ty: GgmlType, src: &[f32], out: &mut Vec<u8>) -> Result<()> {
    ensure!(
        src.len().is_multiple_of(ty.block_len()),
        "{} values are not a whole number of {} blocks",
        src.len(),
        ty.name()
    );
    match ty {
        GgmlType::F32 => src.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgmlType::F16 => src.iter().for_each(|&x| out.extend_from_slice(&f16::from_f32(x).to_le_bytes())),
        GgmlType::BF16 => src.iter().for_each(|&x| out.extend_from_slice(&bf16::from_f32(x).to_le_bytes())),
        GgmlType::Q8_0 => src.chunks_exact(32).for_each(|b| blocks::quant_q8_0(b, out)),
        other => bail!("writing {} is not supported (F32, F16, BF16 and Q8_0 are)", other.name()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_within_half_a_step() {
        let mut rng = crate::rng::Rng::new(3);
        let x: Vec<f32> = (0..256).map(|_| rng.normal() as f32).collect();
        let mut bytes = Vec::new();
        quantize(GgmlType::Q8_0, &x, &mut bytes).unwrap();
        assert_eq!(bytes.len(), 8 * 34);
        let mut y = vec![0.0; 256];
        dequantize(GgmlType::Q8_0, &bytes, &mut y).unwrap();
        for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
            let amax = bx.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let step = amax / 127.0;
            for (a, b) in bx.iter().zip(by) {
                assert!((a - b).abs() <= step * 0.5 + amax * 1e-3, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn sizes_and_errors() {
        assert_eq!(GgmlType::Q4K.bytes_for(512).unwrap(), 288);
        assert!(GgmlType::Q4_0.bytes_for(33).is_err());
        assert!(format!("{:#}", GgmlType::from_id(10).unwrap_err()).contains("Q2_K"));
        assert!(format!("{:#}", GgmlType::from_id(999).unwrap_err()).contains("unknown"));
        let mut out = vec![0.0; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out).is_err());
    }
}
