//! The command line's own value enums. The library takes plain enums and knows nothing of
//! `clap`; these carry the flag spellings and help texts and map onto the library's.

use anetrain::backends::BackendKind;
use anetrain::checkpoint::llama2c::Format;
use anetrain::mil::dialect::Dialect;
use anetrain::mil::emit::InputLayout;
use anetrain::ops::GemmImpl;
use clap::ValueEnum;

/// `--gemm`, `bench gemm --impl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GemmArg {
    /// The `gemm` crate (pure Rust, runtime-dispatched AVX2/AVX-512/NEON kernels, rayon).
    Gemm,
    /// The `matrixmultiply` crate (pure Rust; threads from MATMUL_NUM_THREADS).
    Matrixmultiply,
    /// System BLAS `cblas_sgemm` (OpenBLAS on Linux, Accelerate on macOS), `--features blas`.
    Blas,
}

impl From<GemmArg> for GemmImpl {
    fn from(a: GemmArg) -> Self {
        match a {
            GemmArg::Gemm => GemmImpl::Gemm,
            GemmArg::Matrixmultiply => GemmImpl::Matrixmultiply,
            GemmArg::Blas => GemmImpl::Blas,
        }
    }
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Native Rust kernels and a real GEMM, f32.
    Cpu,
    /// The generated MIL programs, run by the fp16 MIL simulator on the CPU.
    MilSim,
    /// The generated MIL programs on the Apple Neural Engine (macOS on Apple silicon only;
    /// compiled and unit-tested on Linux, never run by the authors on hardware).
    Ane,
}

impl From<BackendArg> for BackendKind {
    fn from(a: BackendArg) -> Self {
        match a {
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::MilSim => BackendKind::MilSim,
            BackendArg::Ane => BackendKind::Ane,
        }
    }
}

/// `--mil-layout`, `--layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// Activations and weights side by side in one `[1, C, 1, W]` input.
    Packed,
    /// Every activation and weight its own function input.
    Separate,
}

impl From<LayoutArg> for InputLayout {
    fn from(a: LayoutArg) -> Self {
        match a {
            LayoutArg::Packed => InputLayout::Packed,
            LayoutArg::Separate => InputLayout::Separate,
        }
    }
}

/// `--mil-dialect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DialectArg {
    /// `program(1.3)`, `func main<ios18>`, compact scalars (M3 and later).
    Ios18,
    /// `program(1.0)`, `func main<ios16>`, scalars as rank-0 tensors (the older-chip syntax
    /// for M1/M2; no quantize/dequantize ops).
    Ios16,
}

impl From<DialectArg> for Dialect {
    fn from(a: DialectArg) -> Self {
        match a {
            DialectArg::Ios18 => Dialect::Ios18,
            DialectArg::Ios16 => Dialect::Ios16,
        }
    }
}

/// `--mil-dialect` of the commands that run MIL programs (`train`, `bench step`, `ane probe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DialectChoice {
    /// On `--backend ane` the dialect the chip takes (by its reported aneSubType: M1/M2
    /// ios16, later ios18); on `mil-sim` ios18.
    Auto,
    /// `program(1.3)` (M3 and later).
    Ios18,
    /// `program(1.0)`, the older-chip syntax for M1/M2.
    Ios16,
}

impl DialectChoice {
    /// The explicit dialect, or None for `auto`.
    pub fn dialect(self) -> Option<Dialect> {
        match self {
            DialectChoice::Auto => None,
            DialectChoice::Ios18 => Some(Dialect::Ios18),
            DialectChoice::Ios16 => Some(Dialect::Ios16),
        }
    }
}

/// `ane bench <KIND>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AneBenchArg {
    /// One 1×1 conv per program, channels 256…4096: per-evaluation overhead.
    Dispatch,
    /// Deep conv chains in one program: sustained throughput.
    Peak,
    /// One conv with growing weights (256…8192 channels): the on-chip SRAM cliff.
    Sram,
    /// The same chains in FP16 and W8A8.
    Int8,
}

impl AneBenchArg {
    pub fn name(self) -> &'static str {
        match self {
            AneBenchArg::Dispatch => "dispatch",
            AneBenchArg::Peak => "peak",
            AneBenchArg::Sram => "sram",
            AneBenchArg::Int8 => "int8",
        }
    }
}

/// `--llama2c-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Llama2cFormatArg {
    /// 7-int header, RoPE tables, negative vocab for an untied classifier.
    Legacy,
    /// `ak42` magic, version 1, 256-byte header.
    V1,
}

impl From<Llama2cFormatArg> for Format {
    fn from(a: Llama2cFormatArg) -> Self {
        match a {
            Llama2cFormatArg::Legacy => Format::Legacy,
            Llama2cFormatArg::V1 => Format::V1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every library variant is reachable from the command line under its documented name.
    #[test]
    fn every_value_maps_onto_the_library() {
        let names = |vs: &[String]| vs.join(",");
        let all = |v: &[Option<clap::builder::PossibleValue>]| {
            names(&v.iter().flatten().map(|p| p.get_name().to_string()).collect::<Vec<_>>())
        };
        let gemm: Vec<_> = GemmArg::value_variants().iter().map(|v| v.to_possible_value()).collect();
        assert_eq!(all(&gemm), "gemm,matrixmultiply,blas");
        let mapped: Vec<GemmImpl> = GemmArg::value_variants().iter().map(|&v| v.into()).collect();
        assert_eq!(mapped, [GemmImpl::Gemm, GemmImpl::Matrixmultiply, GemmImpl::Blas]);
        let backends: Vec<_> = BackendArg::value_variants().iter().map(|v| v.to_possible_value()).collect();
        assert_eq!(all(&backends), "cpu,mil-sim,ane");
        let mapped: Vec<BackendKind> = BackendArg::value_variants().iter().map(|&v| v.into()).collect();
        assert_eq!(mapped, [BackendKind::Cpu, BackendKind::MilSim, BackendKind::Ane]);
        let layouts: Vec<InputLayout> = LayoutArg::value_variants().iter().map(|&v| v.into()).collect();
        assert_eq!(layouts, [InputLayout::Packed, InputLayout::Separate]);
        let formats: Vec<Format> = Llama2cFormatArg::value_variants().iter().map(|&v| v.into()).collect();
        assert_eq!(formats, [Format::Legacy, Format::V1]);
    }
}
