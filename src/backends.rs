//! Choosing and building a backend by kind. This sits above `backend` (the kernel trait and
//! the `cpu` backend), `mil` (the MIL backend and its simulator) and `ane` (the device
//! runner), so that none of those needs to know about the others.

use crate::backend::{Backend, cpu::CpuBackend};
use crate::config::ModelConfig;
use crate::mil::backend::MilBackend;
use crate::mil::emit::InputLayout;
use crate::ops::Par;
use anyhow::{Result, ensure};

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
/// (`None`: `ANE_COMPILE_BUDGET`). Static mode bakes weights, so it ignores `layout`.
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
    let mil = |runner: Box<dyn crate::mil::KernelRunner>| -> Result<Box<dyn Backend>> {
        Ok(match mode {
            AneMode::Dynamic => Box::new(MilBackend::new(cfg, b, t, layout, runner)?),
            AneMode::Static { every } => Box::new(MilBackend::new_static(cfg, b, t, every, runner)?),
        })
    };
    match kind {
        BackendKind::Cpu => {
            ensure!(
                mode == AneMode::Dynamic,
                "--ane-mode static compiles weights into MIL programs: use it with --backend mil-sim or ane"
            );
            Ok(Box::new(CpuBackend::new(cfg, b, t, par)))
        }
        BackendKind::MilSim => mil(Box::new(crate::mil::sim::SimRunner::new(par))),
        BackendKind::Ane => {
            let budget = compile_budget.unwrap_or(ANE_COMPILE_BUDGET);
            let opts = crate::ane::AneOptions { compile_budget: budget, ..crate::ane::AneOptions::default() };
            mil(Box::new(crate::ane::AneRunner::new(opts)?))
        }
    }
}
