//! Choosing and building a backend by kind. This sits above `backend` (the kernel trait and
//! the `cpu` backend), `mil` (the MIL backend and its simulator) and `ane` (the device
//! runner), so that none of those needs to know about the others.

use crate::backend::{Backend, cpu::CpuBackend};
use crate::config::ModelConfig;
use crate::mil::backend::MilBackend;
use crate::mil::emit::InputLayout;
use crate::ops::Par;
use anyhow::Result;

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
    Ok(match kind {
        BackendKind::Cpu => Box::new(CpuBackend::new(cfg, b, t, par)),
        BackendKind::MilSim => {
            Box::new(MilBackend::new(cfg, b, t, layout, Box::new(crate::mil::sim::SimRunner::new(par)))?)
        }
        BackendKind::Ane => {
            let runner = crate::ane::AneRunner::new(crate::ane::AneOptions::default())?;
            Box::new(MilBackend::new(cfg, b, t, layout, Box::new(runner))?)
        }
    })
}
