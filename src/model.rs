//! Layer orchestration over a backend: the forward pass, the loss, and the backward pass with
//! every weight-gradient GEMM. Pre-norm decoder:
//! `x += Attn(RMSNorm(x))`, `x += FFN(RMSNorm(x))`, final RMSNorm, classifier, cross-entropy.
//!
//! All buffers are allocated in `Model::new` from the config and the micro-batch shape
//! (B, T); `forward` and `forward_backward` allocate none of them.
//!
//! **dW overlap.** A backend whose kernels run off the CPU (`Backend::overlaps_dw`) leaves
//! the CPU idle while it evaluates them. With overlap on, `forward_backward` hands each
//! block's weight-gradient GEMMs (W2 and W13 after the FFN dx kernel, Wo and Wqkv after the
//! attention dx kernel) to one CPU worker thread and goes straight on to the next norm
//! backward and backend call. The job borrows the layer's saved activations (read-only
//! during the backward) and owns that layer's gradient slices (disjoint per layer); the
//! two gradients the main thread overwrites next — the residual gradient `dx` and the
//! projection gradient (`dh13` or `dqkv`) — are copied into one of `DW_SLOTS` preallocated
//! slots. The worker runs the very same `matmul_backward_dw` calls on the same values with
//! the same `Par`, and every gradient tensor is written by exactly one job, so results are
//! bit-identical with overlap on or off.
//!
//! **Gradient-ready hook.** With `Model::set_grad_ready`, every per-layer gradient tensor of
//! a micro-batch is handed to a callback as soon as the backward has written it for the last
//! time (the dW GEMMs' outputs from whichever thread ran them, the norm gains from the main
//! thread), so data-parallel training (`crate::dist`) can reduce a layer while the backward
//! works on the next.

use crate::backend::{Backend, LayerActs, LayerGrads, QkNormGrads};
use crate::config::ModelConfig;
use crate::memory::Estimate;
use crate::ops::Par;
use crate::ops::cross_entropy::{cross_entropy_forward, cross_entropy_fused, loss_sum};
use crate::ops::embedding::{embedding_backward, embedding_forward};
use crate::ops::matmul::{bias_backward, matmul_backward_dw, matmul_backward_dx, matmul_forward};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::params::{LayerTensors, ParamLayout};
use crate::prof;
use anyhow::{Context, Result, anyhow, ensure};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

mod lora;
pub use lora::{LoraRun, bf16_layers};
use std::time::Instant;

/// Loss of one micro-batch: the sum over counted targets and their number.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub count: usize,
}

impl LossSum {
    pub fn mean(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum / self.count as f64 }
    }
}

/// Wall time of the last call, per phase, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Inside backend kernel calls, forward and backward (a part of the two above).
    pub kernel_ms: f64,
    /// The per-layer weight-gradient GEMMs (Wqkv, Wo, W13, W2), on whichever thread ran
    /// them: with overlap, work done beside the backward, so not a part of `backward_ms`.
    /// The classifier's dW stays on the main thread and is not counted here.
    pub dw_ms: f64,
    /// Main-thread time blocked on the dW worker (no free slot, and the final join); 0
    /// without overlap.
    pub dw_wait_ms: f64,
}

/// Receives one finished gradient tensor of a micro-batch: its offset in the gradient arena
/// passed to `forward_backward` and its values. Called from the main thread and from the dW
/// worker, so it must be cheap and thread-safe (see `Model::set_grad_ready`).
pub type GradReady = std::sync::Arc<GradReadyFn>;

/// The callback behind `GradReady`.
pub type GradReadyFn = dyn Fn(usize, &[f32]) + Send + Sync;

/// The hook as `forward_backward` passes it around: the callback and the arena's address.
#[derive(Clone, Copy)]
struct Ready<'a> {
    hook: Option<&'a GradReadyFn>,
    /// Address of the gradient arena's first value.
    base: usize,
}

impl Ready<'_> {
    /// Reports `grad`, a slice of the arena, as final for this micro-batch.
    fn report(&self, grad: &[f32]) {
        if let Some(hook) = self.hook {
            hook((grad.as_ptr() as usize - self.base) / std::mem::size_of::<f32>(), grad);
        }
    }
}

/// Slots of copied gradients for the dW worker: two is double buffering, so the worker
/// always has the next block's job queued while the main thread prepares another; more
/// would only let the main thread run further ahead of a worker that is the bottleneck.
const DW_SLOTS: usize = 2;

/// What dW overlap needs, built once when it is switched on (`Model::set_dw_overlap`).
struct DwOverlap {
    /// Where the worker's GEMMs run: `par.threads` threads, so the worker issues exactly the
    /// calls (`Par` included, hence the same GEMM partition and bits) the main thread would,
    /// at full width while the backend's kernels leave the CPU idle, without touching
    /// rayon's global pool.
    pool: rayon::ThreadPool,
    slots: Vec<DwSlot>,
}

/// Copies of the gradients a queued dW job reads that the main thread overwrites for the
/// next block.
struct DwSlot {
    /// `[N, C]` gradient of the block output (the residual gradient dx)
    dout: Vec<f32>,
    /// `[N, W_in]` gradient of the input projection's output: `dh13` (W_in = 2·F) or `dqkv`
    /// (W_in = (H + 2·KV)·D); sized for the larger
    dproj: Vec<f32>,
}

/// One block's two weight-gradient GEMMs. Both blocks are `xn → input projection (C → W_in)
/// → … → output projection (W_out → C)`: attention (Wqkv, …, Wo reading `attn`) and the FFN
/// (W13, …, W2 reading `gate`).
struct BlockDw<'a> {
    /// `[C, W_out]` += doutᵀ · out_proj_in
    d_out_proj: &'a mut [f32],
    /// `[N, W_out]` saved input of the output projection
    out_proj_in: &'a [f32],
    w_out: usize,
    /// `[W_in, C]` += dprojᵀ · in_proj_in
    d_in_proj: &'a mut [f32],
    /// `[N, C]` saved input of the input projection (the normed residual stream)
    in_proj_in: &'a [f32],
    w_in: usize,
    ready: Ready<'a>,
}

impl BlockDw<'_> {
    /// Runs both GEMMs from `dout` `[N, C]` and `dproj` `[N, W_in]` (a longer slot is cut);
    /// returns their wall time in ms. The one code path for overlap on and off.
    fn run(self, par: Par, n: usize, c: usize, dout: &[f32], dproj: &[f32]) -> f64 {
        let start = Instant::now();
        matmul_backward_dw(par, self.d_out_proj, dout, self.out_proj_in, n, self.w_out, c);
        matmul_backward_dw(par, self.d_in_proj, &dproj[..n * self.w_in], self.in_proj_in, n, c, self.w_in);
        self.ready.report(self.d_out_proj);
        self.ready.report(self.d_in_proj);
        ms_since(start)
    }
}

/// A block's GEMMs queued for the worker, with the slot holding their copied gradients.
struct DwJob<'a> {
    block: BlockDw<'a>,
    slot: &'a mut DwSlot,
}

/// Where `forward_backward` sends each block's dW GEMMs.
enum DwSink<'a> {
    /// Overlap off: run them at once on this thread, from the live buffers.
    Inline { dw_ms: f64 },
    /// Overlap on: copy the gradients into a free slot (waiting for one if the worker holds
    /// all) and queue the job. Both channels hold at most `DW_SLOTS` items, so no send blocks.
    Worker { jobs: SyncSender<DwJob<'a>>, free: Receiver<&'a mut DwSlot>, wait_ms: f64 },
}

impl<'a> DwSink<'a> {
    fn submit(&mut self, par: Par, n: usize, c: usize, block: BlockDw<'a>, dout: &[f32], dproj: &[f32]) -> Result<()> {
        match self {
            DwSink::Inline { dw_ms } => *dw_ms += block.run(par, n, c, dout, dproj),
            DwSink::Worker { jobs, free, wait_ms } => {
                let slot = match free.try_recv() {
                    Ok(slot) => slot,
                    Err(_) => {
                        let start = Instant::now();
                        let slot = free.recv().map_err(|_| anyhow!("the dW worker thread stopped"))?;
                        *wait_ms += ms_since(start);
                        slot
                    }
                };
                slot.dout.copy_from_slice(dout);
                slot.dproj[..dproj.len()].copy_from_slice(dproj);
                jobs.send(DwJob { block, slot }).map_err(|_| anyhow!("the dW worker thread stopped"))?;
            }
        }
        Ok(())
    }
}

/// The worker: runs queued jobs in order until the main thread closes the queue, handing
/// each slot back as soon as its job is done. Returns the GEMMs' total wall time in ms.
fn dw_worker<'a>(par: Par, n: usize, c: usize, jobs: Receiver<DwJob<'a>>, free: SyncSender<&'a mut DwSlot>) -> f64 {
    let mut dw_ms = 0.0;
    for DwJob { block, slot } in jobs {
        dw_ms += block.run(par, n, c, &slot.dout, &slot.dproj);
        // Fails only when the main thread stopped early (an error): the slot is not needed.
        let _ = free.send(slot);
    }
    dw_ms
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Runs `f`, adding its wall time in ms to `*total`.
fn timed<R>(total: &mut f64, f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let r = f();
    *total += ms_since(start);
    r
}

pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    /// Micro-batch shape: B sequences of T positions.
    pub b: usize,
    pub t: usize,
    par: Par,
    backend: Box<dyn Backend>,
    acts: Vec<LayerActs>,
    /// `[N, C]` residual stream after the last layer
    x_final: Vec<f32>,
    /// `[N]`
    rstd_final: Vec<f32>,
    /// `[N, C]` final-normed stream: classifier input
    xf: Vec<f32>,
    /// `[N, V]` logits; overwritten by dlogits in backward
    logits: Vec<f32>,
    /// `[N]` per-position loss
    losses: Vec<f32>,
    /// `[N, C]` gradient of the residual stream
    dx: Vec<f32>,
    /// `[N, C]` gradient of a norm's output (kernel input); also forward scratch
    dxn: Vec<f32>,
    grads: LayerGrads,
    /// Present while dW overlap is on.
    dw: Option<DwOverlap>,
    grad_ready: Option<GradReady>,
    /// Present when training LoRA adapters (`set_lora`).
    lora: Option<LoraRun>,
    /// `--compact-vocab`: classifier and loss over a subset of the vocabulary.
    compact: Option<crate::compact::CompactVocab>,
    pub times: PhaseTimes,
}

/// What training or evaluating `cfg` on micro-batches of (B, T) allocates, from the
/// arguments alone, to be checked (`Estimate::ensure`) before anything is built: the saved
/// activations of every layer (with the `[B, H, T, T]` attention probabilities), the `[N, V]`
/// logits, one layer's gradients, the backend's scratch (the `cpu` backend's; the MIL
/// backends' is of the same order), the dW-overlap slots, and with `training` the parameter
/// arena, its gradient and AdamW's two moments (16 bytes per parameter).
pub fn memory_estimate(cfg: &ModelConfig, b: usize, t: usize, training: bool) -> Estimate {
    use crate::memory::f32_bytes;
    let n = b.saturating_mul(t);
    let (c, f, qd, kd, v) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
    let qkv = qd + 2 * kd;
    let qk = usize::from(cfg.qk_norm);
    let scores = f32_bytes(&[b, cfg.n_heads, t, t]);
    // Per LayerActs: 4 [N, C] streams, 2 [N] rstds, q and attn [N, H·D], k and v [N, KV·D],
    // h13 [N, 2·F] and gate [N, F], plus the QK-norm taps.
    let per_layer =
        f32_bytes(&[n, 4 * c + 2 + 2 * qd + 2 * kd + 3 * f + qk * (qd + kd + cfg.n_heads + cfg.n_kv_heads)]);
    let mut est = Estimate::new();
    est.add("activations", per_layer.saturating_mul(cfg.n_layers as u64))
        .add("attention probabilities", scores.saturating_mul(cfg.n_layers as u64 + 1))
        .add("logits [N, V]", f32_bytes(&[n, v]))
        // Model: 4 [N, C] + 2 [N]; LayerGrads: [N, H·D + (H + 2·KV)·D + 3·F]; backend: head-major
        // q/k/v, the fused projection, dq/dk/dv and QK-norm copies; dW slots: 2 × [N, C + max].
        .add(
            "gradients and scratch",
            f32_bytes(&[n, 4 * c + 2 + qd + qkv + 3 * f + 3 * qkv + qk * (qd + kd) + 2 * (c + (2 * f).max(qkv))]),
        );
    if training {
        est.add("weights, gradients and AdamW state", crate::memory::bytes(16, &[cfg.param_count()]));
    }
    est
}

impl Model {
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, par: Par, backend: Box<dyn Backend>) -> Result<Self> {
        cfg.validate()?;
        ensure!(b > 0, "--batch must be at least 1");
        ensure!(t > 0, "--seq must be at least 1");
        cfg.check_seq(t)?;
        ensure!(
            backend.shape() == (b, t),
            "the {} backend was built for B={}, T={}, the model for B={b}, T={t}",
            backend.name(),
            backend.shape().0,
            backend.shape().1
        );
        let n = b * t;
        let c = cfg.dim;
        let z = |len: usize| crate::memory::try_vec_f32(len, "the model's [B·T, C] buffers");
        let keep_probs = backend.keeps_probs();
        let acts = (0..cfg.n_layers).map(|_| LayerActs::new(cfg, b, t, keep_probs)).collect::<Result<_>>()?;
        let grads = LayerGrads::new(cfg, b, t)?;
        let overlap = backend.overlaps_dw();
        let mut model = Model {
            cfg: cfg.clone(),
            layout: ParamLayout::new(cfg),
            b,
            t,
            par,
            backend,
            acts,
            x_final: z(n * c)?,
            rstd_final: z(n)?,
            xf: z(n * c)?,
            logits: crate::memory::try_vec_f32(n * cfg.vocab_size, "the logits [B·T, V]")?,
            losses: z(n)?,
            dx: z(n * c)?,
            dxn: z(n * c)?,
            grads,
            dw: None,
            grad_ready: None,
            lora: None,
            compact: None,
            times: PhaseTimes::default(),
        };
        model.set_dw_overlap(overlap)?;
        Ok(model)
    }

    /// Runs each layer's weight-gradient GEMMs on a CPU worker thread while the backend
    /// evaluates the next kernels (`true`), or inline between them (`false`); gradients and
    /// losses are bit-identical either way. The default is the backend's `overlaps_dw()`.
    /// Switching on starts the worker's thread pool and allocates its slots (2 × N·(C +
    /// max(2·F, (H + 2·KV)·D)) floats): do it before the step loop, not in it.
    pub fn set_dw_overlap(&mut self, on: bool) -> Result<()> {
        // A LoRA backward has no base dW GEMMs to overlap.
        let on = on && self.lora.is_none();
        if on == self.dw.is_some() {
            return Ok(());
        }
        self.dw = None;
        if on {
            let (n, c) = (self.n(), self.cfg.dim);
            let proj = (2 * self.cfg.ffn_dim).max(self.cfg.q_dim() + 2 * self.cfg.kv_dim());
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(self.par.threads.max(1))
                .thread_name(|i| format!("anetrain-dw-{i}"))
                .build()
                .context("cannot start the dW worker's thread pool")?;
            let slots = (0..DW_SLOTS).map(|_| DwSlot { dout: vec![0.0; n * c], dproj: vec![0.0; n * proj] }).collect();
            self.dw = Some(DwOverlap { pool, slots });
        }
        Ok(())
    }

    /// Whether dW overlap is on (see `set_dw_overlap`).
    pub fn dw_overlap(&self) -> bool {
        self.dw.is_some()
    }

    /// Calls `hook` from `forward_backward` with each per-layer gradient tensor (Wqkv, Wo,
    /// the norm gains, W13, W2 of every layer) once the micro-batch's backward has finished
    /// it; the embedding, final norm and classifier gradients are final when
    /// `forward_backward` returns and are not reported. `None` removes the hook.
    pub fn set_grad_ready(&mut self, hook: Option<GradReady>) {
        self.grad_ready = hook;
    }

    /// Declares that the parameters passed to `forward`/`forward_backward` stay unchanged
    /// while `version` does (`None`: no promise, the default). Backends that stage weights
    /// (the MIL backends) then keep each layer's weights staged across micro-batches.
    /// Runs the classifier and the loss over the vocabulary subset `ids` (ascending full
    /// ids; see `crate::compact`), or over the whole vocabulary with `None`.
    pub fn set_compact_vocab(&mut self, ids: Option<Vec<u32>>) -> Result<()> {
        ensure!(ids.is_none() || self.lora.is_none(), "--compact-vocab does not combine with LoRA training");
        self.compact = match ids {
            Some(ids) => Some(crate::compact::CompactVocab::new(ids, self.cfg.vocab_size, self.cfg.dim, self.n())?),
            None => None,
        };
        Ok(())
    }

    /// The vocabulary subset in use, if any.
    pub fn compact_vocab(&self) -> Option<&crate::compact::CompactVocab> {
        self.compact.as_ref()
    }

    /// See `Backend::begin_update`.
    pub fn begin_update(&mut self, update: usize) {
        self.backend.begin_update(update);
    }

    /// See `Backend::compiles_needed`.
    pub fn compiles_needed(&self, update: usize) -> usize {
        self.backend.compiles_needed(update)
    }

    /// See `Backend::compiles`.
    pub fn compiles(&self) -> usize {
        self.backend.compiles()
    }

    pub fn set_weights_version(&mut self, version: Option<u64>) {
        self.backend.set_weights_version(version);
    }

    /// A model on the `cpu` backend.
    pub fn cpu(cfg: &ModelConfig, b: usize, t: usize, par: Par) -> Result<Self> {
        Self::new(cfg, b, t, par, Box::new(crate::backend::cpu::CpuBackend::new(cfg, b, t, par)))
    }

    /// The parallelism the model's ops run with.
    pub fn par(&self) -> Par {
        self.par
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Rows per micro-batch (B·T).
    pub fn n(&self) -> usize {
        self.b * self.t
    }

    /// Layer `l`'s keys and values `[N, KV·D]` (after QK-norm and RoPE) from the last forward:
    /// what a KV cache holds after prefilling these positions.
    pub fn kv(&self, l: usize) -> (&[f32], &[f32]) {
        (&self.acts[l].k, &self.acts[l].v)
    }

    /// `[N, V]` logits of the last `forward` (not valid after `forward_backward`).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn check_batch(&self, params: &[f32], tokens: &[u32], targets: &[u32]) -> Result<()> {
        let n = self.n();
        ensure!(
            params.len() == self.layout.total,
            "parameter arena has {} values, model needs {}",
            params.len(),
            self.layout.total
        );
        ensure!(tokens.len() == n && targets.len() == n, "micro-batch must hold B·T = {n} tokens and targets");
        Ok(())
    }

    /// Forward pass through the classifier; leaves logits in place. Returns the raw loss.
    pub fn forward(&mut self, params: &[f32], tokens: &[u32], targets: &[u32]) -> Result<LossSum> {
        self.forward_with(params, None, tokens, targets)
    }

    /// `forward`, with LoRA adapters merged in when given (the model must have `set_lora`).
    pub fn forward_with(
        &mut self,
        params: &[f32],
        adapters: Option<&[f32]>,
        tokens: &[u32],
        targets: &[u32],
    ) -> Result<LossSum> {
        self.check_batch(params, tokens, targets)?;
        self.check_adapters(adapters)?;
        ensure!(
            adapters.is_some() || self.lora_base_bf16().is_none(),
            "this model's layers are held in bf16 with its LoRA adapters: pass the adapters"
        );
        let start = Instant::now();
        let kernel_ms = self.forward_to_logits(params, adapters, tokens)?;
        let n = self.n();
        let (v, targets) = match self.compact.as_mut() {
            Some(cv) => {
                cv.remap(targets)?;
                (cv.len(), cv.targets.as_slice())
            }
            None => (self.cfg.vocab_size, targets),
        };
        cross_entropy_forward(&mut self.losses, &self.logits[..n * v], targets, v);
        let (sum, count) = loss_sum(&self.losses, targets);
        self.times = PhaseTimes { forward_ms: ms_since(start), kernel_ms, ..PhaseTimes::default() };
        Ok(LossSum { sum, count })
    }

    /// Returns the time spent in backend kernels, in ms. With `adapters` (LoRA on), each
    /// layer runs on its weights with the adapters merged in.
    fn forward_to_logits(&mut self, params: &[f32], adapters: Option<&[f32]>, tokens: &[u32]) -> Result<f64> {
        let (par, n, c, v) = (self.par, self.n(), self.cfg.dim, self.cfg.vocab_size);
        let eps = self.cfg.norm_eps as f32;
        let layout = &self.layout;
        let mut kernel_ms = 0.0;
        embedding_forward(&mut self.acts[0].x_in, tokens, layout.view(params, layout.embed), c);
        for l in 0..self.cfg.n_layers {
            let merge = prof::op("layer weights for the kernels (LoRA merge / widen)");
            let (w, lw) = match (self.lora.as_mut(), adapters) {
                (Some(lr), Some(ad)) => lr.merged_layer(par, layout, params, ad, l),
                _ => (layout.layer(params, l), None),
            };
            drop(merge);
            let (this, rest) = self.acts[l..].split_first_mut().expect("layer exists");
            let x_out = match rest.first_mut() {
                Some(next) => &mut next.x_in,
                None => &mut self.x_final,
            };
            let scratch = &mut self.dxn; // `[N, C]` block output before the residual add
            let t = prof::op("rmsnorm fwd, residual add");
            rmsnorm_forward(&mut this.xn1, &mut this.rstd1, &this.x_in, w.attn_norm, n, c, eps);
            drop(t);
            timed(&mut kernel_ms, || match &lw {
                Some(lw) => self.backend.attention_forward_lowp(scratch, this, &w, lw),
                None => self.backend.attention_forward(scratch, this, &w),
            })?;
            let t = prof::op("rmsnorm fwd, residual add");
            add(&mut this.x_mid, &this.x_in, scratch);
            rmsnorm_forward(&mut this.xn2, &mut this.rstd2, &this.x_mid, w.ffn_norm, n, c, eps);
            drop(t);
            timed(&mut kernel_ms, || match &lw {
                Some(lw) => self.backend.ffn_forward_lowp(scratch, this, &w, lw),
                None => self.backend.ffn_forward(scratch, this, &w),
            })?;
            let _t = prof::op("rmsnorm fwd, residual add");
            add(x_out, &this.x_mid, scratch);
        }
        let final_norm = layout.view(params, layout.final_norm);
        let t = prof::op("rmsnorm fwd, residual add");
        rmsnorm_forward(&mut self.xf, &mut self.rstd_final, &self.x_final, final_norm, n, c, eps);
        drop(t);
        let mut e = layout.view(params, layout.classifier());
        let mut v = v;
        if let Some(cv) = self.compact.as_mut() {
            cv.gather(e, c);
            (e, v) = (&cv.e, cv.len());
        }
        let logits = &mut self.logits[..n * v];
        let mut classifier_ms = 0.0;
        let on_backend = timed(&mut classifier_ms, || self.backend.classifier_forward(logits, &self.xf, e))?;
        let lowp = self.lora.as_mut().and_then(|l| l.lowp_gemm()).filter(|_| adapters.is_some());
        let _t = (!on_backend).then(|| prof::gemm("classifier fwd x·Eᵀ", n, v, c)).flatten();
        if on_backend {
            kernel_ms += classifier_ms;
        } else if let Some(g) = lowp {
            g.gemm(par, n, v, c, &self.xf, c, crate::ops::gemm_bf16::Bf16Rhs::TF32(e, c), logits, v, false);
        } else {
            matmul_forward(par, logits, &self.xf, e, n, c, v);
        }
        Ok(kernel_ms)
    }

    /// Forward and backward of one micro-batch. Gradients of `loss_scale · mean_loss /
    /// accum` are **added** to `grads` (same layout as `params`), so that `accum`
    /// micro-batches sum to the scaled gradient of their average loss.
    pub fn forward_backward(
        &mut self,
        params: &[f32],
        grads: &mut [f32],
        tokens: &[u32],
        targets: &[u32],
        loss_scale: f32,
        accum: usize,
    ) -> Result<LossSum> {
        self.check_batch(params, tokens, targets)?;
        ensure!(grads.len() == params.len(), "gradient arena does not match the parameters");
        let start = Instant::now();
        ensure!(self.lora.is_none(), "this model trains LoRA adapters: call forward_backward_lora");
        let kernel_fwd_ms = self.forward_to_logits(params, None, tokens)?;
        let (par, n, c) = (self.par, self.n(), self.cfg.dim);
        let (v, targets) = match self.compact.as_mut() {
            Some(cv) => {
                cv.remap(targets)?;
                (cv.len(), cv.targets.as_slice())
            }
            None => (self.cfg.vocab_size, targets),
        };
        let count = targets.iter().filter(|&&t| t != crate::ops::cross_entropy::IGNORE).count();
        let dscale = loss_scale / (count.max(1) * accum.max(1)) as f32;
        cross_entropy_fused(&mut self.losses, &mut self.logits[..n * v], targets, v, dscale);
        let (sum, count) = loss_sum(&self.losses, targets);
        let mid = Instant::now();
        let forward_ms = (mid - start).as_secs_f64() * 1e3;

        let layout = &self.layout;
        let dlogits = &self.logits[..n * v];
        // Classifier: dxf = dlogits · E, dE += dlogitsᵀ · xf (over the subset's rows with
        // --compact-vocab, then added into the full gradient's rows).
        match self.compact.as_mut() {
            Some(cv) => {
                matmul_backward_dx(par, &mut self.dxn, dlogits, &cv.e, n, c, v, false);
                cv.de.fill(0.0);
                matmul_backward_dw(par, &mut cv.de, dlogits, &self.xf, n, c, v);
                cv.scatter_add(layout.view_mut(grads, layout.classifier()), c);
            }
            None => {
                let e = layout.view(params, layout.classifier());
                matmul_backward_dx(par, &mut self.dxn, dlogits, e, n, c, v, false);
                matmul_backward_dw(par, layout.view_mut(grads, layout.classifier()), dlogits, &self.xf, n, c, v);
            }
        }
        let (final_norm, d_final_norm) = (layout.view(params, layout.final_norm), layout.final_norm);
        rmsnorm_backward(
            &mut self.dx,
            layout.view_mut(grads, d_final_norm),
            &self.dxn,
            &self.rstd_final,
            &self.x_final,
            final_norm,
            n,
            c,
            false,
        );

        let (f, qd, kd) = (self.cfg.ffn_dim, self.cfg.q_dim(), self.cfg.kv_dim());
        let n_layers = self.cfg.n_layers;
        // Field by field, so that the worker can borrow the activations and slots while the
        // main thread keeps the backend and the gradient buffers it overwrites.
        let Model { layout, backend, acts, dx, dxn, grads: g, dw, grad_ready, .. } = self;
        let (layout, acts): (&ParamLayout, &[LayerActs]) = (layout, acts);
        let ready = Ready { hook: grad_ready.as_deref(), base: grads.as_ptr() as usize };
        let layer_grads = layout.layers_mut_rev(grads);
        // The scope joins the worker before returning, even on an error or a panic.
        let (kernel_bwd_ms, dw_ms, dw_wait_ms) = std::thread::scope(|s| -> Result<(f64, f64, f64)> {
            let (mut sink, worker) = match dw {
                None => (DwSink::Inline { dw_ms: 0.0 }, None),
                Some(DwOverlap { pool, slots }) => {
                    let (job_tx, job_rx) = sync_channel(slots.len());
                    let (free_tx, free_rx) = sync_channel(slots.len());
                    for slot in slots.iter_mut() {
                        free_tx.send(slot).expect("the free list holds every slot");
                    }
                    // The thread waits while the worker loop runs on the pool, whose threads
                    // are the ones the worker's GEMMs split over.
                    let pool = &*pool;
                    let worker = s.spawn(move || pool.install(|| dw_worker(par, n, c, job_rx, free_tx)));
                    (DwSink::Worker { jobs: job_tx, free: free_rx, wait_ms: 0.0 }, Some(worker))
                }
            };
            let mut kernel_ms = 0.0;
            let backward_layers = || -> Result<()> {
                for (l, gw) in (0..n_layers).rev().zip(layer_grads) {
                    let w = layout.layer(params, l);
                    let a = &acts[l];
                    let LayerTensors { attn_norm, wqkv, wo, bqkv, mut q_norm, mut k_norm, ffn_norm, w13, w2, .. } = gw;
                    // FFN block: its output gradient is the residual gradient dx.
                    timed(&mut kernel_ms, || backend.ffn_backward_dx(dxn, g, dx, a, &w))?;
                    let ffn = BlockDw {
                        d_out_proj: w2,
                        out_proj_in: &a.gate,
                        w_out: f,
                        d_in_proj: w13,
                        in_proj_in: &a.xn2,
                        w_in: 2 * f,
                        ready,
                    };
                    sink.submit(par, n, c, ffn, dx, &g.dh13)?;
                    rmsnorm_backward(dx, ffn_norm, dxn, &a.rstd2, &a.x_mid, w.ffn_norm, n, c, true);
                    ready.report(ffn_norm);
                    // Attention block.
                    let norm_grads = QkNormGrads { q_norm: q_norm.as_deref_mut(), k_norm: k_norm.as_deref_mut() };
                    timed(&mut kernel_ms, || backend.attention_backward_dx(dxn, g, norm_grads, dx, a, &w))?;
                    for qk in [&q_norm, &k_norm].into_iter().flatten() {
                        ready.report(qk);
                    }
                    let attn = BlockDw {
                        d_out_proj: wo,
                        out_proj_in: &a.attn,
                        w_out: qd,
                        d_in_proj: wqkv,
                        in_proj_in: &a.xn1,
                        w_in: qd + 2 * kd,
                        ready,
                    };
                    sink.submit(par, n, c, attn, dx, &g.dqkv)?;
                    if let Some(db) = bqkv {
                        // Tiny next to the GEMMs; on this thread, before g.dqkv is reused.
                        bias_backward(db, &g.dqkv);
                        ready.report(db);
                    }
                    rmsnorm_backward(dx, attn_norm, dxn, &a.rstd1, &a.x_in, w.attn_norm, n, c, true);
                    ready.report(attn_norm);
                }
                Ok(())
            };
            let result = backward_layers();
            let (dw_ms, wait_ms) = match sink {
                DwSink::Inline { dw_ms } => (dw_ms, 0.0),
                DwSink::Worker { jobs, free, mut wait_ms } => {
                    // Closing the queue ends the worker loop once the queued jobs are done.
                    drop((jobs, free));
                    let worker = worker.expect("a worker sink has a worker thread");
                    let start = Instant::now();
                    let dw_ms = worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    wait_ms += ms_since(start);
                    (dw_ms, wait_ms)
                }
            };
            result.map(|()| (kernel_ms, dw_ms, wait_ms))
        })?;
        embedding_backward(layout.view_mut(grads, layout.embed), dx, tokens, c);
        self.times = PhaseTimes {
            forward_ms,
            backward_ms: ms_since(mid),
            kernel_ms: kernel_fwd_ms + kernel_bwd_ms,
            dw_ms,
            dw_wait_ms,
        };
        Ok(LossSum { sum, count })
    }
}

/// out = a + b, elementwise.
fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention probabilities `[B, H, T, T]` are saved only for backends that read them
    /// back; the MIL backends recompute them, so no layer of theirs allocates the buffer.
    #[test]
    fn probs_are_allocated_only_for_backends_that_keep_them() {
        let cfg = ModelConfig { n_layers: 2, ..ModelConfig::preset("stories260k").unwrap() };
        let (b, t, par) = (1, 32, Par::seq());
        let cpu = Model::cpu(&cfg, b, t, par).unwrap();
        assert!(cpu.acts.iter().all(|a| a.probs.len() == b * cfg.n_heads * t * t));
        let runner = Box::new(crate::mil::sim::SimRunner::new(par));
        let mil = crate::mil::backend::MilBackend::new(&cfg, b, t, crate::mil::emit::InputLayout::Packed, runner);
        let sim = Model::new(&cfg, b, t, par, Box::new(mil.unwrap())).unwrap();
        assert!(sim.acts.iter().all(|a| a.probs.is_empty()));
    }
}
