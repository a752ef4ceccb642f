//! Telemetry: one JSON object per optimizer update, one per line, to a file (`--log`).
//! Dashboards, plots and benchmark scripts read these; the trainer never depends on them.

use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// What happened in one optimizer update. Times are wall-clock milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepEvent {
    /// 1-based update number.
    pub step: usize,
    /// Mean training loss over the update's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// The update was skipped because a gradient was not finite.
    pub skipped: bool,
    /// Loss scale used for this update's backward passes.
    pub loss_scale: f64,
    /// Mean loss on the validation data, when this update ended with an evaluation.
    pub val_loss: Option<f64>,
    /// Tokens processed in this update (B·T·accum).
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub ms_step: f64,
    pub ms_forward: f64,
    pub ms_backward: f64,
    pub ms_optimizer: f64,
    /// Inside backend kernel calls (forward and backward): a part of ms_forward + ms_backward.
    pub ms_kernels: f64,
    /// The per-layer weight-gradient GEMMs. With dW overlap they run on a worker thread
    /// beside the backward, so they are not a part of ms_backward.
    pub ms_dw: f64,
    /// Time the backward spent blocked on the dW worker (0 without overlap).
    pub ms_dw_wait: f64,
}

pub struct Telemetry {
    out: Option<BufWriter<File>>,
}

impl Telemetry {
    pub fn none() -> Self {
        Telemetry { out: None }
    }

    /// Creates (truncates) the log file.
    pub fn to_file(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("cannot create telemetry log {}", path.display()))?;
        Ok(Telemetry { out: Some(BufWriter::new(file)) })
    }

    /// Writes one event as a JSON line and flushes, so a crash loses at most one line.
    pub fn record<T: Serialize>(&mut self, event: &T) -> Result<()> {
        if let Some(out) = &mut self.out {
            serde_json::to_writer(&mut *out, event)?;
            out.write_all(b"\n")?;
            out.flush().context("cannot write telemetry log")?;
        }
        Ok(())
    }
}
