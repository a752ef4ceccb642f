//! Training: a trainer over a model's weights (or a preset's seeded initialisation), one
//! AdamW update per call on the caller's tokens, and checkpoints written by the project's
//! checkpoint writer (atomic, the directory locked while it writes).

use crate::args::{out_ptr, slice, text, write};
use crate::error::{AnetrainStatus, Res, fail, guard, with_status};
use crate::handles::{self, Kind};
use crate::model::{AnetrainModel, model};
use anetrain::config::ModelConfig;
use anetrain::data::TokenData;
use anetrain::tokenizer::Tokenizer;
use anetrain::train::{TrainOptions, Trainer};
use std::ffi::c_char;

/// A trainer made by `anetrain_trainer_from_model` or `anetrain_trainer_from_preset`. The zero
/// handle is never valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnetrainTrainer {
    pub id: u64,
}

/// A trainer's settings. Fill one with `anetrain_trainer_config_default`, then change what
/// you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AnetrainTrainerConfig {
    /// B: sequences per update.
    pub batch: usize,
    /// T: positions per sequence (each sequence is a row of T + 1 tokens).
    pub seq: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// The learning rate the cosine schedule decays to by update `steps` (equal to `lr`:
    /// constant).
    pub min_lr: f64,
    /// Updates of linear warm-up to `lr`.
    pub warmup: usize,
    /// Length of the schedule in updates (recorded in checkpoints: `anetrain train --resume`
    /// continues up to it).
    pub steps: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the gradient's global norm to this (0: no clipping).
    pub grad_clip: f64,
    /// Seed of the weight initialisation (presets) and of everything random in training.
    pub seed: u64,
}

/// Fills `*out` with the defaults: batch 4, seq 64, lr 3e-4 constant (min_lr 3e-4, no
/// warm-up, 1000 steps), weight decay 0.1, clipping at 1.0, seed 1.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_trainer_config_default(out: *mut AnetrainTrainerConfig) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        let o = TrainOptions::new(1000, 4, 64);
        let cfg = AnetrainTrainerConfig {
            batch: o.batch,
            seq: o.seq,
            lr: o.schedule_lr,
            min_lr: o.min_lr,
            warmup: o.warmup,
            steps: o.steps,
            weight_decay: o.adamw.weight_decay,
            grad_clip: o.grad_clip,
            seed: o.seed,
        };
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, cfg) };
        Ok(())
    })
}

pub(crate) struct TrainerObj {
    trainer: Trainer,
    /// Updates done.
    step: usize,
    /// The tokens of the last update (what checkpoints fingerprint as the run's data).
    last: Vec<u32>,
}

impl Kind for TrainerObj {
    const NAME: &'static str = "trainer";
}

fn options(c: &AnetrainTrainerConfig) -> TrainOptions {
    let mut o = TrainOptions::new(c.steps, c.batch, c.seq);
    o.schedule_lr = c.lr;
    o.min_lr = c.min_lr;
    o.warmup = c.warmup;
    o.adamw.weight_decay = c.weight_decay;
    o.grad_clip = c.grad_clip;
    o.seed = c.seed;
    o
}

/// A copy of `t` (the trainer keeps its own, saved with every checkpoint).
fn copy_tokenizer(t: &Tokenizer) -> anyhow::Result<Tokenizer> {
    match (t.as_hf(), t.as_pieces()) {
        (Some(hf), _) => Tokenizer::from_hf(hf.clone()),
        (None, Some((pieces, scores))) => Tokenizer::from_pieces(pieces.to_vec(), scores.to_vec()),
        (None, None) => anyhow::bail!("the model's tokenizer has an unknown kind"),
    }
}

/// Builds the trainer, refusing a bad configuration before any allocation.
///
/// # Safety
/// `config` is NULL or readable; `out` is NULL or writable.
unsafe fn create(
    cfg: &ModelConfig,
    config: *const AnetrainTrainerConfig,
    base: Option<Vec<f32>>,
    tokenizer: Option<Tokenizer>,
    out: *mut AnetrainTrainer,
) -> Res<()> {
    // SAFETY: the caller's contract.
    let c = unsafe { slice(config, 1, "config") }?[0];
    let opts = options(&c);
    opts.validate(cfg).map_err(with_status(AnetrainStatus::BadArgument))?;
    let est = anetrain::model::memory_estimate(cfg, c.batch, c.seq, true);
    est.ensure(&format!("training {} with batch {} × seq {}", cfg.name, c.batch, c.seq), "lower batch or seq")?;
    let (par, pool) = crate::runtime()?;
    let mut trainer = pool.install(|| {
        let backend = Box::new(anetrain::backend::cpu::CpuBackend::new(cfg, c.batch, c.seq, *par));
        Trainer::with_base(cfg, opts, *par, backend, base)
    })?;
    trainer.tokenizer = tokenizer;
    let id = handles::insert(TrainerObj { trainer, step: 0, last: Vec::new() });
    // SAFETY: checked by the caller's `out_ptr`.
    unsafe { write(out, AnetrainTrainer { id }) };
    Ok(())
}

/// A trainer that starts from `model`'s weights (a copy: the model stays usable) with a
/// fresh optimizer, on the CPU; it keeps the model's tokenizer and saves it with every
/// checkpoint. On failure `*out` is set to the zero handle.
///
/// # Safety
/// `config` is NULL or readable; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_trainer_from_model(
    model: AnetrainModel,
    config: *const AnetrainTrainerConfig,
    out: *mut AnetrainTrainer,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainTrainer::default()) };
        let obj = self::model(model)?;
        let obj = handles::lock(&obj)?;
        let m = &obj.m;
        let tokenizer = m.tokenizer.as_ref().map(copy_tokenizer).transpose()?;
        let mut base = anetrain::memory::try_vec_f32(m.params.len(), "the trainer's copy of the weights")?;
        base.copy_from_slice(&m.params);
        // SAFETY: the caller's contract; `out` checked.
        unsafe { create(&m.cfg, config, Some(base), tokenizer, out) }
    })
}

/// A trainer for a built-in preset (e.g. "stories260k", "stories15m", "qwen3-0.6b") or an HF
/// `config.json` path, with weights initialised from `config->seed`, on the CPU. On failure
/// `*out` is set to the zero handle.
///
/// # Safety
/// `preset` is NULL or NUL-terminated; `config` is NULL or readable; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_trainer_from_preset(
    preset: *const c_char,
    config: *const AnetrainTrainerConfig,
    out: *mut AnetrainTrainer,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainTrainer::default()) };
        // SAFETY: the caller's contract.
        let spec = unsafe { text(preset, "preset") }?;
        let cfg = ModelConfig::resolve(spec).map_err(with_status(AnetrainStatus::BadArgument))?;
        // SAFETY: the caller's contract; `out` checked.
        unsafe { create(&cfg, config, None, None, out) }
    })
}

/// Frees a trainer. Its handle is invalid afterwards.
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_trainer_free(trainer: AnetrainTrainer) -> AnetrainStatus {
    guard(|| handles::remove::<TrainerObj>(trainer.id))
}

/// One optimizer update on the caller's tokens: `n` must be batch × (seq + 1), one row of
/// seq + 1 tokens per sequence; each row's first seq tokens are the inputs and its last seq
/// the targets. `*loss` (if not NULL) receives the update's mean loss before the update.
/// An update whose gradient is not finite is skipped (the weights do not change), as in
/// `anetrain train`.
///
/// # Safety
/// `tokens` is NULL or holds `n` ids; `loss` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_trainer_update(
    trainer: AnetrainTrainer,
    tokens: *const u32,
    n: usize,
    loss: *mut f64,
) -> AnetrainStatus {
    guard(|| {
        if !loss.is_null() {
            out_ptr(loss, "loss")?;
        }
        // SAFETY: the caller's contract.
        let tokens = unsafe { slice(tokens, n, "tokens") }?;
        let obj = handles::get::<TrainerObj>(trainer.id)?;
        let mut obj = handles::lock(&obj)?;
        let o = &obj.trainer.opts;
        let want = o.accum * o.batch * (o.seq + 1);
        if tokens.len() != want {
            return Err(fail(
                AnetrainStatus::BadLength,
                format!(
                    "an update takes batch {} × (seq {} + 1) = {want} tokens, not {}",
                    o.batch,
                    o.seq,
                    tokens.len()
                ),
            ));
        }
        let (_, pool) = crate::runtime()?;
        let step = obj.step;
        let t = &mut obj.trainer;
        let ev = pool.install(|| t.step_on_rows(tokens, step)).map_err(with_status(AnetrainStatus::BadArgument))?;
        obj.step += 1;
        obj.last.clear();
        obj.last.extend_from_slice(tokens);
        if !loss.is_null() {
            // SAFETY: checked above.
            unsafe { write(loss, ev.loss) };
        }
        Ok(())
    })
}

/// Updates the trainer has made so far.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_trainer_steps(trainer: AnetrainTrainer, out: *mut usize) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        let obj = handles::get::<TrainerObj>(trainer.id)?;
        let obj = handles::lock(&obj)?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, obj.step) };
        Ok(())
    })
}

/// Saves a checkpoint of the trainer into the directory `dir` (created if needed) as
/// `dir/step-NNNNNNNN/` and points `dir/latest` at it: the weights, the optimizer state and
/// the tokenizer, written to a temporary directory and renamed into place, with `dir` locked
/// while it is written (`ANETRAIN_STATUS_BUSY`, naming the holder's PID, when another
/// process — e.g. a running `anetrain train --ckpt-dir dir` — holds it). `anetrain_model_open`,
/// `anetrain generate --model dir` and `anetrain eval --model dir` read it. Needs at least
/// one update.
///
/// # Safety
/// `dir` is NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_trainer_save(trainer: AnetrainTrainer, dir: *const c_char) -> AnetrainStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let dir = std::path::Path::new(unsafe { text(dir, "dir") }?);
        let obj = handles::get::<TrainerObj>(trainer.id)?;
        let obj = handles::lock(&obj)?;
        if obj.step == 0 {
            return Err(fail(AnetrainStatus::BadArgument, "the trainer has made no update yet; nothing to checkpoint"));
        }
        let v = obj.trainer.model.cfg.vocab_size;
        let data = TokenData::from_vec(obj.last.clone(), v, "token buffers passed to anetrain_trainer_update")?;
        let _lock = anetrain::checkpoint::rundir::lock(dir).map_err(|e| {
            let busy = format!("{e:#}").contains("in use by");
            if busy { fail(AnetrainStatus::Busy, format!("{e:#}")) } else { e.into() }
        })?;
        anetrain::checkpoint::native::save(dir, &obj.trainer, obj.step, &data, 0)?;
        Ok(())
    })
}
