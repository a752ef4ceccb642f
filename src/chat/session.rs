//! A model ready to chat (weights, tokenizer, template, stop tokens) and a multi-turn
//! conversation whose history stays in one KV cache: each turn renders the whole conversation,
//! keeps the cached tokens it shares with the new rendering, and prefills only the rest.

use super::template::{ChatTemplate, Message};
use crate::config::ModelConfig;
use crate::generate::{BatchDecoder, KvCache, Row, Sampling, sample};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

/// Weights, tokenizer and chat template of one model.
pub struct ChatModel {
    pub name: String,
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Token ids that end a reply (the template's `eos_token` and the usual end-of-turn tokens
    /// the vocabulary has).
    pub stop: Vec<u32>,
    /// Quantized matrices to decode with (`--quant`), set by `quantize`.
    pub quant: Option<crate::quant::weights::QuantWeights>,
}

impl ChatModel {
    /// Any model `checkpoint::load` reads that carries a tokenizer and a chat template: an HF
    /// directory (tokenizer.json, tokenizer_config.json with `chat_template`), a GGUF file
    /// (its `tokenizer.ggml.*` vocabulary and `tokenizer.chat_template`), or a training
    /// checkpoint (the tokenizer and template saved with it). `template`, when given, is a
    /// Jinja file that replaces (or supplies) the model's own template.
    pub fn load(path: &Path, template: Option<&Path>) -> Result<Self> {
        Self::load_with_lora(path, template, None)
    }

    /// `load`, with the LoRA adapters in `lora` (a PEFT adapter directory or a LoRA
    /// checkpoint) merged into the weights.
    pub fn load_with_lora(path: &Path, template: Option<&Path>, lora: Option<&Path>) -> Result<Self> {
        let m = crate::checkpoint::load_with_lora(path, lora)?;
        let tokenizer = m.tokenizer.with_context(|| {
            format!(
                "{} carries no tokenizer; chat needs a model with one (an HF directory with tokenizer.json, a \
                 GGUF file, or a checkpoint trained with a tokenizer)",
                path.display()
            )
        })?;
        let text_of = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let (bos, eos) = (text_of(m.bos), text_of(m.eos));
        let template = match (template, m.chat_template) {
            (Some(file), _) => {
                let src = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
                ChatTemplate::new(&src, &bos, &eos).with_context(|| format!("in {}", file.display()))?
            }
            (None, Some(src)) => ChatTemplate::new(&src, &bos, &eos)
                .with_context(|| format!("in the chat template of {}", path.display()))?,
            (None, None) => bail!(
                "{} has no chat template (an HF tokenizer_config.json `chat_template`, GGUF \
                 `tokenizer.chat_template`, or one saved with a checkpoint); pass --chat-template FILE",
                path.display()
            ),
        };
        let name = match path.file_name() {
            Some(n) if path.is_file() => Path::new(n).file_stem().unwrap_or(n).to_string_lossy().into_owned(),
            Some(n) => n.to_string_lossy().into_owned(),
            None => "model".to_string(),
        };
        Self::new(name, m.cfg, m.params, tokenizer, template)
    }

    pub fn new(
        name: String,
        cfg: ModelConfig,
        params: Vec<f32>,
        tokenizer: Tokenizer,
        template: ChatTemplate,
    ) -> Result<Self> {
        ensure!(
            tokenizer.vocab_size() <= cfg.vocab_size,
            "the tokenizer has {} entries, the model's vocabulary {}",
            tokenizer.vocab_size(),
            cfg.vocab_size
        );
        let mut stop: Vec<u32> = [template.eos_token.as_str(), "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"]
            .iter()
            .filter(|t| !t.is_empty())
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        stop.sort_unstable();
        stop.dedup();
        Ok(ChatModel { name, cfg, params, tokenizer, template, stop, quant: None })
    }

    /// Decodes with quantized matrices from now on: this model's quantized as `mode`, or
    /// (`Gguf`) the file's own, `path` being the file it was loaded from.
    pub fn quantize(&mut self, path: &Path, mode: crate::quant::weights::QuantMode) -> Result<()> {
        self.quant = Some(crate::quant::weights::QuantWeights::load(path, &self.cfg, &self.params, mode)?);
        Ok(())
    }

    /// The token ids of `messages` rendered with the template, ending with the assistant's cue.
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        ensure!(!ids.is_empty(), "the chat template rendered the conversation as no tokens");
        Ok(ids)
    }
}

/// Turns generated ids into text as it streams: the difference between successive decodings
/// of everything generated so far, held back while it ends in half a character.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    shown: usize,
}

impl TextStream {
    /// The new text after `id` (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        match tok.decode(&self.ids) {
            Ok(text) if !text.ends_with('\u{fffd}') && text.len() > self.shown && text.is_char_boundary(self.shown) => {
                let new = text[self.shown..].to_string();
                self.shown = text.len();
                new
            }
            _ => String::new(),
        }
    }

    /// Everything decoded so far.
    pub fn text(&self, tok: &Tokenizer) -> String {
        tok.decode(&self.ids).unwrap_or_default()
    }
}

/// Why a reply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnEnd {
    /// The model produced a stop token.
    Stop,
    /// `max_new` tokens were generated.
    Length,
    /// The caller's interrupt check fired (Ctrl-C).
    Interrupted,
    /// The KV cache filled up mid-reply.
    ContextFull,
}

/// What one turn did.
#[derive(Debug)]
pub struct TurnReport {
    pub reply: String,
    pub end: TurnEnd,
    /// Oldest turns dropped to make room.
    pub dropped_turns: usize,
    /// Prompt tokens taken from the cache, and prefilled.
    pub reused: usize,
    pub prefilled: usize,
    pub generated: usize,
}

/// Rows per prefill call.
const PREFILL_ROWS: usize = 64;

/// A conversation with one model, its tokens in one KV cache of `ctx` positions.
pub struct ChatSession<'a> {
    model: &'a ChatModel,
    decoder: BatchDecoder<'a>,
    cache: KvCache,
    /// The ids whose keys and values are in the cache, in order.
    cached: Vec<u32>,
    pub system: Option<String>,
    pub history: Vec<Message>,
    pub ctx: usize,
    logits: Vec<f32>,
    order: Vec<usize>,
}

impl<'a> ChatSession<'a> {
    pub fn new(model: &'a ChatModel, ctx: usize, system: Option<String>) -> Result<Self> {
        ensure!(ctx >= 16, "a context of {ctx} positions is too short to chat");
        ensure!(ctx <= model.cfg.max_seq_len, "--ctx {ctx} exceeds the model's {} positions", model.cfg.max_seq_len);
        Ok(ChatSession {
            decoder: BatchDecoder::with_quant(&model.cfg, &model.params, model.quant.as_ref(), ctx, PREFILL_ROWS)?,
            cache: KvCache::new(&model.cfg, ctx)?,
            cached: Vec::new(),
            logits: vec![0.0; model.cfg.vocab_size],
            order: Vec::with_capacity(model.cfg.vocab_size),
            model,
            system,
            history: Vec::new(),
            ctx,
        })
    }

    /// Forgets the conversation (the system prompt stays).
    pub fn reset(&mut self) {
        self.history.clear();
    }

    fn messages(&self) -> Vec<Message> {
        self.system.iter().map(|s| Message::new("system", s)).chain(self.history.iter().cloned()).collect()
    }

    /// Tokens the cache holds (for tests and the status line).
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Adds the user's message and streams the reply through `emit`; `interrupted` is polled
    /// after every token. Room for at least `min(max_new, ctx / 4)` reply tokens is made by
    /// dropping the oldest turns.
    pub fn turn(
        &mut self,
        user: &str,
        max_new: usize,
        sampling: &Sampling,
        rng: &mut Rng,
        mut interrupted: impl FnMut() -> bool,
        mut emit: impl FnMut(&str),
    ) -> Result<TurnReport> {
        self.history.push(Message::new("user", user));
        let room = max_new.min(self.ctx / 4).max(1);
        let mut dropped_turns = 0;
        let ids = loop {
            let ids = match self.model.prompt_ids(&self.messages()) {
                Ok(ids) => ids,
                Err(e) => {
                    self.history.pop();
                    return Err(e);
                }
            };
            if ids.len() + room <= self.ctx {
                break ids;
            }
            // Drop the oldest turn: its user message and the replies up to the next one.
            let next_user = self.history.iter().skip(1).position(|m| m.role == "user").map(|i| i + 1);
            match next_user {
                Some(cut) => {
                    self.history.drain(..cut);
                    dropped_turns += 1;
                }
                None => {
                    self.history.pop();
                    bail!(
                        "the conversation needs {} tokens plus {room} for the reply; the context holds {} \
                         (a shorter message or a larger --ctx)",
                        ids.len(),
                        self.ctx
                    );
                }
            }
        };
        // Keep the longest cached prefix; at least the last prompt token is fed for its logits.
        let mut keep = self.cached.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        keep = keep.min(ids.len() - 1);
        self.cached.truncate(keep);
        self.cache.pos = keep;
        let v = self.model.cfg.vocab_size;
        for (c, chunk) in ids[keep..].chunks(PREFILL_ROWS).enumerate() {
            let at = keep + c * PREFILL_ROWS;
            let rows: Vec<Row> =
                chunk.iter().enumerate().map(|(i, &token)| Row { seq: 0, token, pos: at + i }).collect();
            let logits = self.decoder.forward(&mut [&mut self.cache], &rows)?;
            self.logits.copy_from_slice(&logits[(rows.len() - 1) * v..]);
        }
        self.cached.extend_from_slice(&ids[keep..]);
        let (mut stream, mut generated) = (TextStream::default(), 0);
        let tok = &self.model.tokenizer;
        let end = loop {
            if generated == max_new {
                break TurnEnd::Length;
            }
            let next = sample(&mut self.logits, sampling, rng, &mut self.order);
            if self.model.stop.contains(&next) {
                break TurnEnd::Stop;
            }
            generated += 1;
            emit(&stream.push(tok, next));
            if interrupted() {
                break TurnEnd::Interrupted;
            }
            if self.cache.pos == self.ctx {
                break TurnEnd::ContextFull;
            }
            let row = Row { seq: 0, token: next, pos: self.cache.pos };
            let logits = self.decoder.forward(&mut [&mut self.cache], &[row])?;
            self.logits.copy_from_slice(logits);
            self.cached.push(next);
        };
        let reply = stream.text(tok);
        self.history.push(Message::new("assistant", &reply));
        Ok(TurnReport { reply, end, dropped_turns, reused: keep, prefilled: ids.len() - keep, generated })
    }
}
