//! Training checkpoints: everything needed to continue a run bit for bit.
//!
//! `<dir>/step-00000100/` holds `model.safetensors` (the weights under their HF names),
//! `optimizer.safetensors` (`m.<name>`, `v.<name>`: the AdamW moments) and `state.json`
//! (format version, model config, updates done, optimizer and sampler state, training options,
//! and a fingerprint of the token data). A checkpoint is written into `step-….tmp`, every file
//! fsynced, then renamed into place, and only then is `<dir>/latest` (the name of the newest
//! step directory) replaced atomically — a crash at any point leaves the previous checkpoint
//! whole and `latest` pointing at it. `<dir>/best` holds the state with the lowest validation
//! loss seen so far, replaced the same way.

use super::safetensors::{self, Dtype, SafeTensors};
use crate::config::ModelConfig;
use crate::data::TokenData;
use crate::params::ParamLayout;
use crate::train::Trainer;
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "anetrain-checkpoint";
pub const VERSION: u64 = 1;

/// What identifies a token file well enough to refuse resuming on another one: its length and
/// an FNV-1a hash of up to 2²⁰ evenly spaced tokens.
pub fn data_fingerprint(data: &TokenData) -> String {
    let n = data.len();
    let stride = (n >> 20).max(1);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in (0..n).step_by(stride) {
        for b in data.get(i).to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{n}:{h:016x}")
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Optimizer updates completed.
    pub step: usize,
    pub state: Value,
}

fn hex(state: [u64; 4]) -> Vec<String> {
    state.iter().map(|x| format!("{x:016x}")).collect()
}

/// Fails now, rather than after hours of training, if checkpoints cannot be written to `dir`.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").with_context(|| format!("checkpoint directory {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("cannot clean up in {}", dir.display()))?;
    Ok(())
}

/// Writes the trainer's state after `step` completed updates; returns the step directory.
pub fn save(dir: &Path, trainer: &Trainer, step: usize, data: &TokenData, keep_last: usize) -> Result<PathBuf> {
    if let Some(t) = trainer.model.layout.first_nonfinite(&trainer.params) {
        bail!(
            "the weights of '{}' became NaN or Inf by update {step}; not overwriting the last good checkpoint \
             (lower --lr, or check --adam-eps and the data)",
            t.name
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let name = format!("step-{step:08}");
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    // Half-written directories of runs killed mid-write are never read; clear them.
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        if (entry_name.ends_with(".tmp") || entry_name.ends_with(".old")) && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot clear {}", entry.path().display()))?;
        }
    }
    write_dir(&tmp, &final_dir, |tmp| write_step(tmp, trainer, step, data))?;
    safetensors::write_atomically(&dir.join("latest"), |out| std::io::Write::write_all(out, name.as_bytes()))?;
    prune(dir, keep_last, &name)?;
    Ok(final_dir)
}

/// Fills `tmp` with `fill`, then puts it in place of `final_dir`. An existing `final_dir` is
/// moved aside first and removed last, so that at every moment one complete copy exists.
fn write_dir(tmp: &Path, final_dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    std::fs::create_dir(tmp).with_context(|| format!("cannot write to checkpoint directory {}", tmp.display()))?;
    if let Err(e) = fill(tmp) {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    let mut old_name = final_dir.file_name().context("checkpoint directory name")?.to_os_string();
    old_name.push(".old");
    let old = final_dir.with_file_name(old_name);
    if final_dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(final_dir, &old).with_context(|| format!("cannot move {} aside", final_dir.display()))?;
    }
    std::fs::rename(tmp, final_dir).with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Writes the trainer's state as `<dir>/best` (replacing the previous best) after an
/// evaluation reached a new lowest validation loss.
pub fn save_best(dir: &Path, trainer: &Trainer, step: usize, data: &TokenData) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let best = dir.join("best");
    let tmp = dir.join("best.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    write_dir(&tmp, &best, |tmp| write_step(tmp, trainer, step, data))?;
    Ok(best)
}

fn write_step(tmp: &Path, trainer: &Trainer, step: usize, data: &TokenData) -> Result<()> {
    let layout = &trainer.model.layout;
    let tensors = |prefix: &str, buf| super::arena_tensors(layout, buf, prefix, Dtype::F32);
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::write(&tmp.join("model.safetensors"), &tensors("", &trainer.params), &meta)?;
    let mut opt = tensors("m.", &trainer.opt.m);
    opt.extend(tensors("v.", &trainer.opt.v));
    safetensors::write(&tmp.join("optimizer.safetensors"), &opt, &BTreeMap::new())?;
    let o = &trainer.opts;
    let state = json!({
        "format": FORMAT,
        "version": VERSION,
        "config": trainer.model.cfg.to_hf_json(),
        "step": step,
        "optimizer": {
            "adam_step": trainer.opt.step,
            "beta1": o.adamw.beta1, "beta2": o.adamw.beta2, "eps": o.adamw.eps,
            "weight_decay": o.adamw.weight_decay,
        },
        "sampler_rng": hex(trainer.sampler.rng.state()),
        "loss_scale": {
            "mode": format!("{:?}", trainer.scaler.mode),
            "scale": trainer.scaler.scale,
            "good_steps": trainer.scaler.good_steps,
        },
        "train": {
            "steps": o.steps, "batch": o.batch, "seq": o.seq, "accum": o.accum,
            "lr": o.schedule_lr, "min_lr": o.min_lr, "warmup": o.warmup,
            "grad_clip": o.grad_clip, "seed": o.seed,
        },
        "data": { "source": data.source, "fingerprint": data_fingerprint(data), "tokenizer": data.tokenizer },
        "best_val_loss": if trainer.best_val_loss.is_finite() { Value::from(trainer.best_val_loss) } else { Value::Null },
    });
    let text = serde_json::to_string_pretty(&state)?;
    safetensors::write_atomically(&tmp.join("state.json"), |out| std::io::Write::write_all(out, text.as_bytes()))
}

/// Removes the oldest `step-*` directories beyond `keep_last` (0 keeps all), never `current`.
fn prune(dir: &Path, keep_last: usize, current: &str) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    // Sorted by step number: names are zero-padded to 8 digits, but steps may outgrow that.
    let mut steps: Vec<(u64, String)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| Some((n.strip_prefix("step-")?.parse::<u64>().ok()?, n)))
        .collect();
    steps.sort();
    let steps: Vec<String> = steps.into_iter().map(|(_, n)| n).collect();
    let excess = steps.len().saturating_sub(keep_last);
    for name in steps.into_iter().take(excess).filter(|n| n != current) {
        std::fs::remove_dir_all(dir.join(&name)).with_context(|| format!("cannot remove old checkpoint {name}"))?;
    }
    Ok(())
}

/// `spec` is a step directory, or a checkpoint directory (then its `latest` is used).
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    let latest = spec.join("latest");
    if latest.is_file() {
        let name = std::fs::read_to_string(&latest).with_context(|| format!("cannot read {}", latest.display()))?;
        let name = name.trim();
        ensure!(name.starts_with("step-") && !name.contains('/'), "{} is corrupt", latest.display());
        return Ok(spec.join(name));
    }
    ensure!(spec.join("state.json").is_file(), "{} is not a checkpoint (no state.json and no latest)", spec.display());
    Ok(spec.to_path_buf())
}

pub fn load(spec: &Path) -> Result<Checkpoint> {
    let path = resolve(spec)?;
    let state_path = path.join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt (not JSON)", state_path.display()))?;
    ensure!(
        state["format"] == FORMAT,
        "{} is not an anetrain checkpoint (format {})",
        state_path.display(),
        state["format"]
    );
    ensure!(
        state["version"].as_u64() == Some(VERSION),
        "{}: checkpoint version {} is not supported (this build reads {VERSION})",
        state_path.display(),
        state["version"]
    );
    let cfg =
        ModelConfig::from_hf_json(&state["config"]).with_context(|| format!("{}: bad config", state_path.display()))?;
    let step = state["step"].as_u64().with_context(|| format!("{}: no step", state_path.display()))? as usize;
    let layout = ParamLayout::new(&cfg);
    let weights = SafeTensors::open(&path.join("model.safetensors"))?;
    let params = super::read_arena(&layout, "", |_| &weights)?;
    if let Some(t) = layout.first_nonfinite(&params) {
        bail!("{}: tensor '{}' contains NaN or Inf", path.display(), t.name);
    }
    let optimizer = SafeTensors::open(&path.join("optimizer.safetensors"))?;
    let (m, v) = (super::read_arena(&layout, "m.", |_| &optimizer)?, super::read_arena(&layout, "v.", |_| &optimizer)?);
    Ok(Checkpoint { path, cfg, params, m, v, step, state })
}

impl Checkpoint {
    /// Restores the trainer to this checkpoint, refusing a different model or token data.
    pub fn restore(&self, trainer: &mut Trainer, data: &TokenData) -> Result<()> {
        let mut ours = trainer.model.cfg.clone();
        ours.name = self.cfg.name.clone();
        if ours != self.cfg {
            let (a, b) = (self.cfg.to_hf_json(), ours.to_hf_json());
            let diffs: Vec<String> = a
                .as_object()
                .expect("object")
                .iter()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k}: {v} in the checkpoint, {} now", b[k.as_str()]))
                .collect();
            bail!(
                "cannot resume from {}: its model config differs from --model ({})",
                self.path.display(),
                diffs.join("; ")
            );
        }
        if let (Some(saved), Some(now)) = (self.state["data"]["tokenizer"].as_str(), data.tokenizer.as_deref()) {
            ensure!(
                saved == now,
                "cannot resume from {}: it was trained on tokens from tokenizer {saved}, {} comes from {now}",
                self.path.display(),
                data.source
            );
        }
        let fp = data_fingerprint(data);
        let saved = self.state["data"]["fingerprint"].as_str().unwrap_or("");
        ensure!(
            fp == saved,
            "cannot resume from {}: it was trained on {} (fingerprint {saved}), not {} ({fp})",
            self.path.display(),
            self.state["data"]["source"],
            data.source
        );
        let t = &self.state["train"];
        for (key, ours) in [("batch", trainer.opts.batch), ("seq", trainer.opts.seq), ("accum", trainer.opts.accum)] {
            ensure!(
                t[key].as_u64() == Some(ours as u64),
                "cannot resume from {}: --{key} was {} there, {ours} now",
                self.path.display(),
                t[key]
            );
        }
        let rng: Vec<u64> = self.state["sampler_rng"]
            .as_array()
            .context("checkpoint has no sampler state")?
            .iter()
            .map(|s| s.as_str().and_then(|s| u64::from_str_radix(s, 16).ok()))
            .collect::<Option<_>>()
            .context("checkpoint sampler state is corrupt")?;
        ensure!(rng.len() == 4, "checkpoint sampler state is corrupt");
        trainer.params.copy_from_slice(&self.params);
        trainer.params_changed();
        trainer.opt.m.copy_from_slice(&self.m);
        trainer.opt.v.copy_from_slice(&self.v);
        trainer.opt.step = self.state["optimizer"]["adam_step"].as_u64().context("no optimizer step")?;
        trainer.sampler.rng = crate::rng::Rng::from_state([rng[0], rng[1], rng[2], rng[3]]);
        // A dynamic scale continues where it was; a run resumed with another --loss-scale mode
        // starts that mode afresh (the mode may change on resume).
        let ls = &self.state["loss_scale"];
        if trainer.scaler.mode == crate::train::loss_scale::LossScaleMode::Dynamic && ls["mode"] == "Dynamic" {
            let scale = ls["scale"].as_f64().context("checkpoint has no loss scale")?;
            ensure!(scale.is_finite() && scale >= 1.0, "checkpoint loss scale {scale} is corrupt");
            trainer.scaler.scale = scale as f32;
            trainer.scaler.good_steps =
                ls["good_steps"].as_u64().context("checkpoint has no loss-scale counter")? as u32;
        }
        trainer.best_val_loss = self.state["best_val_loss"].as_f64().unwrap_or(f64::INFINITY);
        trainer.start_step = self.step;
        Ok(())
    }
}
