//! The two MIL text dialects a program can be written in, and the conversion between them.
//!
//! - `ios18`: `program(1.3)`, `func main<ios18>`, compact scalars (`int32(1)`,
//!   `string("x")`): what the emitter writes, and what the original system ran on M3/M4/M5.
//! - `ios16`: `program(1.0)`, `func main<ios16>`, scalars as rank-0 tensors
//!   (`tensor<int32, []>(1)`, `tensor<string, []>("x")`, offsets `tensor<uint64, []>(64)`),
//!   and a build-info dictionary typed `dict<tensor<string, []>, tensor<string, []>>`: the
//!   syntax contributed for M1/M2 (facts §4.7, never merged upstream, so unverified by its
//!   authors' maintainers and by us).
//!
//! Both write one blob file per matrix with the single chunk at offset 64 (multi-blob files
//! addressed by other offsets fail on M1, facts §1.9), and neither uses `cast` (M1/M2 reject
//! it): every program here has fp16 inputs and outputs. The ios16 opset lacks `quantize` and
//! `dequantize` (iOS 17 ops), so W8A8 activation quantization exists only in ios18; int8
//! weights (`constexpr_affine_dequantize`, iOS 16) exist in both.
//!
//! Reported but not handled here: `matmul` is said to fail on M1/M2 (facts §4.7, "M4+ ops")
//! while `conv` works everywhere. The training kernels pass weights as inputs and need
//! `matmul`; in the ios16 dialect they parse, type-check and simulate, but may not compile on
//! those chips. The benchmark programs (`ane bench`) use `conv` with constant weights.

use super::KernelProgram;
use super::ast::Program;
use super::parse::parse;
use super::types::min_opset;
use anyhow::{Context, Result, bail, ensure};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Ios18,
    Ios16,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Ios18 => "ios18",
            Dialect::Ios16 => "ios16",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Dialect::Ios18 => "1.3",
            Dialect::Ios16 => "1.0",
        }
    }

    fn opset_number(self) -> u32 {
        match self {
            Dialect::Ios18 => 18,
            Dialect::Ios16 => 16,
        }
    }

    fn build_info(self) -> Vec<(String, String)> {
        match self {
            Dialect::Ios18 => super::ast::default_build_info(),
            Dialect::Ios16 => vec![("coremlc-version".into(), "3505.4.1".into())],
        }
    }

    /// Which dialect a parsed program is written in, if either.
    pub fn of(p: &Program) -> Option<Dialect> {
        [Dialect::Ios18, Dialect::Ios16].into_iter().find(|d| p.version == d.version() && p.func.opset == d.name())
    }
}

/// Rewrites `p` in dialect `d` (the AST is the same; only the header, opset and scalar
/// spelling change). Fails, naming the op, when the program uses an op the target opset
/// lacks, or a weight file other than one chunk at offset 64.
pub fn convert_program(p: &Program, d: Dialect, kernel: &str) -> Result<Program> {
    for st in &p.func.body {
        ensure!(
            min_opset(&st.op) <= d.opset_number(),
            "kernel {kernel}: `{}` uses {}, an iOS {} op that the {} dialect does not have; use --mil-dialect ios18",
            st.name,
            st.op,
            min_opset(&st.op),
            d.name()
        );
        for lit in st.val.iter().chain(st.attrs.iter().map(|(_, l)| l)) {
            if let super::ast::Literal::Blob { path, offset, .. } = lit {
                ensure!(
                    *offset == super::blob::CHUNK_OFFSET,
                    "kernel {kernel}: {path} is referenced at offset {offset}; both dialects keep one matrix per file at offset 64"
                );
            }
        }
    }
    let mut out = p.clone();
    out.version = d.version().into();
    out.func.opset = d.name().into();
    out.build_info = d.build_info();
    Ok(out)
}

/// The kernel with its MIL text rewritten in dialect `d` (weight files unchanged).
pub fn convert(k: &KernelProgram, d: Dialect) -> Result<KernelProgram> {
    let p = parse(&k.mil).with_context(|| format!("kernel {}", k.name))?;
    if Dialect::of(&p) == Some(d) {
        return Ok(k.clone());
    }
    let text = convert_program(&p, d, &k.name)?.text();
    // The converted text must read back as the same program (the type checker runs again
    // with the target opset's rules).
    let back = parse(&text).with_context(|| format!("kernel {} in the {} dialect", k.name, d.name()))?;
    if back.func != convert_program(&p, d, &k.name)?.func {
        bail!("kernel {}: the {} text does not read back as the same program", k.name, d.name());
    }
    Ok(KernelProgram { mil: text, ..k.clone() })
}

/// Rewrites every program a [`super::Hooked`] runner loads into dialect `d`: the training
/// kernels (written in ios18) reach the device, or the simulator, in the dialect the chip takes.
impl super::LoadHook for Dialect {
    fn before_load(&mut self, program: &KernelProgram) -> Result<Option<KernelProgram>> {
        convert(program, *self).map(Some)
    }
}

/// A runner that loads every program in a given dialect.
pub type DialectRunner = super::Hooked<Dialect>;
