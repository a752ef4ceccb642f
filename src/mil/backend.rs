//! The kernel set as a `Backend` over any `KernelRunner`: `mil-sim` (the fp16 simulator) and
//! `ane` (the hardware) run the same MIL programs through the same staging code.
//!
//! Staging converts between the model's row-major f32 `[N, X]` activations and the
//! accelerator's fp16 `[1, X, 1, S]` tensors (one sequence of the micro-batch per
//! evaluation; positions T..S are zero), and writes each weight in the `[IC, OC]` form its
//! kernel expects. Every kernel has one slot (input buffers, on the hardware IOSurfaces and a
//! request) per layer; a layer's weights are written into its slot when the weights version
//! the model promised (`Backend::set_weights_version`) or their probe changes, so within an
//! optimizer update only activations are written. Without a version they are staged on every
//! call (once, for the first sequence of the micro-batch).
//!
//! The residual stream, RMSNorms, loss and the classifier's backward stay in f32 on the CPU
//! (the model's orchestration); the classifier's forward runs as chunked kernels. Only the
//! kernels' inputs and outputs are fp16. QK-norm's backward (a
//! per-head RMSNorm backward and its gain gradient) runs on the CPU between `sdpa_bwd2`
//! and `q_bwd`, from the pre-norm projections the forward kernel exports.

use super::KernelRunner;
use super::emit::{InputLayout, Kernel, KernelSet, Piece};
use crate::backend::qkv::qkv_backward;
use crate::backend::{Backend, LayerActs, LayerGrads, QkNormGrads, Weights};
use crate::config::ModelConfig;
use anyhow::{Context, Result, ensure};
use half::f16;

/// One source for a piece of a kernel input.
enum Src<'a> {
    /// Rows of one sequence: `[T, ld]` f32, the piece's channels at column `col`.
    Act { rows: &'a [f32], ld: usize, col: usize },
    /// A weight `[OC, IC]` (HF `[out, in]`) staged transposed as `[IC, OC]`.
    WeightT(&'a [f32]),
    /// The first `rows` rows of a weight `[rows, IC]`, staged transposed as `[IC, OC]`;
    /// columns past `rows` are zero (the classifier's last chunk).
    WeightTRows(&'a [f32], usize),
    /// A weight already `[IC, OC]` = `[channels, width]`, staged as-is.
    Weight(&'a [f32]),
    /// A vector `[ch]` staged as one column.
    Column(&'a [f32]),
    /// fp16 channels copied unconverted from an earlier kernel's output `[*, S]`.
    Half { data: &'a [f16], chan: usize },
}

/// The runner with the loaded kernel set: everything `run` and `read` need, kept apart
/// from the backend's scratch so both can be borrowed at once.
struct Exec {
    runner: Box<dyn KernelRunner>,
    set: KernelSet,
    /// runner handles, in `KernelSet::all()` order, then the classifier
    ids: [usize; 11],
    /// T and its padded width S
    t: usize,
    s: usize,
    /// The weights version promised by the model (`Backend::set_weights_version`).
    version: Option<u64>,
    /// Per kernel, per slot: (version, probe) of the weights staged there.
    staged: Vec<Vec<Option<(u64, u64)>>>,
    /// Weight stagings so far (kernel × slot), for tests and telemetry.
    stagings: usize,
    /// Per kernel: the runner handle evaluated last, whose output `read` reads (in static
    /// mode each layer has its own program).
    last: [usize; 11],
    /// Static mode: weights baked into per-layer programs.
    statics: Option<Static>,
}

/// Static mode (`--ane-mode static`, the original's large-model pipeline, facts §3.7, §6.2).
///
/// Every weight-bearing kernel is compiled once per layer with that layer's weights baked in
/// as BLOBFILE constants (`super::bake`); the weight-free attention-backward kernels and the
/// CPU parts are shared with dynamic mode. Weights are baked at the first kernel call of the
/// layer in each *bake epoch*, `update / every`: so a layer's programs hold the weights as
/// they were before update `k·every`, and updates `k·every .. (k+1)·every − 1` run their
/// forward and dx kernels on those stale weights, as the original did between recompiles.
/// Everything on the CPU uses the current weights: embedding, RMSNorms, the classifier
/// (on the CPU in static mode, as in the original's static pipeline), the loss, and every
/// weight-gradient GEMM (which reads activations, not weights). A backend never told the
/// update (`begin_update`) stays in epoch 0: its first weights are baked once.
///
/// Because the epoch is a function of the update index, a process restarted at an epoch
/// boundary (the compile-budget restart) bakes exactly what an uninterrupted process bakes.
/// A manual `--resume` from a checkpoint inside an epoch bakes the resumed weights, which
/// an uninterrupted run would not have used until the next boundary.
struct Static {
    every: usize,
    /// The epoch the next kernel calls must run in.
    want: usize,
    /// Per layer: the epoch whose weights its programs hold.
    epoch_of: Vec<Option<usize>>,
    /// `[kernel][layer]` runner handle and baked kernel, for the kernels in `BAKED`.
    baked: Vec<Vec<Option<(usize, Kernel)>>>,
}

/// The weight-bearing kernels, baked per layer in static mode.
const BAKED: [usize; 8] = [ATTN_FWD, WO_FWD, FFN_FWD, FFN_BWD_W2T, FFN_BWD_W13T, WO_BWD, Q_BWD, KV_BWD];

/// Whether piece `name` of a kernel is a weight (baked in static mode).
fn is_weight(name: &str) -> bool {
    matches!(name, "wq" | "wk" | "wv" | "qn" | "kn" | "wo" | "w1" | "w3" | "w2")
}

/// Kernel `which` of the set: a `KernelSet::all()` index, or `CLASSIFIER`.
fn kernel_of(set: &KernelSet, which: usize) -> &Kernel {
    if which == CLASSIFIER { &set.classifier } else { set.all()[which] }
}

/// A cheap fingerprint of some weights: 8 evenly spaced values of each, and the lengths. A
/// guard on top of the version promise: an update that changes whole tensors (any optimizer
/// step, a load) changes it even if a caller forgot to bump the version.
fn probe(weights: &[&[f32]]) -> u64 {
    let mut h = crate::hash::Fnv1a::default();
    for w in weights {
        // The buffer's address and length catch "a different parameter buffer" outright.
        h.word(w.as_ptr() as u64).word(w.len() as u64);
        for i in 0..8.min(w.len()) {
            h.word(u64::from(w[i * w.len() / 8.min(w.len())].to_bits()));
        }
    }
    h.finish()
}

impl Exec {
    /// Whether `slot` of kernel `which` needs `weights` staged: always without a weights
    /// version, else when the version or the probe differs from what was staged there.
    /// Records the new state, so the caller must then stage them.
    fn stale(&mut self, which: usize, slot: usize, weights: &[&[f32]]) -> bool {
        if self.statics.is_some() && BAKED.contains(&which) {
            return false; // the weights are constants of the layer's own program
        }
        let now = self.version.map(|v| (v, probe(weights)));
        let cell = &mut self.staged[which][slot];
        if now.is_some() && *cell == now {
            return false;
        }
        *cell = now;
        self.stagings += 1;
        true
    }

    /// Writes the given pieces into `slot` of kernel `which` and evaluates it.
    /// Pieces given as `None` are left as they are (weights already staged in that slot).
    fn run(&mut self, which: usize, slot: usize, srcs: &[(&str, Option<Src>)]) -> Result<()> {
        let baked = self.statics.as_ref().and_then(|st| st.baked[which].get(slot)?.as_ref());
        let (k, id, slot) = match baked {
            Some((id, k)) => (k, *id, 0),
            None => (kernel_of(&self.set, which), self.ids[which], slot),
        };
        self.last[which] = id;
        let t = self.t;
        let runner = &mut self.runner;
        let mut attempt = || -> Result<()> {
            for (input, sig) in k.program.inputs.iter().enumerate() {
                let width = sig.shape[3];
                let mine = |(name, src): &(&str, Option<Src>)| src.is_some() && k.piece(name).input == input;
                if !srcs.iter().any(mine) {
                    continue;
                }
                runner.write_input(id, slot, input, &mut |buf| {
                    for (name, src) in srcs.iter() {
                        if let Some(src) = src {
                            let p = k.piece(name);
                            if p.input == input {
                                put(buf, width, p, src, t);
                            }
                        }
                    }
                })?;
            }
            runner.eval(id, slot).with_context(|| format!("evaluating kernel {}", k.program.name))
        };
        let result = attempt();
        if result.is_err() {
            self.forget_staged();
        }
        result
    }

    /// Forgets what every slot holds, so everything is staged again: after a failed kernel
    /// call, slots marked staged for this call's other kernels may never have been written.
    fn forget_staged(&mut self) {
        self.staged.iter_mut().flatten().for_each(|c| *c = None);
    }

    /// Reads output part `name` of kernel `which` into `[T, ld]` rows at column `col`.
    /// Copies kernel `which`'s fp16 output into `buf` unconverted; returns it with output
    /// part `name`'s first channel, for `take` and for the next kernel (`Src::Half`).
    fn read_half<'b>(&mut self, which: usize, name: &str, buf: &'b mut [f16]) -> Result<(&'b [f16], usize)> {
        let (chan, _) = kernel_of(&self.set, which).out_part(name);
        self.runner.read_output(self.last[which], 0, &mut |out| buf[..out.len()].copy_from_slice(out))?;
        Ok((buf, chan))
    }

    fn read(&mut self, which: usize, name: &str, rows: &mut [f32], ld: usize, col: usize) -> Result<()> {
        let (chan, ch) = kernel_of(&self.set, which).out_part(name);
        let (s, t) = (self.s, self.t);
        self.runner.read_output(self.last[which], 0, &mut |out| take(out, s, chan, ch, rows, ld, col, t))
    }
}

pub struct MilBackend {
    exec: Exec,
    /// C, H, KV, D, F, B
    c: usize,
    h: usize,
    kv: usize,
    d: usize,
    f: usize,
    b: usize,
    eps: f32,
    /// copy of `sdpa_bwd1`'s whole output `[1, KD + 2·H·S, 1, S]`, fed to `sdpa_bwd2`
    bwd1_out: Vec<f16>,
    /// `[N, H·D]`, `[N, KV·D]`, `[N, KV·D]`: q/k/v gradients from the attention kernels
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// fp16 copy of `ffn_bwd_w2t`'s or `wo_bwd`'s output `[1, F or H·D, 1, S]`: the next
    /// kernel takes dgate / dattn from it unconverted
    grad_out: Vec<f16>,
    /// `[N, C]` the q projection's share of the attention input's gradient
    dx_q: Vec<f32>,
}

fn put(buf: &mut [f16], width: usize, p: &Piece, src: &Src, t: usize) {
    let row = |ch: usize| (p.chan_off + ch) * width + p.col_off;
    match *src {
        Src::Act { rows, ld, col } => {
            for ch in 0..p.ch {
                let dst = &mut buf[row(ch)..row(ch) + p.width];
                for (s, d) in dst.iter_mut().enumerate() {
                    *d = if s < t { f16::from_f32(rows[s * ld + col + ch]) } else { f16::ZERO };
                }
            }
        }
        Src::WeightT(w) => {
            for ch in 0..p.ch {
                for (o, d) in buf[row(ch)..row(ch) + p.width].iter_mut().enumerate() {
                    *d = f16::from_f32(w[o * p.ch + ch]);
                }
            }
        }
        Src::WeightTRows(w, rows) => {
            for ch in 0..p.ch {
                for (o, d) in buf[row(ch)..row(ch) + p.width].iter_mut().enumerate() {
                    *d = if o < rows { f16::from_f32(w[o * p.ch + ch]) } else { f16::ZERO };
                }
            }
        }
        Src::Weight(w) => {
            for ch in 0..p.ch {
                let src = &w[ch * p.width..(ch + 1) * p.width];
                for (d, &x) in buf[row(ch)..row(ch) + p.width].iter_mut().zip(src) {
                    *d = f16::from_f32(x);
                }
            }
        }
        Src::Column(v) => {
            for (ch, &x) in v.iter().enumerate().take(p.ch) {
                buf[row(ch)] = f16::from_f32(x);
            }
        }
        Src::Half { data, chan } => {
            for ch in 0..p.ch {
                let from = (chan + ch) * p.width;
                buf[row(ch)..row(ch) + p.width].copy_from_slice(&data[from..from + p.width]);
            }
        }
    }
}

/// Output channels `[chan, chan + ch)` of an `[*, S]` output into rows `[T, ld]` at `col`.
#[allow(clippy::too_many_arguments)]
fn take(out: &[f16], s: usize, chan: usize, ch: usize, rows: &mut [f32], ld: usize, col: usize, t: usize) {
    for c in 0..ch {
        let src = &out[(chan + c) * s..(chan + c) * s + t];
        for (pos, &x) in src.iter().enumerate() {
            rows[pos * ld + col + c] = x.to_f32();
        }
    }
}

/// Per-row 1/rms over `d`-wide groups (QK-norm's saved statistic, recomputed from the
/// kernel's exported pre-norm projection).
fn group_rstd(rstd: &mut [f32], x: &[f32], d: usize, eps: f32) {
    for (r, g) in rstd.iter_mut().zip(x.chunks_exact(d)) {
        let ms = g.iter().map(|v| v * v).sum::<f32>() / d as f32;
        *r = 1.0 / (ms + eps).sqrt();
    }
}

const ATTN_FWD: usize = 0;
const WO_FWD: usize = 1;
const FFN_FWD: usize = 2;
const FFN_BWD_W2T: usize = 3;
const FFN_BWD_W13T: usize = 4;
const WO_BWD: usize = 5;
const SDPA_BWD1: usize = 6;
const SDPA_BWD2: usize = 7;
const Q_BWD: usize = 8;
const KV_BWD: usize = 9;
const CLASSIFIER: usize = 10;

/// `[T, width]` rows of sequence `bi` from an `[N, width]` buffer.
fn seq(v: &[f32], bi: usize, t: usize, width: usize) -> &[f32] {
    &v[bi * t * width..(bi + 1) * t * width]
}

fn seq_mut(v: &mut [f32], bi: usize, t: usize, width: usize) -> &mut [f32] {
    &mut v[bi * t * width..(bi + 1) * t * width]
}

fn act(v: &[f32], bi: usize, t: usize, width: usize) -> Src<'_> {
    Src::Act { rows: seq(v, bi, t, width), ld: width, col: 0 }
}

impl MilBackend {
    /// Emits the kernel set for (config, T) and loads it into `runner`.
    pub fn new(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        layout: InputLayout,
        runner: Box<dyn KernelRunner>,
    ) -> Result<Self> {
        Self::build(cfg, b, t, layout, runner, None)
    }

    /// Static mode (see `Static`): weights baked into per-layer programs, rebaked every
    /// `recompile_every` updates. Only the weight-free kernels are compiled here; each
    /// layer's programs are compiled at its first kernel call.
    pub fn new_static(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        recompile_every: usize,
        runner: Box<dyn KernelRunner>,
    ) -> Result<Self> {
        ensure!(recompile_every >= 1, "--recompile-every must be at least 1 (updates between recompiles)");
        Self::build(cfg, b, t, InputLayout::Separate, runner, Some(recompile_every))
    }

    fn build(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        layout: InputLayout,
        mut runner: Box<dyn KernelRunner>,
        recompile_every: Option<usize>,
    ) -> Result<Self> {
        cfg.validate()?;
        let set = KernelSet::new(cfg, t, layout)?;
        // One slot per layer (each layer's weights stay staged in its own input buffers),
        // one per vocabulary chunk for the classifier. Static mode loads only the
        // weight-free kernels here (and runs the classifier on the CPU).
        let mut ids = [usize::MAX; 11];
        let slots: Vec<usize> = [cfg.n_layers; 10].into_iter().chain([set.classifier_chunks.count]).collect();
        for (which, ((id, k), &n)) in
            ids.iter_mut().zip(set.all().into_iter().chain([&set.classifier])).zip(&slots).enumerate()
        {
            if recompile_every.is_some() && (BAKED.contains(&which) || which == CLASSIFIER) {
                continue;
            }
            *id = runner
                .load(&k.program, n)
                .with_context(|| format!("loading kernel {} on {}", k.program.name, runner.name()))?;
        }
        let statics = recompile_every.map(|every| Static {
            every,
            want: 0,
            epoch_of: vec![None; cfg.n_layers],
            baked: (0..11).map(|_| (0..cfg.n_layers).map(|_| None).collect()).collect(),
        });
        let staged = slots.iter().map(|&n| vec![None; n]).collect();
        let n = b * t;
        let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
        let bwd1 = set.sdpa_bwd1.program.outputs[0].elems();
        let grad_out = set.ffn_bwd_w2t.program.outputs[0].elems().max(set.wo_bwd.program.outputs[0].elems());
        let s = set.dims.s;
        Ok(MilBackend {
            exec: Exec { runner, set, ids, t, s, version: None, staged, stagings: 0, last: ids, statics },
            c: cfg.dim,
            h: cfg.n_heads,
            kv: cfg.n_kv_heads,
            d: cfg.head_dim,
            f: cfg.ffn_dim,
            b,
            eps: cfg.norm_eps as f32,
            bwd1_out: vec![f16::ZERO; bwd1],
            dq: vec![0.0; n * qd],
            dk: vec![0.0; n * kd],
            dv: vec![0.0; n * kd],
            grad_out: vec![f16::ZERO; grad_out],
            dx_q: vec![0.0; n * cfg.dim],
        })
    }

    /// `logits [N, V] = xf [N, C] · Eᵀ` for the classifier `e` `[V, C]`, one vocabulary chunk
    /// per slot of the classifier kernel.
    pub fn classifier_logits(&mut self, logits: &mut [f32], xf: &[f32], e: &[f32]) -> Result<()> {
        let (c, t) = (self.c, self.exec.t);
        let v = e.len() / c;
        let chunk = self.exec.set.classifier_chunks;
        // A compacted vocabulary (`--compact-vocab`) uses only the first chunks.
        for j in 0..chunk.count.min(v.div_ceil(chunk.rows)) {
            let first = j * chunk.rows;
            let rows = chunk.rows.min(v - first);
            let e_chunk = &e[first * c..(first + rows) * c];
            let fresh = self.exec.stale(CLASSIFIER, j, &[e_chunk]);
            for bi in 0..self.b {
                let stage = bi == 0 && fresh;
                let srcs = [("xf", Some(act(xf, bi, t, c))), ("e", stage.then_some(Src::WeightTRows(e_chunk, rows)))];
                let e_ = &mut self.exec;
                e_.run(CLASSIFIER, j, &srcs)?;
                let (s, id) = (e_.s, e_.ids[CLASSIFIER]);
                let out = seq_mut(logits, bi, t, v);
                e_.runner.read_output(id, 0, &mut |o| take(o, s, 0, rows, out, v, first, t))?;
            }
        }
        Ok(())
    }

    /// Weight stagings so far (one per kernel and slot whose weights were converted).
    pub fn weight_stagings(&self) -> usize {
        self.exec.stagings
    }

    /// Static mode: compiles layer `w.layer`'s programs with its current weights baked in,
    /// unless they already hold the wanted epoch's (unloading the ones they replace).
    fn ensure_baked(&mut self, w: &Weights) -> Result<()> {
        let e = &mut self.exec;
        let Some(st) = e.statics.as_mut() else { return Ok(()) };
        let layer = w.layer;
        if st.epoch_of[layer] == Some(st.want) {
            return Ok(());
        }
        let (c, d) = (self.c, self.d);
        let (qd, kd) = (self.h * d, self.kv * d);
        let (wq, rest) = w.wqkv.split_at(qd * c);
        let (wk, wv) = rest.split_at(kd * c);
        let (w1, w3) = w.w13.split_at(self.f * c);
        for which in BAKED {
            if let Some((id, _)) = st.baked[which][layer].take() {
                e.runner.unload(id)?;
            }
            let k = kernel_of(&e.set, which);
            let names: Vec<&str> = k.pieces.iter().map(|p| p.name.as_str()).filter(|n| is_weight(n)).collect();
            let forward = matches!(which, ATTN_FWD | WO_FWD | FFN_FWD);
            let baked = super::bake::bake(k, &names, &mut |name, buf| {
                let matrix = match name {
                    "wq" => wq,
                    "wk" => wk,
                    "wv" => wv,
                    "wo" => w.wo,
                    "w1" => w1,
                    "w3" => w3,
                    "w2" => w.w2,
                    "qn" => w.q_norm.unwrap_or(&[]),
                    _ => w.k_norm.unwrap_or(&[]),
                };
                // Each matrix in the form its dynamic kernel is staged with.
                let src = match name {
                    "qn" | "kn" => Src::Column(matrix),
                    "w2" if which == FFN_FWD => Src::Weight(matrix),
                    _ if forward => Src::WeightT(matrix),
                    _ => Src::Weight(matrix),
                };
                let p = k.piece(name);
                put(buf, k.program.inputs[p.input].shape[3], p, &src, e.t);
            })?;
            let id = e
                .runner
                .load(&baked.program, 1)
                .with_context(|| format!("compiling layer {layer}'s {} on {}", baked.program.name, e.runner.name()))?;
            st.baked[which][layer] = Some((id, baked));
        }
        st.epoch_of[layer] = Some(st.want);
        Ok(())
    }
}

impl Backend for MilBackend {
    fn name(&self) -> &'static str {
        self.exec.runner.name()
    }

    fn shape(&self) -> (usize, usize) {
        (self.b, self.exec.t)
    }

    /// Only when the kernels really run off the CPU: the simulator's kernels would compete
    /// with the dW worker for the same cores (`--dw-overlap on` still forces it).
    fn keeps_probs(&self) -> bool {
        false // sdpa_bwd1 recomputes them
    }

    fn overlaps_dw(&self) -> bool {
        self.exec.runner.name() == "ane"
    }

    fn set_weights_version(&mut self, version: Option<u64>) {
        self.exec.version = version;
    }

    fn begin_update(&mut self, update: usize) {
        if let Some(st) = self.exec.statics.as_mut() {
            st.want = update / st.every;
        }
    }

    fn compiles_needed(&self, update: usize) -> usize {
        self.exec.statics.as_ref().map_or(0, |st| {
            let want = Some(update / st.every);
            st.epoch_of.iter().filter(|&&e| e != want).count() * BAKED.len()
        })
    }

    fn compiles(&self) -> usize {
        self.exec.runner.compiles()
    }

    fn classifier_forward(&mut self, logits: &mut [f32], xf: &[f32], e: &[f32]) -> Result<bool> {
        if self.exec.statics.is_some() {
            return Ok(false);
        }
        self.classifier_logits(logits, xf, e)?;
        Ok(true)
    }

    fn attention_forward(&mut self, o: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()> {
        self.ensure_baked(w)?;
        let (c, t, d) = (self.c, self.exec.t, self.d);
        let (qd, kd) = (self.h * d, self.kv * d);
        let (wq, rest) = w.wqkv.split_at(qd * c);
        let (wk, wv) = rest.split_at(kd * c);
        let qk_norm = self.exec.set.dims.qk_norm;
        let (qn, kn) = (w.q_norm.unwrap_or(&[]), w.k_norm.unwrap_or(&[]));
        let fresh_attn = self.exec.stale(ATTN_FWD, w.layer, &[w.wqkv, qn, kn]);
        let fresh_wo = self.exec.stale(WO_FWD, w.layer, &[w.wo]);
        for bi in 0..self.b {
            let stage = bi == 0 && fresh_attn;
            let srcs = [
                ("xn", Some(act(&acts.xn1, bi, t, c))),
                ("wq", stage.then_some(Src::WeightT(wq))),
                ("wk", stage.then_some(Src::WeightT(wk))),
                ("wv", stage.then_some(Src::WeightT(wv))),
                ("qn", w.q_norm.filter(|_| stage).map(Src::Column)),
                ("kn", w.k_norm.filter(|_| stage).map(Src::Column)),
            ];
            let e = &mut self.exec;
            e.run(ATTN_FWD, w.layer, &srcs)?;
            e.read(ATTN_FWD, "attn", seq_mut(&mut acts.attn, bi, t, qd), qd, 0)?;
            e.read(ATTN_FWD, "q", seq_mut(&mut acts.q, bi, t, qd), qd, 0)?;
            e.read(ATTN_FWD, "k", seq_mut(&mut acts.k, bi, t, kd), kd, 0)?;
            e.read(ATTN_FWD, "v", seq_mut(&mut acts.v, bi, t, kd), kd, 0)?;
            if qk_norm {
                e.read(ATTN_FWD, "q_raw", seq_mut(&mut acts.q_raw, bi, t, qd), qd, 0)?;
                e.read(ATTN_FWD, "k_raw", seq_mut(&mut acts.k_raw, bi, t, kd), kd, 0)?;
            }
            let stage = bi == 0 && fresh_wo;
            let srcs = [("attn", Some(act(&acts.attn, bi, t, qd))), ("wo", stage.then_some(Src::WeightT(w.wo)))];
            e.run(WO_FWD, w.layer, &srcs)?;
            e.read(WO_FWD, "out", seq_mut(o, bi, t, c), c, 0)?;
        }
        if qk_norm {
            group_rstd(&mut acts.q_rstd, &acts.q_raw, d, self.eps);
            group_rstd(&mut acts.k_rstd, &acts.k_raw, d, self.eps);
        }
        Ok(())
    }

    fn ffn_forward(&mut self, out: &mut [f32], acts: &mut LayerActs, w: &Weights) -> Result<()> {
        self.ensure_baked(w)?;
        let (c, f, t) = (self.c, self.f, self.exec.t);
        let (w1, w3) = w.w13.split_at(f * c);
        let fresh_ffn = self.exec.stale(FFN_FWD, w.layer, &[w.w13, w.w2]);
        for bi in 0..self.b {
            let stage = bi == 0 && fresh_ffn;
            let srcs = [
                ("xn", Some(act(&acts.xn2, bi, t, c))),
                ("w1", stage.then_some(Src::WeightT(w1))),
                ("w3", stage.then_some(Src::WeightT(w3))),
                ("w2", stage.then_some(Src::Weight(w.w2))),
            ];
            let e = &mut self.exec;
            e.run(FFN_FWD, w.layer, &srcs)?;
            e.read(FFN_FWD, "out", seq_mut(out, bi, t, c), c, 0)?;
            e.read(FFN_FWD, "h1", seq_mut(&mut acts.h13, bi, t, 2 * f), 2 * f, 0)?;
            e.read(FFN_FWD, "h3", seq_mut(&mut acts.h13, bi, t, 2 * f), 2 * f, f)?;
            e.read(FFN_FWD, "gate", seq_mut(&mut acts.gate, bi, t, f), f, 0)?;
        }
        Ok(())
    }

    fn ffn_backward_dx(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        d_out: &[f32],
        acts: &LayerActs,
        w: &Weights,
    ) -> Result<()> {
        self.ensure_baked(w)?;
        let (c, f, t) = (self.c, self.f, self.exec.t);
        let (w1, w3) = w.w13.split_at(f * c);
        let fresh_w2t = self.exec.stale(FFN_BWD_W2T, w.layer, &[w.w2]);
        let fresh_w13t = self.exec.stale(FFN_BWD_W13T, w.layer, &[w.w13]);
        for bi in 0..self.b {
            let e = &mut self.exec;
            let stage = bi == 0 && fresh_w2t;
            let srcs = [("dout", Some(act(d_out, bi, t, c))), ("w2", stage.then_some(Src::Weight(w.w2)))];
            e.run(FFN_BWD_W2T, w.layer, &srcs)?;
            let (out, chan) = e.read_half(FFN_BWD_W2T, "out", &mut self.grad_out)?;
            take(out, e.s, chan, f, seq_mut(&mut g.dgate, bi, t, f), f, 0, t);
            let h13 = seq(&acts.h13, bi, t, 2 * f);
            let stage = bi == 0 && fresh_w13t;
            let srcs = [
                ("dgate", Some(Src::Half { data: out, chan })),
                ("h1", Some(Src::Act { rows: h13, ld: 2 * f, col: 0 })),
                ("h3", Some(Src::Act { rows: h13, ld: 2 * f, col: f })),
                ("w1", stage.then_some(Src::Weight(w1))),
                ("w3", stage.then_some(Src::Weight(w3))),
            ];
            e.run(FFN_BWD_W13T, w.layer, &srcs)?;
            e.read(FFN_BWD_W13T, "dxn", seq_mut(dxn, bi, t, c), c, 0)?;
            e.read(FFN_BWD_W13T, "dh1", seq_mut(&mut g.dh13, bi, t, 2 * f), 2 * f, 0)?;
            e.read(FFN_BWD_W13T, "dh3", seq_mut(&mut g.dh13, bi, t, 2 * f), 2 * f, f)?;
        }
        Ok(())
    }

    fn attention_backward_dx(
        &mut self,
        dxn: &mut [f32],
        g: &mut LayerGrads,
        norm_grads: QkNormGrads,
        d_o: &[f32],
        acts: &LayerActs,
        w: &Weights,
    ) -> Result<()> {
        self.ensure_baked(w)?;
        let (c, t, d, n) = (self.c, self.exec.t, self.d, self.b * self.exec.t);
        let (h, kv) = (self.h, self.kv);
        let (qd, kd) = (h * d, kv * d);
        let (wq, rest) = w.wqkv.split_at(qd * c);
        let (wk, wv) = rest.split_at(kd * c);
        let e = &mut self.exec;
        let fresh_wob = e.stale(WO_BWD, w.layer, &[w.wo]);
        let fresh_qb = e.stale(Q_BWD, w.layer, &[wq]);
        let fresh_kvb = e.stale(KV_BWD, w.layer, &[wk, wv]);
        let (dv_at, _) = e.set.sdpa_bwd1.out_part("dv");
        let (p_at, _) = e.set.sdpa_bwd1.out_part("probs");
        let (dp_at, _) = e.set.sdpa_bwd1.out_part("dp");
        for bi in 0..self.b {
            let stage = bi == 0 && fresh_wob;
            let srcs = [("do", Some(act(d_o, bi, t, c))), ("wo", stage.then_some(Src::Weight(w.wo)))];
            e.run(WO_BWD, w.layer, &srcs)?;
            let (out, chan) = e.read_half(WO_BWD, "out", &mut self.grad_out)?;
            take(out, e.s, chan, qd, seq_mut(&mut g.dattn, bi, t, qd), qd, 0, t);
            let srcs = [
                ("q", Some(act(&acts.q, bi, t, qd))),
                ("k", Some(act(&acts.k, bi, t, kd))),
                ("v", Some(act(&acts.v, bi, t, kd))),
                ("dattn", Some(Src::Half { data: out, chan })),
            ];
            e.run(SDPA_BWD1, w.layer, &srcs)?;
            let bwd1 = &mut self.bwd1_out;
            e.runner.read_output(e.ids[SDPA_BWD1], 0, &mut |out| bwd1.copy_from_slice(out))?;
            take(bwd1, e.s, dv_at, kd, seq_mut(&mut self.dv, bi, t, kd), kd, 0, t);
            let srcs = [
                ("probs", Some(Src::Half { data: bwd1, chan: p_at })),
                ("dp", Some(Src::Half { data: bwd1, chan: dp_at })),
                ("q", Some(act(&acts.q, bi, t, qd))),
                ("k", Some(act(&acts.k, bi, t, kd))),
            ];
            e.run(SDPA_BWD2, w.layer, &srcs)?;
            e.read(SDPA_BWD2, "dq", seq_mut(&mut self.dq, bi, t, qd), qd, 0)?;
            e.read(SDPA_BWD2, "dk", seq_mut(&mut self.dk, bi, t, kd), kd, 0)?;
        }
        // g.dqkv `[N, QD + 2·KD]` feeds the dW GEMM of the fused projection, and its column
        // blocks are the q_bwd / kv_bwd inputs.
        qkv_backward(&mut g.dqkv, norm_grads, &self.dq, &self.dk, &self.dv, acts, w, n, h, kv, d);
        let width = qd + 2 * kd;
        let part = |bi: usize, col: usize| Src::Act { rows: seq(&g.dqkv, bi, t, width), ld: width, col };
        for bi in 0..self.b {
            let stage = bi == 0 && fresh_qb;
            let srcs = [("dq", Some(part(bi, 0))), ("wq", stage.then_some(Src::Weight(wq)))];
            e.run(Q_BWD, w.layer, &srcs)?;
            e.read(Q_BWD, "out", seq_mut(&mut self.dx_q, bi, t, c), c, 0)?;
            let stage = bi == 0 && fresh_kvb;
            let srcs = [
                ("dk", Some(part(bi, qd))),
                ("dv", Some(part(bi, qd + kd))),
                ("wk", stage.then_some(Src::Weight(wk))),
                ("wv", stage.then_some(Src::Weight(wv))),
            ];
            e.run(KV_BWD, w.layer, &srcs)?;
            e.read(KV_BWD, "out", seq_mut(dxn, bi, t, c), c, 0)?;
        }
        for (x, q) in dxn[..n * c].iter_mut().zip(&self.dx_q) {
            *x += q;
        }
        Ok(())
    }
}
