//! Evaluation over a token file, and greedy decoding by full recomputation (the reference
//! that KV-cache decoding is tested against in tests/generate.rs).

use crate::config::ModelConfig;
use crate::data::TokenData;
use crate::model::Model;
use crate::ops::Par;
use anyhow::{Result, ensure};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub windows: usize,
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

impl EvalResult {
    /// From the summed loss of `count` scored tokens in `windows` windows, timed `seconds`.
    fn new(windows: usize, sum: f64, count: usize, seconds: f64) -> Self {
        let loss = sum / count as f64;
        EvalResult {
            windows,
            tokens: count,
            loss,
            perplexity: loss.exp(),
            seconds,
            tokens_per_s: count as f64 / seconds,
        }
    }
}

/// Mean cross-entropy over consecutive, non-overlapping windows of the token file: window i
/// reads tokens `[i·T, i·T + T]` and predicts the last T of them. The windows, and so the
/// result, are the same on every run; `max_windows` caps how many are used (0 = all).
pub fn evaluate(
    cfg: &ModelConfig,
    params: &[f32],
    data: &TokenData,
    t: usize,
    batch: usize,
    max_windows: usize,
    par: Par,
) -> Result<EvalResult> {
    ensure!(data.len() > t, "{} holds {} tokens; --seq {t} needs at least {}", data.source, data.len(), t + 1);
    let available = (data.len() - 1) / t;
    let windows = if max_windows == 0 { available } else { available.min(max_windows) };
    let batch = batch.min(windows);
    ensure!(batch.saturating_mul(t) <= 1 << 22, "--batch × --seq must be at most 4M tokens");
    crate::model::memory_estimate(cfg, batch, t, false).ensure(
        &format!("evaluating {} with --batch {batch} --seq {t}", cfg.name),
        "lower --batch (windows per forward pass) or --seq",
    )?;
    let start = std::time::Instant::now();
    let mut model = Model::cpu(cfg, batch, t, par)?;
    let (mut tokens, mut targets) = (vec![0u32; batch * t], vec![0u32; batch * t]);
    let (sum, count) = windows_loss(&mut model, params, None, data, windows, &mut tokens, &mut targets)?;
    Ok(EvalResult::new(windows, sum, count, start.elapsed().as_secs_f64()))
}

/// Summed loss and counted targets over the first `windows` consecutive windows of `data`,
/// B = `model.b` at a time, with caller-provided `[B·T]` buffers (no allocation: training
/// calls this for validation with its own model).
pub fn windows_loss(
    model: &mut Model,
    params: &[f32],
    adapters: Option<&[f32]>,
    data: &TokenData,
    windows: usize,
    tokens: &mut [u32],
    targets: &mut [u32],
) -> Result<(f64, usize)> {
    let (batch, t) = (model.b, model.t);
    ensure!(
        data.len() > windows * t,
        "{} holds {} tokens, fewer than {windows} windows of {t}",
        data.source,
        data.len()
    );
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut w = 0;
    while w < windows {
        let rows = batch.min(windows - w);
        for r in 0..batch {
            // A short last batch repeats its final window; only the first `rows` are counted.
            let base = (w + r.min(rows - 1)) * t;
            for i in 0..t {
                tokens[r * t + i] = data.get(base + i);
                // Tokens a loss mask leaves out (the user's side of chat data) are not scored.
                let counted = r < rows && data.is_target(base + i + 1);
                targets[r * t + i] = if counted { data.get(base + i + 1) } else { crate::ops::cross_entropy::IGNORE };
            }
        }
        let loss = model.forward_with(params, adapters, tokens, targets)?;
        sum += loss.sum;
        count += loss.count;
        w += rows;
    }
    Ok((sum, count))
}

/// As `evaluate`, running each window through the KV-cache decoder with quantized matrices
/// (`--quant`), `PREFILL_ROWS` positions per pass; the loss of each position is computed in
/// f64 from its logits. Windows are the same as `evaluate`'s, so the results compare.
pub fn evaluate_quant(
    cfg: &ModelConfig,
    params: &[f32],
    quant: &crate::quant::weights::QuantWeights,
    data: &TokenData,
    t: usize,
    max_windows: usize,
) -> Result<EvalResult> {
    use crate::generate::{BatchDecoder, KvCache, PREFILL_ROWS, Row};
    ensure!(data.len() > t, "{} holds {} tokens; --seq {t} needs at least {}", data.source, data.len(), t + 1);
    let available = (data.len() - 1) / t;
    let windows = if max_windows == 0 { available } else { available.min(max_windows) };
    let start = std::time::Instant::now();
    let rows_per_pass = PREFILL_ROWS.min(t);
    let mut decoder = BatchDecoder::with_quant(cfg, params, Some(quant), t, rows_per_pass)?;
    let mut cache = KvCache::new(cfg, t)?;
    let v = cfg.vocab_size;
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut rows = Vec::with_capacity(rows_per_pass);
    for w in 0..windows {
        let base = w * t;
        cache.pos = 0;
        for at in (0..t).step_by(rows_per_pass) {
            rows.clear();
            rows.extend((at..t.min(at + rows_per_pass)).map(|i| Row { seq: 0, token: data.get(base + i), pos: i }));
            let logits = decoder.forward(&mut [&mut cache], &rows)?;
            for (row, l) in rows.iter().zip(logits.chunks_exact(v)) {
                let i = base + row.pos + 1;
                if !data.is_target(i) {
                    continue;
                }
                let target = data.get(i) as usize;
                let max = l.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let lse = l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
                let loss = lse - l[target] as f64;
                ensure!(loss.is_finite(), "the loss at token {i} is not finite (NaN or Inf in the logits)");
                sum += loss;
                count += 1;
            }
        }
    }
    ensure!(count > 0, "no scored tokens in {} windows of {}", windows, data.source);
    Ok(EvalResult::new(windows, sum, count, start.elapsed().as_secs_f64()))
}

/// Greedy continuation of `prompt` by `n_new` tokens, recomputing the whole sequence for each
/// one. Positions after the current end hold padding that causal attention never lets the
/// current position see.
pub fn greedy_slow(cfg: &ModelConfig, params: &[f32], prompt: &[u32], n_new: usize, par: Par) -> Result<Vec<u32>> {
    ensure!(!prompt.is_empty(), "the prompt needs at least one token");
    let t = (prompt.len() + n_new).min(cfg.max_seq_len);
    ensure!(prompt.len() < t, "the prompt already fills the model's {} positions", cfg.max_seq_len);
    let mut model = Model::cpu(cfg, 1, t, par)?;
    let mut seq = vec![0u32; t];
    seq[..prompt.len()].copy_from_slice(prompt);
    let targets = vec![crate::ops::cross_entropy::IGNORE; t];
    let v = cfg.vocab_size;
    for pos in prompt.len()..t {
        model.forward(params, &seq, &targets)?;
        let row = &model.logits()[(pos - 1) * v..pos * v];
        let best = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
        seq[pos] = best.0 as u32;
    }
    Ok(seq[prompt.len()..].to_vec())
}
