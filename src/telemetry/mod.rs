//! Telemetry: the run's log, one JSON object per line (`--log`), in the versioned schema that
//! `docs/TELEMETRY.md` documents. Every line carries a `type` tag: a `header` with the run's
//! configuration (again after each resume), an `update` per optimizer update, `eval`,
//! `checkpoint` and `loss_scale` events, and the final `report`. A resumed run appends.
//! Plots and the dashboard read logs with `read::LogReader`; the trainer never depends on them.

pub mod read;

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub use read::{LogReader, RunLog};

/// The `schema` field of every header.
pub const SCHEMA: &str = "anetrain-telemetry";
/// Bumped when a field changes meaning or disappears; adding fields keeps the version.
pub const SCHEMA_VERSION: u32 = 1;

/// serde_json writes non-finite floats as `null`; read them back as NaN.
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One line of the log.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Header(Box<Header>),
    Update(StepEvent),
    Eval(EvalEvent),
    Checkpoint(CheckpointEvent),
    LossScale(LossScaleEvent),
    Report(Report),
}

/// The first line a process writes: what is being trained, how, and from where.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Header {
    /// Always `anetrain-telemetry`.
    pub schema: String,
    /// `SCHEMA_VERSION` of the writer.
    pub version: u32,
    /// `anetrain <crate version>`.
    pub program: String,
    /// Seconds since the Unix epoch when this process started the run.
    pub started_unix_s: f64,
    /// The trainer's process id (readers may sample its CPU and memory while it lives).
    pub pid: u32,
    /// The checkpoint this process resumed from (absent for a fresh run).
    pub resumed_from: Option<String>,
    /// Updates already done when this process started: updates after it in earlier parts of
    /// the log are superseded by the ones that follow this header.
    pub start_step: usize,
    /// Model: preset name or config path, parameters, shape.
    pub model: String,
    pub params: usize,
    pub layers: usize,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    /// Training FLOPs per token (model count, forward + backward) at `seq`.
    pub flops_per_token: f64,
    pub backend: String,
    pub threads: usize,
    pub gemm: String,
    pub dw_overlap: bool,
    /// Where the training tokens come from.
    pub data: String,
    pub batch: usize,
    pub seq: usize,
    pub accum: usize,
    /// The run's total updates (`--steps`).
    pub steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub grad_clip: f64,
    /// `off`, `dynamic` or the fixed scale.
    pub loss_scale: String,
    pub eval_every: usize,
    pub eval_tokens: usize,
    pub seed: u64,
    pub ckpt_dir: Option<String>,
    pub ckpt_every: usize,
    /// GFLOP/s of a 1024³ GEMM measured before training (absent with `--no-peak`).
    pub gemm_peak_gflops: Option<f64>,
    /// The command line.
    pub args: Vec<String>,
}

impl Header {
    /// A header with the schema fields, the process and the clock filled in.
    pub fn new() -> Self {
        Header {
            schema: SCHEMA.into(),
            version: SCHEMA_VERSION,
            program: format!("anetrain {}", env!("CARGO_PKG_VERSION")),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            pid: std::process::id(),
            args: std::env::args().collect(),
            ..Default::default()
        }
    }
}

/// What happened in one optimizer update. Times are wall-clock milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepEvent {
    /// 1-based update number.
    pub step: usize,
    /// Mean training loss over the update's micro-batches.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    pub lr: f64,
    /// Global L2 norm of the gradient before clipping (null when not finite).
    #[serde(deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    /// The update was skipped because a gradient was not finite.
    pub skipped: bool,
    /// Loss scale used for this update's backward passes.
    pub loss_scale: f64,
    /// Mean loss on the validation data, when this update ended with an evaluation.
    pub val_loss: Option<f64>,
    /// Tokens processed in this update (B·T·accum).
    pub tokens: usize,
    /// Tokens processed since the run's first update (including those before a resume).
    #[serde(default)]
    pub tokens_seen: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub tokens_per_s: f64,
    pub ms_step: f64,
    pub ms_forward: f64,
    pub ms_backward: f64,
    pub ms_optimizer: f64,
    /// Inside backend kernel calls (forward and backward): a part of ms_forward + ms_backward.
    #[serde(default)]
    pub ms_kernels: f64,
    /// The per-layer weight-gradient GEMMs. With dW overlap they run on a worker thread
    /// beside the backward, so they are not a part of ms_backward.
    #[serde(default)]
    pub ms_dw: f64,
    /// Time the backward spent blocked on the dW worker (0 without overlap).
    #[serde(default)]
    pub ms_dw_wait: f64,
    /// Data-parallel runs: time blocked on the gradient exchange (after the last backward,
    /// and waiting for a bucket buffer during it); 0 for one process.
    #[serde(default)]
    pub ms_comm_wait: f64,
    /// Data-parallel runs: gradient bytes this rank sent in the update (0 for one process).
    #[serde(default)]
    pub comm_bytes: u64,
    /// Seconds since this process started the run.
    #[serde(default)]
    pub elapsed_s: f64,
    /// Resident memory of the process in MB after the update (Linux; the peak elsewhere;
    /// null where unknown).
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub rss_mb: f64,
    /// CPU time (user + system, all threads) the process has used so far, in seconds.
    #[serde(default)]
    pub cpu_s: f64,
}

/// An evaluation on the validation data after update `step`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalEvent {
    pub step: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub val_loss: f64,
    /// The lowest validation loss so far, this one included.
    #[serde(deserialize_with = "f64_or_nan")]
    pub best_val_loss: f64,
    /// This evaluation set a new lowest (with `--ckpt-dir`, `best/` was saved).
    pub improved: bool,
    /// Tokens evaluated.
    pub tokens: usize,
    pub ms: f64,
}

/// A checkpoint written after update `step`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointEvent {
    pub step: usize,
    pub path: String,
    /// `periodic` (`--ckpt-every`), `final`, `stop` (a stop request), `best`, or `restart`
    /// (before re-executing past the compile budget).
    pub kind: String,
    pub ms: f64,
}

/// The loss scale changed after update `step`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LossScaleEvent {
    pub step: usize,
    pub from: f64,
    pub to: f64,
    /// `overflow` (a non-finite gradient: the update was skipped) or `growth`.
    pub reason: String,
}

/// The efficiency report at the end of a process's run (also after a stop request).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The last update done.
    pub step: usize,
    /// The run stopped early on a stop request.
    pub interrupted: bool,
    /// Updates this process did.
    pub updates: usize,
    pub wall_s: f64,
    pub median_micro_ms: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub gemm_peak_gflops: Option<f64>,
    /// gflops / gemm_peak_gflops, in percent.
    pub share_of_peak_pct: Option<f64>,
    pub dw_overlap: bool,
    pub kernel_ms: f64,
    pub dw_ms: f64,
    pub dw_wait_ms: f64,
    /// Data-parallel runs: mean time per update blocked on the gradient exchange, and mean
    /// gradient bytes rank 0 sent per update (0 for one process).
    #[serde(default)]
    pub comm_wait_ms: f64,
    #[serde(default)]
    pub comm_bytes: u64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub peak_rss_mb: f64,
    pub cpu_s: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub first_loss: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub last_loss: f64,
}

/// The log writer. It also keeps what it wrote (and, when appending, what the file held) as
/// a `RunLog`, which the checkpoint plot is drawn from.
pub struct Telemetry {
    out: Option<BufWriter<File>>,
    path: Option<PathBuf>,
    pub history: RunLog,
}

impl Telemetry {
    /// No file; the history is still kept.
    pub fn none() -> Self {
        Telemetry { out: None, path: None, history: RunLog::default() }
    }

    /// Creates (truncates) the log file.
    pub fn to_file(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("cannot create telemetry log {}", path.display()))?;
        Ok(Telemetry { out: Some(BufWriter::new(file)), path: Some(path.to_path_buf()), history: RunLog::default() })
    }

    /// Opens the log for appending (a resumed run), creating it if missing. The earlier
    /// history is read into `history`; a last line cut off by a crash is ended with a newline
    /// first, so that it stays one bad line instead of corrupting the next record.
    pub fn append_to_file(path: &Path) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("cannot open telemetry log {} for appending", path.display()))?;
        let mut reader = LogReader::new(path);
        reader.poll().with_context(|| format!("cannot read telemetry log {}", path.display()))?;
        let len = file.seek(SeekFrom::End(0))?;
        if len > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").with_context(|| format!("cannot write telemetry log {}", path.display()))?;
            }
        }
        Ok(Telemetry { out: Some(BufWriter::new(file)), path: Some(path.to_path_buf()), history: reader.log })
    }

    /// Draws the history into `out` as PNG (the checkpoint directory's loss.png).
    pub fn plot(&self, out: &Path) -> Result<()> {
        let name = self.history.header().map_or_else(|| "run".to_string(), |h| h.model.clone());
        crate::plot::write(&[crate::plot::Run { name, log: &self.history }], out, crate::plot::Format::Png)
    }

    /// The log file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes one record as a JSON line and flushes, so a crash loses at most one line.
    pub fn record(&mut self, record: Record) -> Result<()> {
        if let Some(out) = &mut self.out {
            serde_json::to_writer(&mut *out, &record)?;
            out.write_all(b"\n")?;
            out.flush().context("cannot write telemetry log")?;
        }
        self.history.push(record);
        Ok(())
    }
}
