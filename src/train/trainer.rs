//! The training loop: micro-batches with gradient accumulation, global-norm clipping, AdamW
//! over a warmup + cosine schedule, telemetry. Knows the model and its kernel trait only.

use super::adamw::{AdamW, AdamWConfig, clip_multiplier, partials_len, sum_squares};
use super::loss_scale::{LossScaleMode, LossScaler};
use super::schedule::Schedule;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::data::{Sampler, TokenData};
use crate::model::Model;
use crate::ops::Par;
use crate::telemetry::{CheckpointEvent, EvalEvent, LossScaleEvent, Record, StepEvent, Telemetry};
use anyhow::{Context, Result, ensure};
use rayon::prelude::*;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Optimizer updates.
    pub steps: usize,
    /// B: sequences per micro-batch.
    pub batch: usize,
    /// T: positions per sequence.
    pub seq: usize,
    /// Micro-batches accumulated per update.
    pub accum: usize,
    pub schedule_lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f64,
    pub loss_scale: LossScaleMode,
    /// Evaluate on the validation data every N updates (0: never).
    pub eval_every: usize,
    /// Tokens per evaluation (rounded down to whole windows of T, at least one).
    pub eval_tokens: usize,
    pub seed: u64,
    /// Train LoRA adapters on a frozen base instead of every weight.
    pub lora: Option<crate::lora::LoraConfig>,
    /// With LoRA: hold the frozen layer weights in bf16 (`--base-dtype bf16`).
    pub base_bf16: bool,
    /// One process with accum > 1: compute each micro-batch's gradient from zero and sum them
    /// in order, ((G₀ + G₁) + G₂) + …, as the ranks of a data-parallel job with `--dp-reduce
    /// exact` do (bit-identical to them), at the cost of one more gradient-sized buffer and
    /// two passes over it per micro-batch. Off: each micro-batch's backward adds into the
    /// gradients in place (less memory, ~7% faster at Stories110M, BENCHMARKS §2).
    pub exact_accum: bool,
}

impl TrainOptions {
    /// `steps` updates of one B × T micro-batch each at a constant learning rate of 3e-4:
    /// AdamW defaults, clipping at 1.0, dynamic loss scaling, no evaluation, seed 1. Callers
    /// change what they need with struct update syntax.
    pub fn new(steps: usize, batch: usize, seq: usize) -> Self {
        TrainOptions {
            steps,
            batch,
            seq,
            accum: 1,
            schedule_lr: 3e-4,
            min_lr: 3e-4,
            warmup: 0,
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            loss_scale: LossScaleMode::Dynamic,
            eval_every: 0,
            eval_tokens: 0,
            seed: 1,
            lora: None,
            base_bf16: false,
            exact_accum: false,
        }
    }

    /// Checks every option, and the sequence length against the model, before any work starts.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        cfg.check_seq(self.seq)?;
        if let Some(lora) = &self.lora {
            lora.validate(cfg)?;
        }
        ensure!(
            !self.base_bf16 || self.lora.is_some(),
            "--base-dtype bf16 needs --lora-rank: only a frozen base can be held in bf16"
        );
        ensure!(self.steps > 0, "--steps must be at least 1");
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.seq > 0, "--seq must be at least 1");
        ensure!(self.accum > 0, "--accum must be at least 1");
        ensure!(self.schedule_lr.is_finite() && self.schedule_lr > 0.0, "--lr must be a positive number");
        ensure!(self.min_lr.is_finite() && self.min_lr >= 0.0, "--min-lr must be a non-negative number");
        ensure!(self.grad_clip.is_finite() && self.grad_clip >= 0.0, "--grad-clip must be non-negative");
        ensure!(
            (0.0..1.0).contains(&self.adamw.beta1) && (0.0..1.0).contains(&self.adamw.beta2),
            "--beta1/--beta2 must be in [0, 1)"
        );
        ensure!(self.adamw.eps.is_finite() && self.adamw.eps > 0.0, "--adam-eps must be a positive number");
        ensure!(
            self.min_lr <= self.schedule_lr,
            "--min-lr {:e} is above --lr {:e}: the schedule decays from --lr down to --min-lr",
            self.min_lr,
            self.schedule_lr
        );
        ensure!(
            self.adamw.weight_decay.is_finite() && self.adamw.weight_decay >= 0.0,
            "--weight-decay must be a non-negative number"
        );
        ensure!(
            self.schedule_lr * self.adamw.weight_decay < 1.0,
            "--lr {:e} × --weight-decay {} = {:.1e} must be below 1 (each update shrinks the weights by that \
             share); lower --lr or --weight-decay",
            self.schedule_lr,
            self.adamw.weight_decay,
            self.schedule_lr * self.adamw.weight_decay
        );
        ensure!(
            self.eval_every == 0 || self.eval_tokens > 0,
            "--eval-tokens must be at least 1 (--eval-every 0 turns validation off)"
        );
        // Bounds that keep every derived size (buffers, counters) far from overflow.
        ensure!(self.steps <= 1 << 40, "--steps {} is implausibly large", self.steps);
        ensure!(self.accum <= 1 << 20, "--accum {} is implausibly large", self.accum);
        ensure!(self.batch.saturating_mul(self.seq) <= 1 << 22, "--batch × --seq must be at most 4M tokens");
        Ok(())
    }

    pub fn schedule(&self) -> Schedule {
        Schedule { lr: self.schedule_lr, min_lr: self.min_lr, warmup: self.warmup, total: self.steps }
    }
}

/// Where and how often to write checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointPolicy {
    pub dir: std::path::PathBuf,
    /// Every N updates (0: only at the end).
    pub every: usize,
    /// Keep the newest K step directories (0: all).
    pub keep_last: usize,
}

/// What a finished run measured.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// The run stopped early on a stop request (its last update was checkpointed).
    pub interrupted: bool,
    /// The run stopped early because the next update's compiles would pass the compile
    /// budget; its last update was checkpointed and a new process should resume it.
    pub restart: bool,
    /// Mean loss of each update.
    pub losses: Vec<f64>,
    pub wall_s: f64,
    /// Median wall time of one micro-batch forward + backward, after the first update when
    /// there were later ones (its micro-batches fault in buffers and pack weights once).
    pub median_micro_ms: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// Training FLOPs (model count) per second of wall time.
    pub gflops: f64,
    /// Whether the dW GEMMs ran on a worker thread beside the backend's kernels.
    pub dw_overlap: bool,
    /// Mean per update: time in backend kernels, in the per-layer dW GEMMs, and blocked on
    /// the dW worker (see `model::PhaseTimes`).
    pub kernel_ms: f64,
    pub dw_ms: f64,
    pub dw_wait_ms: f64,
    /// Mean per update: time blocked on the data-parallel gradient exchange, and gradient
    /// bytes this rank sent (0 for one process).
    pub comm_wait_ms: f64,
    pub comm_bytes: u64,
}

/// The trained arena of a LoRA run: adapters and their gradients (the AdamW moments are the
/// trainer's `opt`, over the adapter layout).
pub struct LoraTrain {
    pub adapters: Vec<f32>,
    pub grads: Vec<f32>,
}

pub struct Trainer {
    pub model: Model,
    /// The weights (with LoRA, the frozen base). After changing them, or the adapters,
    /// outside `step`, call `params_changed`.
    pub params: Vec<f32>,
    /// Gradients of `params`; empty with LoRA (the base gets none).
    pub grads: Vec<f32>,
    /// Present when training LoRA adapters.
    pub lora: Option<LoraTrain>,
    pub opt: AdamW,
    pub sampler: Sampler,
    pub opts: TrainOptions,
    /// Updates already done (non-zero after resuming from a checkpoint).
    pub start_step: usize,
    pub scaler: LossScaler,
    /// Held-out tokens for `eval_every`.
    pub val_data: Option<TokenData>,
    /// Lowest validation loss so far (∞ before the first evaluation).
    pub best_val_loss: f64,
    /// The tokenizer the training tokens were made with: saved beside the weights in every
    /// checkpoint, so that the checkpoint can be prompted with text.
    pub tokenizer: Option<crate::tokenizer::Tokenizer>,
    /// The chat template of the training data (Jinja source), saved with the tokenizer.
    pub chat_template: Option<String>,
    /// Bumped whenever `params` change (`params_changed`), and promised to the model as
    /// its weights version, so accelerator backends stage weights once per update.
    weights_version: u64,
    /// Kernel compiles one process may make (`--compile-budget`); `None`: no limit. Before an
    /// update that would pass it, `run` checkpoints and stops with `TrainSummary::restart`.
    pub compile_budget: Option<usize>,
    /// Test hook: make one gradient NaN in this (0-based) update, as an fp16 overflow would.
    pub inject_nonfinite_at: Option<usize>,
    /// Data-parallel training across ranks (`set_dist`); `None` for one process.
    dist: Option<Box<dyn crate::dist::Exchange>>,
    /// Some rank asked to stop (a signal) in the last update's exchange.
    dist_stop: bool,
    /// `[P]` one micro-batch's gradient, for one process with accum > 1 (see `step`)
    scratch: Vec<f32>,
    /// This rank's mean loss per micro-batch of the update, then every rank's in order.
    micro_losses: Vec<f64>,
    all_losses: Vec<f64>,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    partials: Vec<f64>,
    micro_ms: Vec<f64>,
}

impl Trainer {
    /// Fresh run: seeded init, zero optimizer state. Every buffer of the loop is sized here.
    pub fn new(cfg: &ModelConfig, opts: TrainOptions, par: Par, backend: Box<dyn Backend>) -> Result<Self> {
        Self::with_base(cfg, opts, par, backend, None)
    }

    /// `new`, starting from the weights `base` (`ParamLayout::new(cfg)`'s arena, e.g. a
    /// pretrained model) instead of the seeded init, with a fresh optimizer. With
    /// `--base-dtype bf16` the layers are kept only as bf16 and `base` is dropped here.
    pub fn with_base(
        cfg: &ModelConfig,
        opts: TrainOptions,
        par: Par,
        backend: Box<dyn Backend>,
        base: Option<Vec<f32>>,
    ) -> Result<Self> {
        opts.validate(cfg)?;
        let mut model = Model::new(cfg, opts.batch, opts.seq, par, backend)?;
        model.set_weights_version(Some(0));
        if let Some(b) = &base {
            ensure!(
                b.len() == model.layout.total,
                "the base weights hold {} values, {} needs {}",
                b.len(),
                cfg.name,
                model.layout.total
            );
        }
        let bf16 = opts.base_bf16 && opts.lora.is_some();
        let (params, base_bits) = match (base, bf16) {
            (Some(b), false) => (b, None),
            (None, false) => (model.layout.init(opts.seed), None),
            (b, true) => {
                let (params, bits) = split_bf16_base(&model.layout, opts.seed, b)?;
                (params, Some(bits))
            }
        };
        let n = opts.batch * opts.seq;
        let (grads, opt, lora) = match &opts.lora {
            None => (
                crate::memory::try_vec_f32(params.len(), "the parameter gradients")?,
                AdamW::new(opts.adamw, &model.layout)?,
                None,
            ),
            Some(lc) => {
                let layout = crate::lora::LoraLayout::new(cfg, &model.layout, lc)?;
                let opt = AdamW::for_tensors(opts.adamw, &layout.tensors, layout.total)?;
                let adapters = layout.init(opts.seed);
                let grads = crate::memory::try_vec_f32(layout.total, "the adapter gradients")?;
                model.set_lora(layout)?;
                if let Some(bits) = base_bits {
                    model.set_lora_base_bf16(bits)?;
                }
                (Vec::new(), opt, Some(LoraTrain { adapters, grads }))
            }
        };
        let trained = lora.as_ref().map_or(params.len(), |l| l.adapters.len());
        let scratch = if opts.accum > 1 && opts.exact_accum {
            crate::memory::try_vec_f32(trained, "the micro-batch gradient of --accum")?
        } else {
            Vec::new()
        };
        Ok(Trainer {
            dist: None,
            dist_stop: false,
            scratch,
            micro_losses: Vec::with_capacity(opts.accum),
            all_losses: Vec::with_capacity(opts.accum),
            grads,
            opt,
            lora,
            partials: vec![0.0; partials_len(trained)],
            sampler: Sampler::new(opts.seed, opts.batch, opts.seq),
            tokens: vec![0; n],
            targets: vec![0; n],
            micro_ms: Vec::with_capacity((opts.steps * opts.accum).min(1 << 16)),
            start_step: 0,
            scaler: LossScaler::new(opts.loss_scale),
            inject_nonfinite_at: None,
            compile_budget: None,
            weights_version: 0,
            val_data: None,
            best_val_loss: f64::INFINITY,
            tokenizer: None,
            chat_template: None,
            params,
            model,
            opts,
        })
    }

    /// The weights the model computes with: the base with any LoRA adapters merged in (a
    /// copy; for sampling, evaluation or export).
    pub fn effective_params(&self) -> Vec<f32> {
        let mut params = self.params.clone();
        self.merge_into_base(&mut params);
        params
    }

    /// `effective_params`, merging into the base in place (no copy) as the trainer ends.
    pub fn into_effective_params(mut self) -> Vec<f32> {
        let mut params = std::mem::take(&mut self.params);
        self.merge_into_base(&mut params);
        params
    }

    /// `params` (a copy of `self.params`) becomes the weights the model computes with: a bf16
    /// base widened into the layer ranges, then the adapters merged in.
    fn merge_into_base(&self, params: &mut [f32]) {
        if let Some(bits) = self.model.lora_base_bf16() {
            let span = self.model.layout.layer_span();
            params[span].par_iter_mut().zip(bits).for_each(|(p, &b)| *p = half::bf16::from_bits(b).to_f32());
        }
        if let (Some(l), Some(layout)) = (&self.lora, self.model.lora()) {
            layout.merge_into(self.model.par(), &self.model.layout, params, &l.adapters);
        }
    }

    /// What identifies the frozen base of a LoRA run (`checkpoint::native::base_fingerprint`
    /// of the weights the layers compute with: with a bf16 base, the rounded ones).
    pub fn base_fingerprint(&self) -> String {
        let span = self.model.layout.layer_span();
        match self.model.lora_base_bf16() {
            None => crate::checkpoint::native::base_fingerprint(self.params.len(), |i| self.params[i].to_bits()),
            Some(bits) => crate::checkpoint::native::base_fingerprint(self.params.len(), |i| {
                if span.contains(&i) {
                    half::bf16::from_bits(bits[i - span.start]).to_f32().to_bits()
                } else {
                    self.params[i].to_bits()
                }
            }),
        }
    }

    /// One optimizer update over `accum` micro-batches drawn from `data`.
    /// Must follow any change to `params` made outside `step` (which calls it after each
    /// update) so that backends holding staged weights restage them.
    pub fn params_changed(&mut self) {
        self.weights_version += 1;
        self.model.set_weights_version(Some(self.weights_version));
    }

    /// Makes this trainer one rank of a data-parallel job (`crate::dist`): it computes only
    /// its share of each update's micro-batches and exchanges gradients through `dist`.
    /// Call before the first `step`.
    /// With LoRA, `dist` must exchange the adapter arena (`dist::Plan::for_lora`): the model
    /// reports no tensor to it, `step` hands over each micro-batch's adapter gradient.
    pub fn set_dist(&mut self, dist: Box<dyn crate::dist::Exchange>) -> Result<()> {
        if self.lora.is_none() {
            self.model.set_grad_ready(Some(dist.grad_ready()));
        }
        // Ranks compute every micro-batch's gradient from zero in `grads`.
        self.scratch = Vec::new();
        self.dist = Some(dist);
        Ok(())
    }

    /// (rank, number of ranks): (0, 1) for one process.
    pub fn rank_and_size(&self) -> (usize, usize) {
        self.dist.as_ref().map_or((0, 1), |d| (d.rank(), d.size()))
    }

    /// A stop was requested (a signal). In a data-parallel job: on any rank before the last
    /// update's exchange, as agreed there, never this rank's own flag alone (a signal that
    /// arrives after the exchange would stop this rank one update before the others).
    fn stop_requested(&self) -> bool {
        if self.dist.is_some() { self.dist_stop } else { crate::signals::stop_requested() }
    }

    /// One optimizer update over `accum` micro-batches drawn from `data`.
    ///
    /// The update's gradient is the sum of the micro-batch gradients. One process adds each
    /// micro-batch's backward into `grads` in place, or with `exact_accum` computes each from
    /// zero and sums them in micro-batch order, ((G₀ + G₁) + G₂) + … (G₀ in `grads`, each
    /// later one from `scratch`); the ranks of a data-parallel job draw every micro-batch (so
    /// the data order does not depend on their number), compute micro-batches rank, rank + N,
    /// …, and the exchange adds them in the same order (`crate::dist`).
    pub fn step(&mut self, data: &TokenData, step: usize) -> Result<StepEvent> {
        self.step_from(Some(data), &[], step)
    }

    /// One optimizer update, as `step`, on the caller's tokens instead of sampled windows:
    /// `rows` `[accum·B, T + 1]` holds one row per sequence of the update, micro-batch after
    /// micro-batch; a row's first T tokens are the inputs and its last T the targets.
    pub fn step_on_rows(&mut self, rows: &[u32], step: usize) -> Result<StepEvent> {
        let (b, t, accum) = (self.opts.batch, self.opts.seq, self.opts.accum);
        let want = accum * b * (t + 1);
        ensure!(
            rows.len() == want,
            "an update takes {want} tokens ({} rows of --seq {t} + 1, the last T of each being the targets), not {}",
            accum * b,
            rows.len()
        );
        let v = self.model.cfg.vocab_size;
        if let Some(i) = rows.iter().position(|&x| x as usize >= v) {
            anyhow::bail!("token {i} of the update is id {}, outside the model's vocabulary ({v})", rows[i]);
        }
        self.step_from(None, rows, step)
    }

    /// `step` with micro-batches drawn from `data`, or with `data` None taken in order from
    /// `rows` (see `step_on_rows`).
    fn step_from(&mut self, data: Option<&TokenData>, rows: &[u32], step: usize) -> Result<StepEvent> {
        let start = Instant::now();
        self.model.begin_update(step);
        let accum = self.opts.accum;
        let (rank, world) = self.rank_and_size();
        zero(self.lora.as_mut().map_or(&mut self.grads, |l| &mut l.grads));
        let (mut ms_forward, mut ms_backward) = (0.0, 0.0);
        let (mut ms_kernels, mut ms_dw, mut ms_dw_wait) = (0.0, 0.0, 0.0);
        let loss_scale = self.scaler.scale;
        let exact_ranks = self.dist.as_ref().is_some_and(|d| d.mode() == crate::dist::ReduceMode::Exact);
        self.micro_losses.clear();
        for k in 0..accum {
            match data {
                Some(data) => self.sampler.next_batch(data, &mut self.tokens, &mut self.targets)?,
                None => {
                    let t = self.opts.seq;
                    let micro = &rows[k * self.opts.batch * (t + 1)..(k + 1) * self.opts.batch * (t + 1)];
                    for ((row, toks), tgts) in micro
                        .chunks_exact(t + 1)
                        .zip(self.tokens.chunks_exact_mut(t))
                        .zip(self.targets.chunks_exact_mut(t))
                    {
                        toks.copy_from_slice(&row[..t]);
                        tgts.copy_from_slice(&row[1..]);
                    }
                }
            }
            if k % world != rank {
                continue;
            }
            let micro = Instant::now();
            let into_scratch = self.dist.is_none() && k > 0 && self.opts.exact_accum;
            if into_scratch {
                zero(&mut self.scratch);
            } else if exact_ranks && k >= world {
                zero(self.lora.as_mut().map_or(&mut self.grads, |l| &mut l.grads));
            }
            let (tokens, targets) = (&self.tokens, &self.targets);
            let ls = match &mut self.lora {
                None => self.model.forward_backward(
                    &self.params,
                    if into_scratch { &mut self.scratch } else { &mut self.grads },
                    tokens,
                    targets,
                    loss_scale,
                    accum,
                )?,
                Some(l) => self.model.forward_backward_lora(
                    &self.params,
                    &l.adapters,
                    if into_scratch { &mut self.scratch } else { &mut l.grads },
                    tokens,
                    targets,
                    loss_scale,
                    accum,
                )?,
            };
            if into_scratch {
                add_into(self.lora.as_mut().map_or(&mut self.grads, |l| &mut l.grads), &self.scratch);
            }
            if let Some(dist) = &mut self.dist {
                dist.micro_done(self.lora.as_ref().map_or(&self.grads, |l| &l.grads));
            }
            if self.micro_ms.len() < self.micro_ms.capacity() {
                self.micro_ms.push(micro.elapsed().as_secs_f64() * 1e3);
            }
            self.micro_losses.push(ls.mean());
            ms_forward += self.model.times.forward_ms;
            ms_backward += self.model.times.backward_ms;
            ms_kernels += self.model.times.kernel_ms;
            ms_dw += self.model.times.dw_ms;
            ms_dw_wait += self.model.times.dw_wait_ms;
        }
        let mut comm = crate::dist::CommStats::default();
        if let Some(dist) = &mut self.dist {
            let stop = crate::signals::stop_requested();
            let grads = self.lora.as_mut().map_or(&mut self.grads, |l| &mut l.grads);
            let (stats, stop_any) = dist.finish(grads, &self.micro_losses, stop, &mut self.all_losses)?;
            (comm, self.dist_stop) = (stats, stop_any);
        } else {
            self.all_losses.clone_from(&self.micro_losses);
        }
        let loss = self.all_losses.iter().fold(0.0, |sum, l| sum + l / accum as f64);
        let opt_start = Instant::now();
        let opt_timer = crate::prof::op("grad norm, AdamW");
        let (trained, grads) = match &mut self.lora {
            None => (&mut self.params, &mut self.grads),
            Some(l) => (&mut l.adapters, &mut l.grads),
        };
        if self.inject_nonfinite_at == Some(step) {
            grads[0] = f32::NAN;
        }
        // The norm of the scaled gradients, unscaled: power-of-two scales make this exact.
        let grad_norm = sum_squares(grads, &mut self.partials).sqrt() / loss_scale as f64;
        let lr = self.opts.schedule().lr_at(step);
        let skipped = !grad_norm.is_finite();
        if !skipped {
            let mult = clip_multiplier(grad_norm, self.opts.grad_clip) / loss_scale;
            self.opt.update(trained, grads, lr, mult);
            self.params_changed();
        }
        self.scaler.update(!skipped);
        drop(opt_timer);
        let ms_optimizer = opt_start.elapsed().as_secs_f64() * 1e3;
        let ms_step = start.elapsed().as_secs_f64() * 1e3;
        crate::prof::end_update(accum.div_ceil(world), ms_step);
        let tokens = self.tokens.len() * accum;
        Ok(StepEvent {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            skipped,
            loss_scale: loss_scale as f64,
            val_loss: None,
            tokens,
            tokens_seen: (step + 1) * tokens,
            tokens_per_s: tokens as f64 / (ms_step / 1e3),
            ms_step,
            ms_forward,
            ms_backward,
            ms_optimizer,
            ms_kernels,
            ms_dw,
            ms_dw_wait,
            elapsed_s: 0.0,
            rss_mb: crate::sysstat::process_rss_mb(),
            cpu_s: crate::sysstat::process_cpu_s(),
            ms_comm_wait: comm.wait_ms,
            comm_bytes: comm.bytes_sent,
        })
    }

    /// Runs the remaining updates (from `start_step`), recording each to `telemetry`, handing
    /// it to `on_update`, and checkpointing as `ckpt` says (always after the last update).
    pub fn run(
        &mut self,
        data: &TokenData,
        telemetry: &mut Telemetry,
        ckpt: Option<&CheckpointPolicy>,
        mut on_update: impl FnMut(&StepEvent),
    ) -> Result<TrainSummary> {
        let start = Instant::now();
        let mut losses = Vec::with_capacity(self.opts.steps.saturating_sub(self.start_step).min(1 << 20));
        let mut tokens = 0;
        let (mut kernel_ms, mut dw_ms, mut dw_wait_ms) = (0.0, 0.0, 0.0);
        let (mut comm_wait_ms, mut comm_bytes) = (0.0, 0);
        let mut interrupted = false;
        let mut restart = false;
        for step in self.start_step..self.opts.steps {
            if self.restart_due(step)? {
                let policy = ckpt.context(
                    "the compile budget needs a restart from a checkpoint, and there is no --ckpt-dir; give one \
                     (or raise --compile-budget, or lengthen --recompile-every)",
                )?;
                let saved_at = Instant::now();
                let path = crate::checkpoint::native::save(&policy.dir, self, step, data, policy.keep_last)?;
                telemetry.record(Record::Checkpoint(CheckpointEvent {
                    step,
                    path: path.display().to_string(),
                    kind: "restart".into(),
                    ms: saved_at.elapsed().as_secs_f64() * 1e3,
                }))?;
                restart = true;
                break;
            }
            let scale_before = self.scaler.scale;
            let mut event = self.step(data, step)?;
            event.elapsed_s = start.elapsed().as_secs_f64();
            let done = step + 1;
            let eval_due =
                self.opts.eval_every > 0 && (done.is_multiple_of(self.opts.eval_every) || done == self.opts.steps);
            let mut eval = None;
            if eval_due && let Some(val) = self.val_data.take() {
                let eval_start = Instant::now();
                let t = self.opts.seq;
                let eval_tokens = (self.opts.eval_tokens / t).clamp(1, (val.len().saturating_sub(1) / t).max(1)) * t;
                let result = self.validate(&val);
                self.val_data = Some(val);
                let loss = result?;
                event.val_loss = Some(loss);
                let improved = loss < self.best_val_loss;
                self.best_val_loss = self.best_val_loss.min(loss);
                eval = Some(EvalEvent {
                    step: done,
                    val_loss: loss,
                    best_val_loss: self.best_val_loss,
                    improved,
                    tokens: eval_tokens,
                    ms: eval_start.elapsed().as_secs_f64() * 1e3,
                });
            }
            let improved = eval.as_ref().is_some_and(|e| e.improved);
            on_update(&event);
            losses.push(event.loss);
            tokens += event.tokens;
            kernel_ms += event.ms_kernels;
            dw_ms += event.ms_dw;
            dw_wait_ms += event.ms_dw_wait;
            comm_wait_ms += event.ms_comm_wait;
            comm_bytes += event.comm_bytes;
            telemetry.record(Record::Update(event))?;
            if let Some(eval) = eval {
                telemetry.record(Record::Eval(eval))?;
            }
            if self.scaler.scale != scale_before {
                let reason = if self.scaler.scale < scale_before { "overflow" } else { "growth" };
                telemetry.record(Record::LossScale(LossScaleEvent {
                    step: done,
                    from: scale_before as f64,
                    to: self.scaler.scale as f64,
                    reason: reason.into(),
                }))?;
            }
            // A stop request (Ctrl-C) ends the run after this update, with a checkpoint.
            interrupted = self.stop_requested() && done < self.opts.steps;
            if let Some(policy) = ckpt {
                let mut saved = false;
                let due = policy.every > 0 && done.is_multiple_of(policy.every);
                if done == self.opts.steps || due || interrupted {
                    let saved_at = Instant::now();
                    let path = crate::checkpoint::native::save(&policy.dir, self, done, data, policy.keep_last)?;
                    let kind = if interrupted {
                        "stop"
                    } else if done == self.opts.steps {
                        "final"
                    } else {
                        "periodic"
                    };
                    saved = true;
                    telemetry.record(Record::Checkpoint(CheckpointEvent {
                        step: done,
                        path: path.display().to_string(),
                        kind: kind.into(),
                        ms: saved_at.elapsed().as_secs_f64() * 1e3,
                    }))?;
                }
                if improved {
                    let saved_at = Instant::now();
                    let path = crate::checkpoint::native::save_best(&policy.dir, self, done, data)?;
                    saved = true;
                    telemetry.record(Record::Checkpoint(CheckpointEvent {
                        step: done,
                        path: path.display().to_string(),
                        kind: "best".into(),
                        ms: saved_at.elapsed().as_secs_f64() * 1e3,
                    }))?;
                }
                // A picture of the run beside its checkpoints; a failure costs only the picture.
                if saved && let Err(e) = telemetry.plot(&policy.dir.join("loss.png")) {
                    eprintln!("warning: cannot write loss.png: {e:#}");
                }
            }
            if interrupted {
                break;
            }
        }
        let wall_s = start.elapsed().as_secs_f64();
        let flops = self.model.cfg.train_flops_per_token(self.opts.seq) * tokens as f64;
        let updates = losses.len().max(1) as f64;
        Ok(TrainSummary {
            interrupted,
            restart,
            losses,
            wall_s,
            median_micro_ms: {
                let warm = if self.micro_ms.len() > self.opts.accum { self.opts.accum } else { 0 };
                median(&mut self.micro_ms[warm..])
            },
            tokens,
            tokens_per_s: tokens as f64 / wall_s,
            gflops: flops / wall_s / 1e9,
            dw_overlap: self.model.dw_overlap(),
            kernel_ms: kernel_ms / updates,
            dw_ms: dw_ms / updates,
            dw_wait_ms: dw_wait_ms / updates,
            comm_wait_ms: comm_wait_ms / updates,
            comm_bytes: comm_bytes / updates as u64,
        })
    }
}

impl Trainer {
    /// `--compact-vocab`: classifier and loss over `ids` (see `crate::compact`); the
    /// embedding and classifier rows of other ids are left out of the optimizer.
    pub fn set_compact_vocab(&mut self, ids: Vec<u32>) -> Result<()> {
        self.model.set_compact_vocab(Some(ids))?;
        let runs = self.model.compact_vocab().expect("just set").row_runs();
        let layout = &self.model.layout;
        let c = self.model.cfg.dim;
        let mut tensors = vec![layout.embed, layout.classifier()];
        tensors.dedup();
        for t in tensors {
            self.opt.keep_rows(layout.tensors[t].range(), c, &runs);
        }
        Ok(())
    }

    /// Whether update `step` must run in a new process: its compiles would pass the budget.
    /// Fails when even a fresh process could not run it (its first update does not fit).
    fn restart_due(&self, step: usize) -> Result<bool> {
        let Some(budget) = self.compile_budget else { return Ok(false) };
        let (have, need) = (self.model.compiles(), self.model.compiles_needed(step));
        if need == 0 || have + need <= budget {
            return Ok(false);
        }
        ensure!(
            step > self.start_step,
            "--compile-budget {budget} is too small: this process has compiled {have} kernels and update {} needs \
             {need} more; raise it (the Neural Engine fails past about 119 compiles per process)",
            step + 1
        );
        Ok(true)
    }

    /// Mean loss over the first `eval_tokens` (whole windows of T) of `val`, with the training
    /// model and buffers: no allocation.
    pub fn validate(&mut self, val: &TokenData) -> Result<f64> {
        let t = self.opts.seq;
        let available = val.len().saturating_sub(1) / t;
        ensure!(
            available > 0,
            "validation data {} holds {} tokens; --seq {t} needs at least {}",
            val.source,
            val.len(),
            t + 1
        );
        let windows = (self.opts.eval_tokens / t).clamp(1, available);
        let (sum, count) = crate::eval::windows_loss(
            &mut self.model,
            &self.params,
            self.lora.as_ref().map(|l| l.adapters.as_slice()),
            val,
            windows,
            &mut self.tokens,
            &mut self.targets,
        )?;
        Ok(sum / count.max(1) as f64)
    }
}

/// Fills with zeros, in parallel.
fn zero(buf: &mut [f32]) {
    buf.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));
}

/// `acc += g`, elementwise in f32: each element is one addition, so the result does not
/// depend on how the work is split (the data-parallel exchange adds the same way).
fn add_into(acc: &mut [f32], g: &[f32]) {
    acc.par_chunks_mut(1 << 16).zip(g.par_chunks(1 << 16)).for_each(|(a, g)| {
        for (a, g) in a.iter_mut().zip(g) {
            *a += *g;
        }
    });
}

/// The base of a LoRA run held in bf16: the f32 arena with only its non-layer tensors
/// (embedding, final norm, classifier) written — its layer ranges stay zero pages that are
/// never touched, so the OS backs them with no memory — and the layers as bf16 bits. From
/// `base` when given (dropped here), else `init`'s values, generated one layer at a time so
/// the whole f32 arena never exists.
fn split_bf16_base(
    layout: &crate::params::ParamLayout,
    seed: u64,
    base: Option<Vec<f32>>,
) -> Result<(Vec<f32>, Vec<u16>)> {
    let total = layout.total;
    let span = layout.layer_span();
    let mut params = crate::memory::try_vec_f32(total, "the base model's weights")?;
    match base {
        Some(base) => {
            let bits = crate::model::bf16_layers(layout, &base)?;
            params[..span.start].copy_from_slice(&base[..span.start]);
            params[span.end..].copy_from_slice(&base[span.end..]);
            Ok((params, bits))
        }
        None => {
            layout.init_range(seed, 0..span.start, &mut params[..span.start]);
            layout.init_range(seed, span.end..total, &mut params[span.end..]);
            let mut bits = crate::memory::try_with_capacity::<u16>(span.len(), "the bf16 base")?;
            let widest = (0..layout.n_layers()).map(|l| layout.layer_range(l).len()).max().unwrap_or(0);
            let mut scratch = crate::memory::try_vec_f32(widest, "one layer's weights")?;
            for l in 0..layout.n_layers() {
                let range = layout.layer_range(l);
                let layer = &mut scratch[..range.len()];
                layout.init_range(seed, range, layer);
                bits.extend(layer.iter().map(|&x| half::bf16::from_f32(x).to_bits()));
            }
            Ok((params, bits))
        }
    }
}

/// Median of the values (sorts them); 0 for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { 0.5 * (values[mid - 1] + values[mid]) }
}
