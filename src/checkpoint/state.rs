//! `state.json` of a training checkpoint: everything besides the tensors that a resume needs,
//! as serde-derived structs, validated field by field when read.
//!
//! Format version 2 (this build writes it) adds `files` — the XXH3-64 checksum of every other
//! file of the step directory, verified before anything is read — and `tokenizer` (the
//! tokenizer file saved beside the weights, when training used one), and spells the loss-scale
//! mode as `"dynamic"`, `"off"` or `{"fixed": 1024.0}`. Version 1 checkpoints (no checksums;
//! the mode as Rust's Debug text, e.g. `"Dynamic"`) still load, with a note that their files
//! cannot be verified.

use crate::config::ModelConfig;
use crate::train::loss_scale::LossScaleMode;
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

pub const FORMAT: &str = "anetrain-checkpoint";
/// The version this build writes.
pub const VERSION: u64 = 2;
/// Files every version-2 step directory lists in `files`.
pub const TENSOR_FILES: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];
/// Those of a LoRA run's step directory (a PEFT adapter directory plus the moments).
pub const LORA_FILES: [&str; 3] = ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"];

/// The checksummed files of a step directory.
pub fn tensor_files(lora: bool) -> &'static [&'static str] {
    if lora { &LORA_FILES } else { &TENSOR_FILES }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    pub version: u64,
    /// The model config with HF field names (`ModelConfig::to_hf_json`).
    pub config: Value,
    /// Optimizer updates completed (including skipped ones).
    pub step: u64,
    pub optimizer: OptimizerState,
    /// The sampler's xoshiro256** state, as 16 hex digits per word.
    pub sampler_rng: [String; 4],
    pub loss_scale: LossScaleState,
    pub train: TrainState,
    pub data: DataState,
    /// Lowest validation loss so far (null before the first evaluation).
    pub best_val_loss: Option<f64>,
    /// The tokenizer saved beside the weights (absent when training had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerState>,
    /// File name → `xxh3:<16 hex digits>` of every other file of the step directory
    /// (empty in version 1).
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// A LoRA run: the adapters' shape and what identifies the frozen base (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoraState {
    pub rank: usize,
    pub alpha: f64,
    /// Short target names (`q`, `k`, `v`, `o`, `gate`, `up`, `down`).
    pub targets: Vec<String>,
    /// `native::base_fingerprint` of the base arena the adapters were trained on.
    pub base_fingerprint: String,
    /// The frozen layers were held in bf16 (`--base-dtype bf16`).
    #[serde(default)]
    pub base_bf16: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OptimizerState {
    /// AdamW updates applied (≤ `step`: updates with a non-finite gradient are skipped).
    pub adam_step: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LossScaleState {
    pub mode: LossScaleMode,
    pub scale: f64,
    pub good_steps: u32,
}

/// The options of the run that wrote the checkpoint (batch, seq and accum must match on resume).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    pub steps: u64,
    pub batch: u64,
    pub seq: u64,
    pub accum: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub grad_clip: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataState {
    pub source: String,
    /// `data_fingerprint` of the training tokens.
    pub fingerprint: String,
    /// Fingerprint of the tokenizer that made the tokens, when known.
    pub tokenizer: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenizerState {
    /// `tokenizer.json` or `tokenizer.bin`, in the step directory.
    pub file: String,
    pub fingerprint: String,
    /// The Jinja chat template the training data was rendered with (or the `--init` model's),
    /// so that `chat` and `serve` can talk to the checkpoint without its data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

impl State {
    /// Parses and validates `text` (the contents of `path`): format and version first, so
    /// that another kind of file is named as such rather than by a missing field.
    pub fn parse(text: &str, path: &Path) -> Result<State> {
        let mut v: Value =
            serde_json::from_str(text).with_context(|| format!("{} is corrupt (not JSON)", path.display()))?;
        ensure!(v["format"] == FORMAT, "{} is not an anetrain checkpoint (format {})", path.display(), v["format"]);
        let version = v["version"].as_u64();
        match version {
            Some(1) => {
                // Version 1 wrote the mode as Debug text: Dynamic, Off, Fixed(1024.0).
                let mode = v["loss_scale"]["mode"].as_str().unwrap_or_default().to_string();
                v["loss_scale"]["mode"] = match mode.as_str() {
                    "Dynamic" => "dynamic".into(),
                    "Off" => "off".into(),
                    m => match m.strip_prefix("Fixed(").and_then(|r| r.strip_suffix(')')).map(str::parse::<f64>) {
                        Some(Ok(s)) => serde_json::json!({ "fixed": s }),
                        _ => bail!("{}: loss-scale mode '{m}' is not valid", path.display()),
                    },
                };
            }
            Some(VERSION) => {}
            _ => bail!(
                "{}: checkpoint version {} is not supported (this build reads 1 and {VERSION})",
                path.display(),
                v["version"]
            ),
        }
        let state: State = serde_json::from_value(v)
            .with_context(|| format!("{} is corrupt (a field is missing or invalid)", path.display()))?;
        state.validate().with_context(|| format!("{} is corrupt", path.display()))?;
        Ok(state)
    }

    /// Checks every value against what a real run can have written.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.step <= 1 << 40, "step {} is implausibly large", self.step);
        ensure!(
            self.optimizer.adam_step <= self.step,
            "optimizer.adam_step {} exceeds step {} (each update applies AdamW at most once)",
            self.optimizer.adam_step,
            self.step
        );
        let o = &self.optimizer;
        ensure!(
            (0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2) && o.eps > 0.0 && o.weight_decay >= 0.0,
            "optimizer settings (beta1 {}, beta2 {}, eps {}, weight_decay {}) are out of range",
            o.beta1,
            o.beta2,
            o.eps,
            o.weight_decay
        );
        let rng = self.sampler_rng()?;
        ensure!(rng != [0; 4], "sampler_rng is all zeros (not a valid generator state)");
        let ls = &self.loss_scale;
        ensure!(
            ls.scale.is_finite() && ls.scale >= 1.0 && ls.scale.log2().fract() == 0.0,
            "loss_scale.scale {} is not a power of two ≥ 1",
            ls.scale
        );
        let t = &self.train;
        ensure!(
            t.batch > 0 && t.seq > 0 && t.accum > 0 && t.steps > 0,
            "train.batch, seq, accum and steps must be positive"
        );
        if let Some(best) = self.best_val_loss {
            ensure!(best.is_finite() && best >= 0.0, "best_val_loss {best} is not a loss");
        }
        ensure!(!self.data.fingerprint.is_empty(), "data.fingerprint is empty");
        for name in self.files.keys().chain(self.tokenizer.as_ref().map(|t| &t.file)) {
            ensure!(
                !name.is_empty() && !name.contains(['/', '\\']) && name != ".." && name != "state.json",
                "file name '{name}' is not a plain file name of the step directory"
            );
        }
        if self.version >= 2 {
            let files = tensor_files(self.lora.is_some());
            for name in files.iter().chain(self.tokenizer.as_ref().map(|t| t.file.as_str()).as_ref()) {
                ensure!(self.files.contains_key(*name), "files has no checksum of {name}");
            }
        }
        ModelConfig::from_hf_json(&self.config).context("bad config")?;
        Ok(())
    }

    pub fn sampler_rng(&self) -> Result<[u64; 4]> {
        let mut out = [0u64; 4];
        for (o, s) in out.iter_mut().zip(&self.sampler_rng) {
            *o = u64::from_str_radix(s, 16).ok().filter(|_| s.len() == 16).context("sampler_rng is corrupt")?;
        }
        Ok(out)
    }
}
