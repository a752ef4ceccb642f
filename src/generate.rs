//! Text generation: the prompt is prefilled in one batched forward pass (the training model's
//! kernels, B = 1, T = prompt length), its keys and values seed a KV cache, then tokens are
//! decoded one at a time against the cache. Sampling: greedy, or temperature with top-k and
//! top-p from a seeded RNG.

use crate::config::ModelConfig;
use crate::model::Model;
use crate::ops::Par;
use crate::ops::cross_entropy::IGNORE;
use crate::ops::matmul::matvec;
use crate::ops::rmsnorm::rmsnorm_forward;
use crate::ops::rope::{RopeTable, rope_forward_at};
use crate::params::ParamLayout;
use crate::rng::Rng;
use anyhow::{Result, ensure};

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

/// One-token decoding against a KV cache. Buffers are sized once for `max_t` positions.
pub struct Decoder<'a> {
    cfg: ModelConfig,
    layout: ParamLayout,
    params: &'a [f32],
    rope: RopeTable,
    max_t: usize,
    /// Positions already in the cache.
    pub pos: usize,
    /// `[L, max_t, KV·D]` each
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    /// `[C]`, `[C]`, `[1]`
    x: Vec<f32>,
    xn: Vec<f32>,
    rstd: Vec<f32>,
    /// `[(H + 2·KV)·D]` q|k|v of the new token; `[H·D]` q after QK-norm
    qkv: Vec<f32>,
    q: Vec<f32>,
    /// `[max_t]` one head's scores
    scores: Vec<f32>,
    /// `[H·D]`
    attn: Vec<f32>,
    /// `[C]`
    out: Vec<f32>,
    /// `[2·F]`, `[F]`
    h13: Vec<f32>,
    gate: Vec<f32>,
    /// `[V]`
    pub logits: Vec<f32>,
}

impl<'a> Decoder<'a> {
    pub fn new(cfg: &ModelConfig, params: &'a [f32], max_t: usize) -> Result<Self> {
        ensure!(
            max_t > 0 && max_t <= cfg.max_seq_len,
            "generation length {max_t} exceeds {} positions",
            cfg.max_seq_len
        );
        let layout = ParamLayout::new(cfg);
        ensure!(params.len() == layout.total, "parameters do not match the config");
        let (c, qd, kd) = (cfg.dim, cfg.q_dim(), cfg.kv_dim());
        let z = |n: usize| vec![0.0f32; n];
        let cache = crate::memory::f32_bytes(&[cfg.n_layers, max_t, kd]);
        crate::memory::ensure_fits(
            &format!("a KV cache of {max_t} positions"),
            cache.saturating_mul(2),
            "lower --max-tokens or use a shorter prompt",
        )?;
        Ok(Decoder {
            rope: RopeTable::for_config(max_t, cfg),
            k_cache: crate::memory::try_vec_f32(cfg.n_layers * max_t * kd, "the key cache")?,
            v_cache: crate::memory::try_vec_f32(cfg.n_layers * max_t * kd, "the value cache")?,
            x: z(c),
            xn: z(c),
            rstd: z(cfg.n_heads.max(1)),
            qkv: z(qd + 2 * kd),
            q: z(qd),
            scores: z(max_t),
            attn: z(qd),
            out: z(c),
            h13: z(2 * cfg.ffn_dim),
            gate: z(cfg.ffn_dim),
            logits: z(cfg.vocab_size),
            cfg: cfg.clone(),
            layout,
            params,
            max_t,
            pos: 0,
        })
    }

    /// Runs the prompt through `model` (built with B = 1, T = prompt length) and fills the
    /// cache with its keys and values; leaves the last position's logits in `self.logits`.
    pub fn prefill(&mut self, model: &mut Model, prompt: &[u32]) -> Result<()> {
        ensure!(model.b == 1 && model.t == prompt.len(), "prefill model must be B=1, T=prompt length");
        ensure!(prompt.len() <= self.max_t, "prompt of {} tokens exceeds {} positions", prompt.len(), self.max_t);
        let ignore = vec![IGNORE; prompt.len()];
        model.forward(self.params, prompt, &ignore)?;
        let (kd, t) = (self.cfg.kv_dim(), prompt.len());
        for l in 0..self.cfg.n_layers {
            let (k, v) = model.kv(l);
            let at = l * self.max_t * kd;
            self.k_cache[at..at + t * kd].copy_from_slice(&k[..t * kd]);
            self.v_cache[at..at + t * kd].copy_from_slice(&v[..t * kd]);
        }
        let vsz = self.cfg.vocab_size;
        self.logits.copy_from_slice(&model.logits()[(t - 1) * vsz..t * vsz]);
        self.pos = t;
        Ok(())
    }

    /// Feeds `token` at the next position; its next-token logits land in `self.logits`.
    pub fn step(&mut self, token: u32) -> Result<()> {
        ensure!(self.pos < self.max_t, "the KV cache is full ({} positions)", self.max_t);
        ensure!((token as usize) < self.cfg.vocab_size, "token id {token} is outside the vocabulary");
        let cfg = &self.cfg;
        let (c, f, eps) = (cfg.dim, cfg.ffn_dim, cfg.norm_eps as f32);
        let (h, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (qd, kd, group, pos) = (cfg.q_dim(), cfg.kv_dim(), cfg.n_heads / cfg.n_kv_heads, self.pos);
        let scale = 1.0 / (d as f32).sqrt();
        let embed = self.layout.view(self.params, self.layout.embed);
        self.x.copy_from_slice(&embed[token as usize * c..(token as usize + 1) * c]);
        for l in 0..cfg.n_layers {
            let w = self.layout.layer(self.params, l);
            rmsnorm_forward(&mut self.xn, &mut self.rstd[..1], &self.x, w.attn_norm, 1, c, eps);
            matvec(&mut self.qkv, &self.xn, w.wqkv, c, qd + 2 * kd);
            let (q_raw, kv_raw) = self.qkv.split_at_mut(qd);
            let (k_raw, v_new) = kv_raw.split_at_mut(kd);
            let cache = l * self.max_t * kd + pos * kd;
            let k_row = &mut self.k_cache[cache..cache + kd];
            match (w.q_norm, w.k_norm) {
                (Some(qn), Some(kn)) => {
                    rmsnorm_forward(&mut self.q, &mut self.rstd[..h], q_raw, qn, h, d, eps);
                    rmsnorm_forward(k_row, &mut self.rstd[..kv], k_raw, kn, kv, d, eps);
                }
                _ => {
                    self.q.copy_from_slice(q_raw);
                    k_row.copy_from_slice(k_raw);
                }
            }
            rope_forward_at(&mut self.q, &self.rope, pos);
            rope_forward_at(k_row, &self.rope, pos);
            self.v_cache[cache..cache + kd].copy_from_slice(v_new);
            let keys = &self.k_cache[l * self.max_t * kd..];
            let values = &self.v_cache[l * self.max_t * kd..];
            for head in 0..h {
                let kvh = head / group;
                let q = &self.q[head * d..(head + 1) * d];
                let scores = &mut self.scores[..=pos];
                for (s, j) in scores.iter_mut().zip(0..) {
                    *s = crate::ops::dot(q, &keys[j * kd + kvh * d..][..d]) * scale;
                }
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0;
                scores.iter_mut().for_each(|s| {
                    *s = (*s - max).exp();
                    sum += *s;
                });
                let out = &mut self.attn[head * d..(head + 1) * d];
                out.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    crate::ops::axpy(out, p / sum, &values[j * kd + kvh * d..][..d]);
                }
            }
            matvec(&mut self.out, &self.attn, w.wo, qd, c);
            self.x.iter_mut().zip(&self.out).for_each(|(x, o)| *x += o);
            rmsnorm_forward(&mut self.xn, &mut self.rstd[..1], &self.x, w.ffn_norm, 1, c, eps);
            matvec(&mut self.h13, &self.xn, w.w13, c, 2 * f);
            crate::ops::swiglu::swiglu_forward(&mut self.gate, &self.h13, f);
            matvec(&mut self.out, &self.gate, w.w2, f, c);
            self.x.iter_mut().zip(&self.out).for_each(|(x, o)| *x += o);
        }
        let final_norm = self.layout.view(self.params, self.layout.final_norm);
        rmsnorm_forward(&mut self.xn, &mut self.rstd[..1], &self.x, final_norm, 1, c, eps);
        let classifier = self.layout.view(self.params, self.layout.classifier());
        matvec(&mut self.logits, &self.xn, classifier, c, cfg.vocab_size);
        self.pos += 1;
        Ok(())
    }
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
    let mut decoder = Decoder::new(cfg, params, max_t)?;
    let start = std::time::Instant::now();
    crate::model::memory_estimate(cfg, 1, prompt.len(), false)
        .ensure(&format!("prefilling a prompt of {} tokens", prompt.len()), "use a shorter prompt")?;
    let mut model = Model::cpu(cfg, 1, prompt.len(), par)?;
    decoder.prefill(&mut model, prompt)?;
    drop(model);
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
