//! Training checkpoints: everything needed to continue a run bit for bit.
//!
//! `<dir>/step-00000100/` holds `model.safetensors` (the weights under their HF names),
//! `optimizer.safetensors` (`m.<name>`, `v.<name>`: the AdamW moments), the tokenizer the
//! tokens were made with (`tokenizer.json` or `tokenizer.bin`, when training had one) and
//! `state.json` (see `state.rs`: format version, model config, updates done, optimizer and
//! sampler state, training options, a fingerprint of the token data, and a checksum of every
//! other file, verified on every load). A checkpoint is written into `step-….tmp`, every file
//! fsynced, then renamed into place, and only then is `<dir>/latest` (the name of the newest
//! step directory) replaced atomically — a crash at any point leaves the previous checkpoint
//! whole and `latest` pointing at it. `<dir>/best` holds the state with the lowest validation
//! loss seen so far, replaced the same way. `rundir.rs` keeps one run per directory.

use super::safetensors::{self, Dtype, SafeTensors};
use super::state::{DataState, LoraState, LossScaleState, OptimizerState, TokenizerState, TrainState};
pub use super::state::{FORMAT, State, VERSION};
use crate::config::ModelConfig;
use crate::data::TokenData;
use crate::lora::{LoraConfig, LoraLayout, Target, peft};
use crate::params::ParamLayout;
use crate::tokenizer::Tokenizer;
use crate::train::Trainer;
use crate::train::loss_scale::LossScaleMode;
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What identifies a token file well enough to refuse resuming on another one: its length and
/// an FNV-1a hash of up to 2²⁰ evenly spaced tokens.
pub fn data_fingerprint(data: &TokenData) -> String {
    let n = data.len();
    let stride = (n >> 20).max(1);
    let mut h = crate::hash::Fnv1a::default();
    for i in (0..n).step_by(stride) {
        h.bytes(&data.get(i).to_le_bytes());
    }
    format!("{n}:{:016x}", h.finish())
}

/// What identifies a frozen LoRA base well enough to refuse resuming on another: its length
/// `n` and an FNV-1a hash of the f32 bits (`bits_at(i)`) of up to 2¹⁶ evenly spaced weights.
pub fn base_fingerprint(n: usize, bits_at: impl Fn(usize) -> u32) -> String {
    let stride = (n >> 16).max(1);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in (0..n).step_by(stride) {
        for b in bits_at(i).to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{n}:{h:016x}")
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub cfg: ModelConfig,
    /// The weights; empty for a LoRA checkpoint (its base is not saved: see `lora`).
    pub params: Vec<f32>,
    /// A LoRA run's adapter layout and adapters (the step directory is also a PEFT adapter
    /// directory).
    pub lora: Option<(LoraLayout, Vec<f32>)>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Optimizer updates completed.
    pub step: usize,
    pub state: State,
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
    if let (Some(l), Some(layout)) = (&trainer.lora, trainer.model.lora())
        && let Some(t) = layout.tensors.iter().find(|t| l.adapters[t.range()].iter().any(|x| !x.is_finite()))
    {
        bail!(
            "the adapter '{}' became NaN or Inf by update {step}; not overwriting the last good checkpoint \
             (lower --lr)",
            t.name
        );
    }
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
    crate::fsio::write_atomically(&dir.join("latest"), |out| std::io::Write::write_all(out, name.as_bytes()))?;
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
    let mut lora_state = None;
    if let (Some(l), Some(lora)) = (&trainer.lora, trainer.model.lora()) {
        // The step directory is a PEFT adapter directory; the frozen base is not saved.
        peft::save(tmp, lora, &l.adapters, &trainer.model.cfg.name)?;
        let mut opt = peft::tensors_out(&lora.tensors, &trainer.opt.m, "m.");
        opt.extend(peft::tensors_out(&lora.tensors, &trainer.opt.v, "v."));
        safetensors::write(&tmp.join("optimizer.safetensors"), &opt, &BTreeMap::new())?;
        lora_state = Some(LoraState {
            rank: lora.cfg.rank,
            alpha: lora.cfg.alpha,
            targets: lora.cfg.targets.iter().map(|t| t.short().to_string()).collect(),
            base_fingerprint: trainer.base_fingerprint(),
            base_bf16: trainer.opts.base_bf16,
        });
    } else {
        let tensors = |prefix: &str, buf| super::arena_tensors(layout, buf, prefix, Dtype::F32);
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::write(&tmp.join("model.safetensors"), &tensors("", &trainer.params), &meta)?;
        let mut opt = tensors("m.", &trainer.opt.m);
        opt.extend(tensors("v.", &trainer.opt.v));
        safetensors::write(&tmp.join("optimizer.safetensors"), &opt, &BTreeMap::new())?;
    }
    let tokenizer = match &trainer.tokenizer {
        Some(tok) => {
            let path = tok.save_to_dir(tmp)?;
            let file = path.file_name().context("tokenizer file name")?.to_string_lossy().into_owned();
            Some(TokenizerState {
                file,
                fingerprint: tok.fingerprint.clone(),
                chat_template: trainer.chat_template.clone(),
            })
        }
        None => None,
    };
    // Checksums of what is on disk now, before state.json (written last) commits to them.
    let mut files = BTreeMap::new();
    let tensor_files = super::state::tensor_files(lora_state.is_some());
    for name in tensor_files.iter().copied().chain(tokenizer.as_ref().map(|t| t.file.as_str())) {
        files.insert(name.to_string(), crate::hash::file_checksum(&tmp.join(name))?);
    }
    let o = &trainer.opts;
    let state = State {
        format: FORMAT.into(),
        version: VERSION,
        config: trainer.model.cfg.to_hf_json(),
        step: step as u64,
        optimizer: OptimizerState {
            adam_step: trainer.opt.step,
            beta1: o.adamw.beta1,
            beta2: o.adamw.beta2,
            eps: o.adamw.eps,
            weight_decay: o.adamw.weight_decay,
        },
        sampler_rng: trainer.sampler.rng.state().map(|x| format!("{x:016x}")),
        loss_scale: LossScaleState {
            mode: trainer.scaler.mode,
            scale: trainer.scaler.scale as f64,
            good_steps: trainer.scaler.good_steps,
        },
        train: TrainState {
            steps: o.steps as u64,
            batch: o.batch as u64,
            seq: o.seq as u64,
            accum: o.accum as u64,
            lr: o.schedule_lr,
            min_lr: o.min_lr,
            warmup: o.warmup as u64,
            grad_clip: o.grad_clip,
            seed: o.seed,
        },
        data: DataState {
            source: data.source.clone(),
            fingerprint: data_fingerprint(data),
            tokenizer: data.tokenizer.clone(),
        },
        best_val_loss: Some(trainer.best_val_loss).filter(|l| l.is_finite()),
        tokenizer,
        files,
        lora: lora_state,
    };
    let text = serde_json::to_string_pretty(&state)?;
    crate::fsio::write_atomically(&tmp.join("state.json"), |out| std::io::Write::write_all(out, text.as_bytes()))
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

/// `spec` is a step directory, a checkpoint directory (then its `latest` is used), or the
/// `latest` file itself.
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    if is_latest_file(spec) {
        return resolve(spec.parent().context("`latest` has no directory")?);
    }
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

/// Reads and validates the `state.json` of the step directory `path`.
pub fn read_state(path: &Path) -> Result<State> {
    let state_path = path.join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    State::parse(&text, &state_path)
}

/// Checks `name` of the step directory `path` against its checksum in `state` (version 2).
fn verify_file(path: &Path, state: &State, name: &str) -> Result<()> {
    let Some(want) = state.files.get(name) else { return Ok(()) };
    let file = path.join(name);
    let got = crate::hash::file_checksum(&file)?;
    ensure!(
        &got == want,
        "{} is corrupt: its checksum is {got}, state.json recorded {want} (the file changed after the checkpoint \
         was written; resume from another step directory)",
        file.display()
    );
    Ok(())
}

/// Loads a checkpoint (`spec` as `resolve` takes it), verifying every file's checksum first.
pub fn load(spec: &Path) -> Result<Checkpoint> {
    let path = resolve(spec)?;
    let state = read_state(&path)?;
    if state.files.is_empty() {
        eprintln!(
            "note: {} is a version-{} checkpoint without checksums; its files cannot be verified",
            path.display(),
            state.version
        );
    }
    for name in state.files.keys() {
        verify_file(&path, &state, name)?;
    }
    let cfg = ModelConfig::from_hf_json(&state.config)
        .with_context(|| format!("{}: bad config", path.join("state.json").display()))?;
    let step = state.step as usize;
    let layout = ParamLayout::new(&cfg);
    if let Some(l) = &state.lora {
        let lcfg = LoraConfig { rank: l.rank, alpha: l.alpha, targets: Target::parse_list(&l.targets.join(","))? };
        let (lora, adapters) = peft::load(&path, &cfg, &layout)?;
        ensure!(lora.cfg == lcfg, "{}: adapter_config.json disagrees with state.json", path.display());
        let optimizer = SafeTensors::open(&path.join("optimizer.safetensors"))?;
        let m = peft::read_tensors(&optimizer, &lora.tensors, lora.total, "m.")?;
        let v = peft::read_tensors(&optimizer, &lora.tensors, lora.total, "v.")?;
        return Ok(Checkpoint { path, cfg, params: Vec::new(), lora: Some((lora, adapters)), m, v, step, state });
    }
    let weights = SafeTensors::open(&path.join("model.safetensors"))?;
    let params = super::read_arena(&layout, "", |_| &weights)?;
    if let Some(t) = layout.first_nonfinite(&params) {
        bail!("{}: tensor '{}' contains NaN or Inf", path.display(), t.name);
    }
    let optimizer = SafeTensors::open(&path.join("optimizer.safetensors"))?;
    let (m, v) = (super::read_arena(&layout, "m.", |_| &optimizer)?, super::read_arena(&layout, "v.", |_| &optimizer)?);
    Ok(Checkpoint { path, cfg, params, lora: None, m, v, step, state })
}

/// The tokenizer saved with the checkpoint `spec` (checksum verified), if training had one.
pub fn saved_tokenizer(spec: &Path) -> Result<Option<Tokenizer>> {
    let path = resolve(spec)?;
    let state = read_state(&path)?;
    let Some(t) = &state.tokenizer else { return Ok(None) };
    verify_file(&path, &state, &t.file)?;
    let tok = Tokenizer::load(&path.join(&t.file))?;
    ensure!(
        tok.fingerprint == t.fingerprint,
        "{}: the tokenizer file has fingerprint {}, state.json recorded {}",
        path.display(),
        tok.fingerprint,
        t.fingerprint
    );
    Ok(Some(tok))
}

/// The chat template saved with the checkpoint `spec`, if its training data had one.
pub fn saved_chat_template(spec: &Path) -> Result<Option<String>> {
    let state = read_state(&resolve(spec)?)?;
    Ok(state.tokenizer.and_then(|t| t.chat_template))
}

/// The fingerprint of the tokenizer the checkpoint `spec` was trained with, when recorded (the
/// saved tokenizer's, else the token files').
pub fn recorded_tokenizer(spec: &Path) -> Result<Option<String>> {
    let state = read_state(&resolve(spec)?)?;
    Ok(state.tokenizer.map(|t| t.fingerprint).or(state.data.tokenizer))
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
        let st = &self.state;
        if let (Some(saved), Some(now)) = (st.data.tokenizer.as_deref(), data.tokenizer.as_deref()) {
            ensure!(
                saved == now,
                "cannot resume from {}: it was trained on tokens from tokenizer {saved}, {} comes from {now}",
                self.path.display(),
                data.source
            );
        }
        let fp = data_fingerprint(data);
        // Same name, other tokens: say what makes them differ rather than "X, not X".
        ensure!(
            fp == st.data.fingerprint || st.data.source != data.source,
            "cannot resume from {}: its {} tokens differ from these (fingerprint {}, now {fp}); {}",
            self.path.display(),
            data.source,
            st.data.fingerprint,
            if data.source.starts_with("synthetic") {
                "synthetic data is generated from --seed: resume with the run's original --seed"
            } else {
                "the data changed since the checkpoint (or another --seed generated it)"
            }
        );
        ensure!(
            fp == st.data.fingerprint,
            "cannot resume from {}: it was trained on \"{}\" (fingerprint {}), not \"{}\" ({fp})",
            self.path.display(),
            st.data.source,
            st.data.fingerprint,
            data.source
        );
        let t = &st.train;
        for (key, saved, ours) in [
            ("batch", t.batch, trainer.opts.batch),
            ("seq", t.seq, trainer.opts.seq),
            ("accum", t.accum, trainer.opts.accum),
        ] {
            ensure!(
                saved == ours as u64,
                "cannot resume from {}: --{key} was {saved} there, {ours} now",
                self.path.display()
            );
        }
        let base_now = trainer.lora.is_some().then(|| trainer.base_fingerprint());
        match (&self.lora, &mut trainer.lora, trainer.model.lora(), &st.lora) {
            (None, None, _, _) => trainer.params.copy_from_slice(&self.params),
            (Some((saved, adapters)), Some(ours), Some(layout), Some(ls)) => {
                ensure!(
                    saved.cfg == layout.cfg,
                    "cannot resume from {}: its LoRA adapters are {:?}, this run's {:?}",
                    self.path.display(),
                    saved.cfg,
                    layout.cfg
                );
                let dtype = |bf16: bool| if bf16 { "bf16" } else { "f32" };
                ensure!(
                    ls.base_bf16 == trainer.opts.base_bf16,
                    "cannot resume from {}: its base was held in {}, this run's in {} (--base-dtype {})",
                    self.path.display(),
                    dtype(ls.base_bf16),
                    dtype(trainer.opts.base_bf16),
                    dtype(ls.base_bf16)
                );
                let now = base_now.unwrap_or_default();
                ensure!(
                    ls.base_fingerprint == now,
                    "cannot resume from {}: its adapters were trained on another base model (fingerprint {}, \
                     this run's base {now}); pass the same --init",
                    self.path.display(),
                    ls.base_fingerprint
                );
                ours.adapters.copy_from_slice(adapters);
            }
            (Some(_), ..) => {
                bail!("cannot resume from {}: it holds LoRA adapters; add --lora-rank", self.path.display())
            }
            (None, ..) => {
                bail!("cannot resume from {}: it is a full fine-tuning checkpoint, not LoRA", self.path.display())
            }
        }
        trainer.params_changed();
        trainer.opt.m.copy_from_slice(&self.m);
        trainer.opt.v.copy_from_slice(&self.v);
        trainer.opt.step = st.optimizer.adam_step;
        trainer.sampler.rng = crate::rng::Rng::from_state(st.sampler_rng()?);
        // A dynamic scale continues where it was; a run resumed with another --loss-scale mode
        // starts that mode afresh (the mode may change on resume).
        let ls = &st.loss_scale;
        if trainer.scaler.mode == LossScaleMode::Dynamic && ls.mode == LossScaleMode::Dynamic {
            trainer.scaler.scale = ls.scale as f32;
            trainer.scaler.good_steps = ls.good_steps;
        }
        trainer.best_val_loss = st.best_val_loss.unwrap_or(f64::INFINITY);
        trainer.start_step = self.step;
        Ok(())
    }
}

/// Whether `path` is a checkpoint directory's `latest` file.
pub fn is_latest_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "latest") && path.is_file()
}
