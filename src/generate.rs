//! Text generation: the prompt is prefilled in one batched forward pass (the training model's
//! kernels, B = 1, T = prompt length), its keys and values seed a KV cache, then tokens are
//! decoded one at a time against the cache. Sampling: greedy, or temperature with top-k and
//! top-p from a seeded RNG.

use crate::config::ModelConfig;
use crate::model::Model;
use crate::ops::Par;
use crate::ops::cross_entropy::IGNORE;
use crate::ops::matmul::bias_forward;
use crate::ops::matvec::{Kernel, matvec_rows_on};
use crate::ops::rmsnorm::rmsnorm_forward;
use crate::ops::rope::{RopeTable, rope_forward_at};
use crate::ops::team::Team;
use crate::params::ParamLayout;
use crate::quant::matvec::{QActs, QMatrix, qmatvec_rows};
use crate::quant::weights::QuantWeights;
use crate::rng::Rng;
use anyhow::{Context, Result, ensure};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

/// One sequence's keys and values after QK-norm and RoPE, `[L, max_t, KV·D]` each; positions
/// `0..pos` are filled.
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    kd: usize,
    pub max_t: usize,
    /// Positions already in the cache.
    pub pos: usize,
}

impl KvCache {
    /// An empty cache; refuses (with the estimate and the memory available) when it does not
    /// fit.
    pub fn new(cfg: &ModelConfig, max_t: usize) -> Result<Self> {
        let n = cfg.n_layers * max_t * cfg.kv_dim();
        crate::memory::ensure_fits(
            &format!("a KV cache of {max_t} positions"),
            crate::memory::f32_bytes(&[cfg.n_layers, max_t, cfg.kv_dim()]).saturating_mul(2),
            "lower --max-tokens, --ctx or the prompt's length",
        )?;
        Ok(KvCache {
            k: crate::memory::try_vec_f32(n, "the key cache")?,
            v: crate::memory::try_vec_f32(n, "the value cache")?,
            kd: cfg.kv_dim(),
            max_t,
            pos: 0,
        })
    }

    /// Layer `l`'s `[max_t, KV·D]` keys and values.
    fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        let at = l * self.max_t * self.kd;
        (&self.k[at..at + self.max_t * self.kd], &self.v[at..at + self.max_t * self.kd])
    }

    /// Layer `l`'s key and value rows at `pos`.
    fn rows_mut(&mut self, l: usize, pos: usize) -> (&mut [f32], &mut [f32]) {
        let at = (l * self.max_t + pos) * self.kd;
        (&mut self.k[at..at + self.kd], &mut self.v[at..at + self.kd])
    }
}

/// One row of a batched forward pass: `token` at position `pos` of sequence `seq` (an index
/// into the caches passed along).
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub seq: usize,
    pub token: u32,
    pub pos: usize,
}

/// The forward pass of R rows against KV caches: one decode step of each of R sequences
/// (continuous batching), or R new tokens of one sequence (a chat turn), or any mix. Each
/// weight matrix is streamed once per call for all rows (`matvec_rows`), which is what makes
/// batched decoding cheaper per token than R separate steps on a memory-bound machine. Every
/// output element is computed in the same order whatever R is, so a sequence's logits are
/// bit-identical alone or batched.
pub struct BatchDecoder<'a> {
    cfg: ModelConfig,
    layout: ParamLayout,
    params: &'a [f32],
    /// Quantized matrices used instead of `params`' (`--quant`); embeddings and norms stay
    /// f32.
    quant: Option<&'a QuantWeights>,
    /// `[R, max(C, H·D, F)]` the quantized input of each matvec (with `quant`)
    acts: Option<QActs>,
    rope: RopeTable,
    /// Rows per call at most (R).
    pub max_rows: usize,
    /// `[R, C]` residual stream, normed input, block output
    x: Vec<f32>,
    xn: Vec<f32>,
    out: Vec<f32>,
    /// `[R·max(H, KV)]`
    rstd: Vec<f32>,
    /// `[R, (H + 2·KV)·D]` q|k|v of each row
    qkv: Vec<f32>,
    /// `[R, H·D]` q after QK-norm and RoPE; attention output
    q: Vec<f32>,
    attn: Vec<f32>,
    /// `[R, 2·F]`, `[R, F]`
    h13: Vec<f32>,
    gate: Vec<f32>,
    /// `[R, V]`
    logits: Vec<f32>,
    /// `[max(V, 2·F, (H + 2·KV)·D), R]` matvec_rows' transposed output
    scratch: Vec<f32>,
    /// `[R·H, positions]` attention scores, grown to the longest sequence seen
    scores: Vec<f32>,
    /// The threads of the f32 matvecs and the attention (the rayon pool's size, made when
    /// the decoder is): spinning between a step's ~5·L parallel regions instead of sleeping.
    /// None with one thread, and with `quant` (whose matvecs run on rayon; a spinning team
    /// beside busy rayon workers would oversubscribe the cores).
    team: Option<Team>,
}

impl<'a> BatchDecoder<'a> {
    /// Buffers for up to `max_rows` rows; positions up to `max_t` (the RoPE table).
    pub fn new(cfg: &ModelConfig, params: &'a [f32], max_t: usize, max_rows: usize) -> Result<Self> {
        Self::with_quant(cfg, params, None, max_t, max_rows)
    }

    /// As `new`, with the matrices of `quant` (when given) in place of the f32 ones.
    pub fn with_quant(
        cfg: &ModelConfig,
        params: &'a [f32],
        quant: Option<&'a QuantWeights>,
        max_t: usize,
        max_rows: usize,
    ) -> Result<Self> {
        if let Some(q) = quant {
            q.check(cfg)?;
        }
        ensure!(
            max_t > 0 && max_t <= cfg.max_seq_len,
            "generation length {max_t} exceeds {} positions",
            cfg.max_seq_len
        );
        ensure!(max_rows > 0, "a batch needs at least one row");
        let layout = ParamLayout::new(cfg);
        ensure!(params.len() == layout.total, "parameters do not match the config");
        let (c, qd, kd, f, v, r) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim, cfg.vocab_size, max_rows);
        let widest = v.max(2 * f).max(qd + 2 * kd).max(c);
        let z = |n: usize| vec![0.0f32; n];
        let acts = match quant {
            Some(_) => Some(QActs::new(r, c.max(qd).max(f))?),
            None => None,
        };
        // Every weight streams once per token: 2 MB pages spare a TLB miss per 4 KB.
        if quant.is_none() {
            crate::memory::advise_huge_pages(params);
        }
        let threads = rayon::current_num_threads();
        let team = match quant {
            None if threads > 1 => Some(Team::new(threads).context("cannot start the decoding threads")?),
            _ => None,
        };
        Ok(BatchDecoder {
            team,
            quant,
            acts,
            rope: RopeTable::for_config(max_t, cfg),
            x: z(r * c),
            xn: z(r * c),
            out: z(r * c),
            rstd: z(r * cfg.n_heads.max(cfg.n_kv_heads).max(1)),
            qkv: z(r * (qd + 2 * kd)),
            q: z(r * qd),
            attn: z(r * qd),
            h13: z(r * 2 * f),
            gate: z(r * f),
            logits: z(r * v),
            scratch: z(widest * r),
            scores: Vec::new(),
            cfg: cfg.clone(),
            layout,
            params,
            max_rows,
        })
    }

    /// Runs `rows` (at most `max_rows`; a sequence's rows in increasing position, each
    /// position the next one its cache lacks) and returns their next-token logits `[rows, V]`.
    /// Every row's keys and values are written into its cache before any row attends, so a
    /// row sees the earlier rows of its own sequence.
    pub fn forward(&mut self, caches: &mut [&mut KvCache], rows: &[Row]) -> Result<&[f32]> {
        let r = rows.len();
        ensure!(r > 0 && r <= self.max_rows, "{r} rows for a batch of at most {}", self.max_rows);
        for row in rows {
            ensure!((row.token as usize) < self.cfg.vocab_size, "token id {} is outside the vocabulary", row.token);
            let cache = caches.get(row.seq).ok_or_else(|| anyhow::anyhow!("row names sequence {}", row.seq))?;
            ensure!(row.pos < cache.max_t, "the KV cache is full ({} positions)", cache.max_t);
            ensure!(
                row.pos < self.rope.cos.len() / self.rope.half.max(1),
                "position {} beyond the RoPE table",
                row.pos
            );
        }
        let cfg = &self.cfg;
        let (c, f, eps, v) = (cfg.dim, cfg.ffn_dim, cfg.norm_eps as f32, cfg.vocab_size);
        let (h, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (qd, kd, group) = (cfg.q_dim(), cfg.kv_dim(), cfg.n_heads / cfg.n_kv_heads);
        let scale = 1.0 / (d as f32).sqrt();
        let span = rows.iter().map(|row| row.pos + 1).max().unwrap_or(1);
        if self.scores.len() < r * h * span {
            let want = self.max_rows * h * span;
            self.scores.try_reserve_exact(want.saturating_sub(self.scores.len())).map_err(|_| {
                anyhow::anyhow!("cannot allocate attention scores for {span} positions ({:.1} MB)", want as f64 * 4e-6)
            })?;
            self.scores.resize(want, 0.0);
        }
        let embed = self.layout.view(self.params, self.layout.embed);
        for (x, row) in self.x.chunks_exact_mut(c).zip(rows) {
            x.copy_from_slice(&embed[row.token as usize * c..(row.token as usize + 1) * c]);
        }
        let (x, xn, out) = (&mut self.x[..r * c], &mut self.xn[..r * c], &mut self.out[..r * c]);
        for l in 0..cfg.n_layers {
            let w = self.layout.layer(self.params, l);
            rmsnorm_forward(xn, &mut self.rstd, x, w.attn_norm, r, c, eps);
            let qkv = &mut self.qkv[..r * (qd + 2 * kd)];
            let ql = self.quant.map(|q| &q.layers[l]);
            linear(
                &mut self.team,
                qkv,
                &mut self.scratch,
                &mut self.acts,
                xn,
                w.wqkv,
                ql.map(|q| &q.wqkv),
                r,
                c,
                qd + 2 * kd,
            );
            if let Some(bias) = w.bqkv {
                bias_forward(qkv, bias);
            }
            for ((qkv, q), row) in qkv.chunks_exact_mut(qd + 2 * kd).zip(self.q.chunks_exact_mut(qd)).zip(rows) {
                let (q_raw, kv_raw) = qkv.split_at_mut(qd);
                let (k_raw, v_new) = kv_raw.split_at_mut(kd);
                let (k_row, v_row) = caches[row.seq].rows_mut(l, row.pos);
                match (w.q_norm, w.k_norm) {
                    (Some(qn), Some(kn)) => {
                        rmsnorm_forward(q, &mut self.rstd[..h], q_raw, qn, h, d, eps);
                        rmsnorm_forward(k_row, &mut self.rstd[..kv], k_raw, kn, kv, d, eps);
                    }
                    _ => {
                        q.copy_from_slice(q_raw);
                        k_row.copy_from_slice(k_raw);
                    }
                }
                rope_forward_at(q, &self.rope, row.pos);
                rope_forward_at(k_row, &self.rope, row.pos);
                v_row.copy_from_slice(v_new);
            }
            // One task per (row, head); each owns its output slice and its scores slice.
            let caches: &[&mut KvCache] = caches;
            let q = &self.q[..r * qd];
            let attn = &mut self.attn[..r * qd];
            let scores = &mut self.scores[..r * h * span];
            let head_task = |i: usize, out: &mut [f32], scores: &mut [f32]| {
                let (row, head) = (rows[i / h], i % h);
                let (keys, values) = caches[row.seq].layer(l);
                let kvh = head / group;
                let q = &q[(i / h) * qd + head * d..][..d];
                let scores = &mut scores[..=row.pos];
                for (s, j) in scores.iter_mut().zip(0..) {
                    *s = crate::ops::dot(q, &keys[j * kd + kvh * d..][..d]) * scale;
                }
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0;
                scores.iter_mut().for_each(|s| {
                    *s = (*s - max).exp();
                    sum += *s;
                });
                out.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    crate::ops::axpy(out, p / sum, &values[j * kd + kvh * d..][..d]);
                }
            };
            match &mut self.team {
                Some(team) => team.for_chunks2(attn, d, scores, span, 1, |t0, outs, scores| {
                    for (t, (out, scores)) in outs.chunks_exact_mut(d).zip(scores.chunks_exact_mut(span)).enumerate() {
                        head_task(t0 + t, out, scores);
                    }
                }),
                None => attn
                    .par_chunks_mut(d)
                    .zip(scores.par_chunks_mut(span))
                    .enumerate()
                    .for_each(|(i, (out, scores))| head_task(i, out, scores)),
            }
            linear(&mut self.team, out, &mut self.scratch, &mut self.acts, attn, w.wo, ql.map(|q| &q.wo), r, qd, c);
            x.iter_mut().zip(out.iter()).for_each(|(x, o)| *x += o);
            rmsnorm_forward(xn, &mut self.rstd, x, w.ffn_norm, r, c, eps);
            let h13 = &mut self.h13[..r * 2 * f];
            linear(&mut self.team, h13, &mut self.scratch, &mut self.acts, xn, w.w13, ql.map(|q| &q.w13), r, c, 2 * f);
            crate::ops::swiglu::swiglu_forward(&mut self.gate[..r * f], h13, f);
            linear(
                &mut self.team,
                out,
                &mut self.scratch,
                &mut self.acts,
                &self.gate[..r * f],
                w.w2,
                ql.map(|q| &q.w2),
                r,
                f,
                c,
            );
            x.iter_mut().zip(out.iter()).for_each(|(x, o)| *x += o);
        }
        let final_norm = self.layout.view(self.params, self.layout.final_norm);
        rmsnorm_forward(xn, &mut self.rstd, x, final_norm, r, c, eps);
        let classifier = self.layout.view(self.params, self.layout.classifier());
        let qc = self.quant.map(|q| &q.classifier);
        linear(
            &mut self.team,
            &mut self.logits[..r * v],
            &mut self.scratch,
            &mut self.acts,
            xn,
            classifier,
            qc,
            r,
            c,
            v,
        );
        for row in rows {
            let cache = &mut caches[row.seq];
            cache.pos = cache.pos.max(row.pos + 1);
        }
        Ok(&self.logits[..r * v])
    }
}

/// out `[R, N]` = x `[R, K]` · wᵀ: the quantized matvec (activations quantized into `acts`)
/// when `wq` is given, else the f32 one with `w` `[N, K]`.
#[allow(clippy::too_many_arguments)]
fn linear(
    team: &mut Option<Team>,
    out: &mut [f32],
    scratch: &mut [f32],
    acts: &mut Option<QActs>,
    x: &[f32],
    w: &[f32],
    wq: Option<&QMatrix>,
    r: usize,
    k: usize,
    n: usize,
) {
    match (wq, acts) {
        (Some(wq), Some(acts)) => {
            acts.quantize(x, r, k);
            qmatvec_rows(out, scratch, acts, wq);
        }
        _ => matvec_rows_on(Kernel::best(), team.as_mut(), out, scratch, x, w, r, k, n),
    }
}

/// Positions per prefill pass of a quantized decoder.
pub const PREFILL_ROWS: usize = 64;

/// One-token decoding of one sequence against its KV cache (a `BatchDecoder` of one row).
pub struct Decoder<'a> {
    batch: BatchDecoder<'a>,
    cache: KvCache,
    /// Positions already in the cache.
    pub pos: usize,
    /// `[V]`
    pub logits: Vec<f32>,
}

impl<'a> Decoder<'a> {
    pub fn new(cfg: &ModelConfig, params: &'a [f32], max_t: usize) -> Result<Self> {
        Self::with_quant(cfg, params, None, max_t)
    }

    /// As `new`, decoding with `quant`'s matrices when given (and then prefilling through
    /// the decoder itself, `PREFILL_ROWS` positions per pass, with `prefill_rows`).
    pub fn with_quant(
        cfg: &ModelConfig,
        params: &'a [f32],
        quant: Option<&'a QuantWeights>,
        max_t: usize,
    ) -> Result<Self> {
        let rows = if quant.is_some() { PREFILL_ROWS.min(max_t) } else { 1 };
        Ok(Decoder {
            batch: BatchDecoder::with_quant(cfg, params, quant, max_t, rows)?,
            cache: KvCache::new(cfg, max_t)?,
            pos: 0,
            logits: vec![0.0; cfg.vocab_size],
        })
    }

    /// Runs the prompt through `model` (built with B = 1, T = prompt length) and fills the
    /// cache with its keys and values; leaves the last position's logits in `self.logits`.
    pub fn prefill(&mut self, model: &mut Model, prompt: &[u32]) -> Result<()> {
        prefill(model, self.batch.params, &mut self.cache, prompt, &mut self.logits)?;
        self.pos = self.cache.pos;
        Ok(())
    }

    /// Runs the prompt through the decoder, up to its `max_rows` positions per pass (each
    /// weight matrix streamed once per pass), into the empty cache; leaves the last
    /// position's logits in `self.logits`.
    pub fn prefill_rows(&mut self, prompt: &[u32]) -> Result<()> {
        ensure!(self.pos == 0, "prefill needs an empty cache");
        ensure!(!prompt.is_empty(), "the prompt needs at least one token");
        ensure!(
            prompt.len() <= self.cache.max_t,
            "prompt of {} tokens exceeds {} positions",
            prompt.len(),
            self.cache.max_t
        );
        let v = self.logits.len();
        for (c, chunk) in prompt.chunks(self.batch.max_rows).enumerate() {
            let at = c * self.batch.max_rows;
            let rows: Vec<Row> =
                chunk.iter().enumerate().map(|(i, &token)| Row { seq: 0, token, pos: at + i }).collect();
            let logits = self.batch.forward(&mut [&mut self.cache], &rows)?;
            self.logits.copy_from_slice(&logits[(rows.len() - 1) * v..]);
        }
        self.pos = self.cache.pos;
        Ok(())
    }

    /// Feeds `token` at the next position; its next-token logits land in `self.logits`.
    pub fn step(&mut self, token: u32) -> Result<()> {
        let row = Row { seq: 0, token, pos: self.pos };
        let logits = self.batch.forward(&mut [&mut self.cache], &[row])?;
        self.logits.copy_from_slice(logits);
        self.pos = self.cache.pos;
        Ok(())
    }
}

/// Runs `prompt` through `model` (built with B = 1, T = prompt length: the training model's
/// batched GEMMs) into an empty `cache`; the last position's logits `[V]` land in `logits`.
pub fn prefill(
    model: &mut Model,
    params: &[f32],
    cache: &mut KvCache,
    prompt: &[u32],
    logits: &mut [f32],
) -> Result<()> {
    ensure!(model.b == 1 && model.t == prompt.len(), "prefill model must be B=1, T=prompt length");
    ensure!(prompt.len() <= cache.max_t, "prompt of {} tokens exceeds {} positions", prompt.len(), cache.max_t);
    let ignore = vec![IGNORE; prompt.len()];
    model.forward(params, prompt, &ignore)?;
    let (kd, t, n_layers) = (cache.kd, prompt.len(), model.cfg.n_layers);
    for l in 0..n_layers {
        let (k, v) = model.kv(l);
        let at = l * cache.max_t * kd;
        cache.k[at..at + t * kd].copy_from_slice(&k[..t * kd]);
        cache.v[at..at + t * kd].copy_from_slice(&v[..t * kd]);
    }
    let vsz = logits.len();
    logits.copy_from_slice(&model.logits()[(t - 1) * vsz..t * vsz]);
    cache.pos = t;
    Ok(())
}

/// Picks the next token from `logits` (modified in place when sampling).
pub fn sample(logits: &mut [f32], s: &Sampling, rng: &mut Rng, order: &mut Vec<usize>) -> u32 {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    if s.temperature <= 0.0 {
        return argmax() as u32;
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0;
    for x in logits.iter_mut() {
        *x = ((*x - max) / s.temperature).exp();
        sum += *x;
    }
    logits.iter_mut().for_each(|x| *x /= sum);
    order.clear();
    order.extend(0..logits.len());
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let k = if s.top_k == 0 { order.len() } else { s.top_k.min(order.len()) };
    let (mut kept, mut mass) = (0, 0.0f32);
    while kept < k && (kept == 0 || mass < s.top_p) {
        mass += logits[order[kept]];
        kept += 1;
    }
    let mut u = rng.uniform() as f32 * mass;
    for &i in &order[..kept] {
        u -= logits[i];
        if u <= 0.0 {
            return i as u32;
        }
    }
    order[kept - 1] as u32
}

/// Generates up to `max_new` tokens after `prompt`, calling `emit` on each as it is decoded,
/// stopping early at `eos`. Returns (prefill seconds, decode seconds, tokens decoded).
#[allow(clippy::too_many_arguments)]
pub fn generate(
    cfg: &ModelConfig,
    params: &[f32],
    quant: Option<&QuantWeights>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: Option<u32>,
    par: Par,
    mut emit: impl FnMut(u32),
) -> Result<(f64, f64, usize)> {
    ensure!(!prompt.is_empty(), "the prompt needs at least one token");
    ensure!(prompt.iter().all(|&t| (t as usize) < cfg.vocab_size), "a prompt token is outside the vocabulary");
    let max_t = (prompt.len() + max_new).min(cfg.max_seq_len);
    ensure!(prompt.len() <= max_t, "the prompt exceeds the model's {} positions", cfg.max_seq_len);
    let mut decoder = Decoder::with_quant(cfg, params, quant, max_t)?;
    let start = std::time::Instant::now();
    if quant.is_some() {
        decoder.prefill_rows(prompt)?;
    } else {
        crate::model::memory_estimate(cfg, 1, prompt.len(), false)
            .ensure(&format!("prefilling a prompt of {} tokens", prompt.len()), "use a shorter prompt")?;
        let mut model = Model::cpu(cfg, 1, prompt.len(), par)?;
        decoder.prefill(&mut model, prompt)?;
    }
    let prefill_s = start.elapsed().as_secs_f64();
    let (mut rng, mut order) = (Rng::new(sampling.seed), Vec::with_capacity(cfg.vocab_size));
    let start = std::time::Instant::now();
    let mut produced = 0;
    while produced < max_new && decoder.pos < max_t {
        let next = sample(&mut decoder.logits, &sampling, &mut rng, &mut order);
        emit(next);
        produced += 1;
        if Some(next) == eos || decoder.pos == max_t {
            break;
        }
        decoder.step(next)?;
    }
    Ok((prefill_s, start.elapsed().as_secs_f64(), produced))
}
