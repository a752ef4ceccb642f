//! The serving engine: one thread owns the model and runs continuous batching. New requests
//! are prefilled one at a time (batched GEMMs over the prompt); then every step decodes one
//! token of every active sequence in a single `BatchDecoder::forward` (each weight matrix read
//! once for all of them). A sequence leaves the batch when it stops, reaches its limit, or its
//! client goes away (its event channel closed); a waiting request joins at the next step.

use crate::chat::session::ChatModel;
use crate::generate::{BatchDecoder, KvCache, Row, Sampling, prefill, sample};
use crate::model::Model;
use crate::ops::Par;
use crate::rng::Rng;
use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// One generation request, tokenized and validated by the HTTP layer.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub sampling: Sampling,
    /// Strings that end the reply (not included in it).
    pub stop: Vec<String>,
    /// Whether the model's stop tokens end the reply (chat: yes; plain completions: the
    /// document/end token only).
    pub stop_ids: Vec<u32>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the engine tells a request.
#[derive(Debug)]
pub enum Event {
    /// New reply text (may be empty when a token ends in half a character).
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Counters shared with the HTTP layer (`GET /health`).
#[derive(Default)]
pub struct Stats {
    pub active: AtomicUsize,
    pub queued: AtomicUsize,
    pub completed: AtomicUsize,
    /// Sequences stopped because their client disconnected.
    pub cancelled: AtomicUsize,
    pub generated_tokens: AtomicUsize,
    /// Largest number of sequences decoded in one step so far.
    pub peak_batch: AtomicUsize,
}

struct Seq {
    job: Job,
    cache: KvCache,
    rng: Rng,
    /// `[V]` next-token logits
    logits: Vec<f32>,
    /// The token to feed at the next step (`FINISHED` once done).
    pending: u32,
    /// Reply ids so far.
    ids: Vec<u32>,
    /// Bytes of the reply text already sent.
    sent: usize,
    generated: usize,
    /// Whether `Done` reached the client (otherwise a finished sequence was cancelled).
    done_sent: bool,
}

/// Runs until every sender of `jobs` is gone. `max_batch` sequences decode together at most.
pub fn run(
    model: Arc<ChatModel>,
    jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    ctx: usize,
    par: Par,
    stats: Arc<Stats>,
) {
    if let Err(e) = run_inner(&model, jobs, max_batch, ctx, par, &stats) {
        eprintln!("serve: the engine stopped: {e:#}");
    }
}

fn run_inner(
    model: &ChatModel,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    ctx: usize,
    par: Par,
    stats: &Stats,
) -> Result<()> {
    let mut decoder = BatchDecoder::with_quant(&model.cfg, &model.params, model.quant.as_ref(), ctx, max_batch)?;
    let mut active: Vec<Seq> = Vec::with_capacity(max_batch);
    let mut rows: Vec<Row> = Vec::with_capacity(max_batch);
    let mut order = Vec::with_capacity(model.cfg.vocab_size);
    let v = model.cfg.vocab_size;
    loop {
        // Admit waiting requests while there is room; block only when idle.
        while active.len() < max_batch {
            let job = if active.is_empty() {
                match jobs.blocking_recv() {
                    Some(job) => job,
                    None => return Ok(()),
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            stats.queued.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                stats.cancelled.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            match start(model, job, par, &mut order, stats) {
                Ok(seq) => active.push(seq),
                Err((events, e)) => {
                    let _ = events.send(Event::Failed(format!("{e:#}")));
                }
            }
            stats.active.store(active.len(), Ordering::SeqCst);
        }
        // Sequences whose first token already ended them, or whose client left, finish here.
        retire(&mut active, stats);
        if active.is_empty() {
            continue;
        }
        rows.clear();
        rows.extend(active.iter().enumerate().map(|(i, s)| Row { seq: i, token: s.pending, pos: s.cache.pos }));
        let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|s| &mut s.cache).collect();
        let logits = match decoder.forward(&mut caches, &rows) {
            Ok(l) => l,
            Err(e) => {
                // The step's sequences fail; the engine goes on serving the next requests.
                for seq in active.drain(..) {
                    let _ = seq.job.events.send(Event::Failed(format!("decoding failed: {e:#}")));
                    stats.cancelled.fetch_add(1, Ordering::SeqCst);
                }
                stats.active.store(0, Ordering::SeqCst);
                continue;
            }
        };
        stats.peak_batch.fetch_max(rows.len(), Ordering::SeqCst);
        for (seq, row_logits) in active.iter_mut().zip(logits.chunks_exact(v)) {
            seq.logits.copy_from_slice(row_logits);
        }
        for seq in &mut active {
            advance(model, seq, &mut order, stats);
        }
        retire(&mut active, stats);
        stats.active.store(active.len(), Ordering::SeqCst);
    }
}

/// Marks a finished sequence: `pending` is set to this sentinel.
const FINISHED: u32 = u32::MAX;

/// Prefills the job's prompt and picks its first token (which may finish it at once).
fn start(
    model: &ChatModel,
    job: Job,
    par: Par,
    order: &mut Vec<usize>,
    stats: &Stats,
) -> std::result::Result<Seq, (mpsc::UnboundedSender<Event>, anyhow::Error)> {
    let max_t = job.prompt.len() + job.max_new;
    let prep = (|| -> Result<(KvCache, Vec<f32>)> {
        let mut cache = KvCache::new(&model.cfg, max_t)?;
        crate::model::memory_estimate(&model.cfg, 1, job.prompt.len(), false)
            .ensure(&format!("prefilling a prompt of {} tokens", job.prompt.len()), "send a shorter prompt")?;
        let mut logits = vec![0.0; model.cfg.vocab_size];
        let mut m = Model::cpu(&model.cfg, 1, job.prompt.len(), par)?;
        prefill(&mut m, &model.params, &mut cache, &job.prompt, &mut logits)?;
        Ok((cache, logits))
    })();
    let (cache, logits) = match prep {
        Ok(x) => x,
        Err(e) => return Err((job.events, e)),
    };
    let rng = Rng::new(job.sampling.seed);
    let mut seq = Seq { job, cache, rng, logits, pending: 0, ids: Vec::new(), sent: 0, generated: 0, done_sent: false };
    advance(model, &mut seq, order, stats);
    Ok(seq)
}

/// Samples the next token from `seq.logits`, streams its text, and decides whether the
/// sequence goes on (`pending` = the token) or is done (`pending` = FINISHED, `Done` sent).
fn advance(model: &ChatModel, seq: &mut Seq, order: &mut Vec<usize>, stats: &Stats) {
    if seq.pending == FINISHED {
        return;
    }
    let next = sample(&mut seq.logits, &seq.job.sampling, &mut seq.rng, order);
    let mut finish = None;
    if seq.job.stop_ids.contains(&next) {
        finish = Some("stop");
    } else {
        seq.generated += 1;
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        seq.ids.push(next);
    }
    let text = model.tokenizer.decode(&seq.ids).unwrap_or_default();
    // The earliest stop string ends the reply; text that might begin one is held back.
    let hit = seq.job.stop.iter().filter_map(|s| text[seq.sent..].find(s.as_str()).map(|i| seq.sent + i)).min();
    let mut upto = text.len();
    if let Some(at) = hit {
        upto = at;
        finish = Some("stop");
    }
    if finish.is_none() && (seq.generated >= seq.job.max_new || seq.cache.pos >= seq.cache.max_t) {
        finish = Some("length");
    }
    if finish.is_none() {
        let hold = seq.job.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        upto = text.len().saturating_sub(hold).max(seq.sent);
        // A token can end in half a character; the decoded text ends with U+FFFD then.
        if text.ends_with('\u{fffd}') {
            upto = upto.min(text.len() - '\u{fffd}'.len_utf8()).max(seq.sent);
        }
        while !text.is_char_boundary(upto) {
            upto -= 1;
        }
    }
    if upto > seq.sent {
        if seq.job.events.send(Event::Text(text[seq.sent..upto].to_string())).is_err() {
            seq.pending = FINISHED;
            return;
        }
        seq.sent = upto;
    }
    match finish {
        Some(reason) => {
            let done = Event::Done {
                finish_reason: reason,
                prompt_tokens: seq.job.prompt.len(),
                completion_tokens: seq.generated,
            };
            seq.done_sent = seq.job.events.send(done).is_ok();
            seq.pending = FINISHED;
        }
        None => seq.pending = next,
    }
}

/// Drops finished sequences and those whose client disconnected.
fn retire(active: &mut Vec<Seq>, stats: &Stats) {
    active.retain(|s| {
        let gone = s.pending == FINISHED || s.job.events.is_closed();
        if gone {
            let counter = if s.done_sent { &stats.completed } else { &stats.cancelled };
            counter.fetch_add(1, Ordering::SeqCst);
        }
        !gone
    });
}
