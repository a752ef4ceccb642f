//! Choosing and building a backend by kind. This sits above `backend` (the kernel trait and
//! the `cpu` backend), `mil` (the MIL backend and its simulator) and `ane` (the device
//! runner), so that none of those needs to know about the others.

use crate::backend::{Backend, cpu::CpuBackend};
use crate::config::ModelConfig;
use crate::mil::backend::MilBackend;
use crate::mil::dialect::Dialect;
use crate::mil::dump::MilDump;
use crate::mil::emit::InputLayout;
use crate::mil::{Hooked, KernelRunner};
use crate::ops::Par;
use anyhow::{Result, ensure};
use std::path::PathBuf;

/// Which backend runs the kernel set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Native Rust kernels and a real GEMM, f32.
    Cpu,
    /// The generated MIL programs, run by the fp16 MIL simulator on the CPU.
    MilSim,
    /// The generated MIL programs on the Apple Neural Engine (macOS on Apple silicon only;
    /// compiled and unit-tested on Linux, never run by the authors on hardware).
    Ane,
}

/// How the MIL backends give kernels their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AneMode {
    /// Weights are kernel inputs, written when they change; each kernel is compiled once.
    Dynamic,
    /// Weights are baked into per-layer programs as constants and recompiled every `every`
    /// updates; in between, the kernels use the weights of their last compile (see
    /// `mil::backend`'s static-mode notes).
    Static { every: usize },
}

/// The Neural Engine runner's default compile budget (it fails past about 119 per process).
pub const ANE_COMPILE_BUDGET: usize = 100;

/// Builds a backend for micro-batches of B sequences of T positions. `layout` chooses how
/// the MIL backends pass weights to their kernels.
pub fn build(
    kind: BackendKind,
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    par: Par,
    layout: InputLayout,
) -> Result<Box<dyn Backend>> {
    build_with(kind, cfg, b, t, par, layout, AneMode::Dynamic, None)
}

/// `build` with a weight mode for the MIL backends and the `ane` runner's compile budget
/// (`None`: `ANE_COMPILE_BUDGET`). Static mode bakes weights, so it ignores `layout`. The MIL
/// dialect is chosen as `MilOptions::dialect` = None does (by the chip on `ane`).
#[allow(clippy::too_many_arguments)]
pub fn build_with(
    kind: BackendKind,
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    par: Par,
    layout: InputLayout,
    mode: AneMode,
    compile_budget: Option<usize>,
) -> Result<Box<dyn Backend>> {
    let opts = MilOptions { layout, mode, compile_budget, ..MilOptions::default() };
    Ok(build_mil(kind, cfg, b, t, par, &opts)?.0)
}

/// How the MIL backends (`mil-sim`, `ane`) are set up; ignored by `cpu` except that it
/// refuses a static mode or an explicit dialect (both mean MIL programs).
#[derive(Clone, Debug)]
pub struct MilOptions {
    pub layout: InputLayout,
    pub mode: AneMode,
    /// The `ane` runner's compile budget (`None`: `ANE_COMPILE_BUDGET`).
    pub compile_budget: Option<usize>,
    /// The MIL text dialect programs are loaded in (`--mil-dialect`); `None` (auto): on
    /// `ane` the one the chip's reported sub-type takes (`ane::chips`), on `mil-sim` ios18.
    /// The dialect changes only the spelling, never the arithmetic: runs in either are
    /// bit-identical on the simulator, so checkpoints do not record it.
    pub dialect: Option<Dialect>,
    /// Write every program, as loaded (in its dialect), under this directory (`--mil-dump`).
    pub dump: Option<PathBuf>,
}

impl Default for MilOptions {
    fn default() -> Self {
        MilOptions {
            layout: InputLayout::Packed,
            mode: AneMode::Dynamic,
            compile_budget: None,
            dialect: None,
            dump: None,
        }
    }
}

/// Builds a backend as `build_with` does, from `opts`; also returns, for the MIL backends, a
/// line saying which dialect its programs load in and why. An explicit dialect the chip is
/// known not to take is refused, saying which to use.
pub fn build_mil(
    kind: BackendKind,
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    par: Par,
    opts: &MilOptions,
) -> Result<(Box<dyn Backend>, Option<String>)> {
    let mil = |runner: Box<dyn KernelRunner>, dialect: Dialect| -> Result<Box<dyn Backend>> {
        // The dump sits below the rewrite, so it records what the device receives.
        let runner = match &opts.dump {
            Some(dir) => Box::new(Hooked::new(runner, MilDump::new(dir)?)),
            None => runner,
        };
        // ios18 is the emitter's own dialect: loading it needs no rewrite.
        let runner = match dialect {
            Dialect::Ios18 => runner,
            d => Box::new(Hooked::new(runner, d)),
        };
        Ok(match opts.mode {
            AneMode::Dynamic => Box::new(MilBackend::new(cfg, b, t, opts.layout, runner)?),
            AneMode::Static { every } => Box::new(MilBackend::new_static(cfg, b, t, every, runner)?),
        })
    };
    match kind {
        BackendKind::Cpu => {
            ensure!(
                opts.mode == AneMode::Dynamic,
                "--ane-mode static compiles weights into MIL programs: use it with --backend mil-sim or ane"
            );
            ensure!(
                opts.dialect.is_none() && opts.dump.is_none(),
                "--mil-dialect and --mil-dump concern MIL programs, which the cpu backend does not run: use --backend mil-sim or ane"
            );
            Ok((Box::new(CpuBackend::new(cfg, b, t, par)), None))
        }
        BackendKind::MilSim => {
            let (d, why) = match opts.dialect {
                Some(d) => (d, "--mil-dialect"),
                None => (Dialect::Ios18, "auto: the simulator's default"),
            };
            let note = format!("MIL dialect {} ({why})", d.name());
            Ok((mil(Box::new(crate::mil::sim::SimRunner::new(par)), d)?, Some(note)))
        }
        BackendKind::Ane => {
            let budget = opts.compile_budget.unwrap_or(ANE_COMPILE_BUDGET);
            let ane_opts = crate::ane::AneOptions { compile_budget: budget, ..crate::ane::AneOptions::default() };
            let runner = crate::ane::AneRunner::new(ane_opts)?;
            let (d, why) = crate::ane::chips::choose_dialect(runner.sub_type().as_deref(), opts.dialect)?;
            Ok((mil(Box::new(runner), d)?, Some(format!("MIL {why}"))))
        }
    }
}
