//! Models: open any file `anetrain` reads, tokenize and detokenize with its tokenizer,
//! generate with a streaming callback, and evaluate the loss on a token buffer.

use crate::args::{out_ptr, slice, slice_mut, text, write};
use crate::error::{AnetrainStatus, Res, fail, guard, with_status};
use crate::handles::{self, Kind};
use anetrain::checkpoint::LoadedModel;
use anetrain::generate::{Decoder, Sampling, sample};
use anetrain::rng::Rng;
use std::ffi::{c_char, c_void};

/// A model opened by `anetrain_model_open`. The zero handle is never valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnetrainModel {
    pub id: u64,
}

pub(crate) struct ModelObj {
    pub m: LoadedModel,
}

impl Kind for ModelObj {
    const NAME: &'static str = "model";
}

impl ModelObj {
    /// Whether the model's files declare BOS/EOS ids (GGUF, HF); otherwise a document starts
    /// and ends at the tokenizer's document token (as `anetrain generate` does).
    fn declares_specials(&self) -> bool {
        self.m.bos.is_some() || self.m.eos.is_some()
    }

    fn start_token(&self) -> Option<u32> {
        if self.declares_specials() {
            self.m.bos.filter(|_| self.m.add_bos)
        } else {
            self.m.tokenizer.as_ref().and_then(|t| t.doc_token)
        }
    }

    fn end_token(&self) -> Option<u32> {
        if self.declares_specials() { self.m.eos } else { self.m.tokenizer.as_ref().and_then(|t| t.doc_token) }
    }

    fn tokenizer(&self) -> Res<&anetrain::tokenizer::Tokenizer> {
        self.m.tokenizer.as_ref().ok_or_else(|| {
            fail(
                AnetrainStatus::BadArgument,
                "this model has no tokenizer (a llama2.c .bin or bare weights); pass token ids instead of text",
            )
        })
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Res<()> {
        let v = self.m.cfg.vocab_size;
        match ids.iter().position(|&t| t as usize >= v) {
            Some(i) => Err(fail(
                AnetrainStatus::BadArgument,
                format!("{what}[{i}] = {} is outside the model's vocabulary ({v} ids)", ids[i]),
            )),
            None => Ok(()),
        }
    }
}

/// The model object behind `h`, for one call.
pub(crate) fn model(h: AnetrainModel) -> Res<std::sync::Arc<std::sync::Mutex<ModelObj>>> {
    handles::get::<ModelObj>(h.id)
}

/// Opens a model: an HF model directory (config.json + safetensors, with its tokenizer), a
/// llama2.c `.bin`, a `.gguf` file, or a training checkpoint (a step directory, or a
/// checkpoint directory, whose `latest` is used) — whatever `anetrain generate --model` takes.
/// On success `*out` is the new handle; on failure it is set to the zero handle.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_model_open(path: *const c_char, out: *mut AnetrainModel) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainModel::default()) };
        // SAFETY: the caller's contract.
        let path = std::path::Path::new(unsafe { text(path, "path") }?);
        if !path.exists() {
            return Err(fail(AnetrainStatus::Io, format!("model {} does not exist", path.display())));
        }
        // Whatever stops a model from loading is a file that cannot be read as one.
        let m = anetrain::checkpoint::load(path).map_err(with_status(AnetrainStatus::Io))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainModel { id: handles::insert(ModelObj { m }) }) };
        Ok(())
    })
}

/// Frees a model. Its handle is invalid afterwards (every call with it, including a second
/// free, returns `ANETRAIN_STATUS_BAD_HANDLE`).
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_model_free(model: AnetrainModel) -> AnetrainStatus {
    guard(|| handles::remove::<ModelObj>(model.id))
}

/// What `anetrain_model_info` reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AnetrainModelInfo {
    /// V: the number of token ids.
    pub vocab_size: usize,
    /// C: the model width.
    pub dim: usize,
    /// L: transformer layers.
    pub n_layers: usize,
    /// The longest sequence the model takes (prompt plus generated tokens).
    pub max_seq_len: usize,
    /// Weights in the model.
    pub param_count: usize,
    /// Whether the model carries a tokenizer (`anetrain_tokenize` works).
    pub has_tokenizer: bool,
    /// The id `anetrain_tokenize` puts first when asked to (-1: none).
    pub bos: i64,
    /// The id generation stops after (-1: none; generation then stops only at `max_new`, the
    /// model's length or the callback).
    pub eos: i64,
}

/// Describes a model.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_model_info(model: AnetrainModel, out: *mut AnetrainModelInfo) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        let obj = self::model(model)?;
        let obj = handles::lock(&obj)?;
        let cfg = &obj.m.cfg;
        let info = AnetrainModelInfo {
            vocab_size: cfg.vocab_size,
            dim: cfg.dim,
            n_layers: cfg.n_layers,
            max_seq_len: cfg.max_seq_len,
            param_count: cfg.param_count(),
            has_tokenizer: obj.m.tokenizer.is_some(),
            bos: obj.start_token().map_or(-1, i64::from),
            eos: obj.end_token().map_or(-1, i64::from),
        };
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, info) };
        Ok(())
    })
}

/// Writes `n` results into the caller's buffer of `cap`, or reports the length needed:
/// `buf` NULL with `cap` 0 asks for the length only (success); a smaller `cap` is
/// `BAD_LENGTH`. `*out_n` is the length needed in both cases.
unsafe fn fill<T: Copy>(items: &[T], buf: *mut T, cap: usize, out_n: *mut usize, what: &str) -> Res<()> {
    // SAFETY: checked by the caller's `out_ptr(out_n)`.
    unsafe { write(out_n, items.len()) };
    if buf.is_null() && cap == 0 {
        return Ok(());
    }
    if cap < items.len() {
        return Err(fail(
            AnetrainStatus::BadLength,
            format!("{what} holds {cap} elements; the result needs {} (reported in the length output)", items.len()),
        ));
    }
    // SAFETY: the caller's contract: `buf` has `cap` writable elements.
    let dst = unsafe { slice_mut(buf, cap, what) }?;
    dst[..items.len()].copy_from_slice(items);
    Ok(())
}

/// Encodes UTF-8 `text` into token ids. With `add_bos` non-zero the ids start with the
/// token a document starts with (`anetrain_model_info`'s `bos`), when the model has one.
///
/// The ids go to `ids` (room for `cap`); `*out_n` receives how many there are. To ask for
/// the count only, pass `ids` NULL and `cap` 0. If `cap` is too small the call returns
/// `ANETRAIN_STATUS_BAD_LENGTH`, with `*out_n` the count needed.
///
/// # Safety
/// `text` is NULL or NUL-terminated; `ids` is NULL or has room for `cap` ids; `out_n` is NULL
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_tokenize(
    model: AnetrainModel,
    text: *const c_char,
    add_bos: i32,
    ids: *mut u32,
    cap: usize,
    out_n: *mut usize,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(out_n, "out_n")?;
        // SAFETY: the caller's contract.
        let s = unsafe { crate::args::text(text, "text") }?;
        let obj = self::model(model)?;
        let obj = handles::lock(&obj)?;
        let mut out: Vec<u32> = obj.start_token().filter(|_| add_bos != 0).into_iter().collect();
        out.extend(obj.tokenizer()?.encode(s).map_err(with_status(AnetrainStatus::BadArgument))?);
        // SAFETY: the caller's contract for `ids`; `out_n` checked above.
        unsafe { fill(&out, ids, cap, out_n, "ids") }
    })
}

/// Decodes `n` token ids into UTF-8 text, written NUL-terminated into `buf` (room for `cap`
/// bytes, the NUL included); `*out_len` receives the text's length in bytes without the NUL.
/// To ask for the length only, pass `buf` NULL and `cap` 0. If `cap` is too small (it must be
/// at least the length + 1) the call returns `ANETRAIN_STATUS_BAD_LENGTH`.
///
/// # Safety
/// `ids` is NULL or holds `n` ids; `buf` is NULL or has room for `cap` bytes; `out_len` is
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_detokenize(
    model: AnetrainModel,
    ids: *const u32,
    n: usize,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(out_len, "out_len")?;
        // SAFETY: the caller's contract.
        let ids = unsafe { slice(ids, n, "ids") }?;
        let obj = self::model(model)?;
        let obj = handles::lock(&obj)?;
        obj.check_ids(ids, "ids")?;
        let s = obj.tokenizer()?.decode(ids).map_err(with_status(AnetrainStatus::BadArgument))?;
        let mut bytes: Vec<c_char> = s.bytes().map(|b| b as c_char).collect();
        bytes.push(0);
        // SAFETY: checked above.
        unsafe { write(out_len, s.len()) };
        if buf.is_null() && cap == 0 {
            return Ok(());
        }
        if cap < bytes.len() {
            return Err(fail(
                AnetrainStatus::BadLength,
                format!("buf holds {cap} bytes; the text needs {} with its NUL (reported in out_len + 1)", bytes.len()),
            ));
        }
        // SAFETY: the caller's contract for `buf`.
        unsafe { slice_mut(buf, cap, "buf") }?[..bytes.len()].copy_from_slice(&bytes);
        Ok(())
    })
}

/// How `anetrain_generate` picks each token.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AnetrainSampling {
    /// 0: greedy (the most likely token); otherwise the softmax temperature.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// Seed of the sampling RNG: the same seed gives the same tokens.
    pub seed: u64,
}

/// Called once per generated token, on the thread that called `anetrain_generate`, with the
/// token id, the text it completes (NUL-terminated UTF-8, valid only during the call: "" when
/// the token ends in the middle of a character, NULL when the model has no tokenizer) and the
/// caller's `user` pointer. Return 0 to continue, anything else to stop after this token.
pub type AnetrainTokenCallback =
    Option<unsafe extern "C" fn(token: u32, piece: *const c_char, user: *mut c_void) -> i32>;

/// Generates up to `max_new` tokens after the `n_prompt` ids of `prompt`, on the CPU with a
/// KV cache, calling `callback` (if not NULL) with each token as it is decoded. Stops after
/// `max_new` tokens, after the model's end token (`anetrain_model_info`'s `eos`, which is
/// passed to the callback), at the model's `max_seq_len`, or when the callback returns
/// non-zero. `sampling` NULL means greedy. `*out_n` (if not NULL) receives the number of
/// tokens generated.
///
/// # Safety
/// `prompt` is NULL or holds `n_prompt` ids; `sampling` is NULL or readable; `out_n` is NULL
/// or writable; `callback`, if not NULL, is safe to call with `user`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn anetrain_generate(
    model: AnetrainModel,
    prompt: *const u32,
    n_prompt: usize,
    max_new: usize,
    sampling: *const AnetrainSampling,
    callback: AnetrainTokenCallback,
    user: *mut c_void,
    out_n: *mut usize,
) -> AnetrainStatus {
    guard(|| {
        if !out_n.is_null() {
            out_ptr(out_n, "out_n")?;
            // SAFETY: checked by `out_ptr`.
            unsafe { write(out_n, 0) };
        }
        // SAFETY: the caller's contract.
        let prompt = unsafe { slice(prompt, n_prompt, "prompt") }?;
        let s = if sampling.is_null() {
            Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 1 }
        } else {
            // SAFETY: non-NULL and readable by the caller's contract.
            let s = unsafe { slice(sampling, 1, "sampling") }?[0];
            Sampling { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p, seed: s.seed }
        };
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return Err(fail(AnetrainStatus::BadArgument, "sampling temperature must be a finite number ≥ 0"));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(fail(AnetrainStatus::BadArgument, "sampling top_p must be in (0, 1]"));
        }
        let obj = self::model(model)?;
        let obj = handles::lock(&obj)?;
        let cfg = &obj.m.cfg;
        if prompt.is_empty() {
            return Err(fail(AnetrainStatus::BadArgument, "the prompt needs at least one token"));
        }
        obj.check_ids(prompt, "prompt")?;
        if prompt.len() > cfg.max_seq_len {
            return Err(fail(
                AnetrainStatus::BadArgument,
                format!("the prompt is {} tokens; the model has {} positions", prompt.len(), cfg.max_seq_len),
            ));
        }
        let (par, pool) = crate::runtime()?;
        let params = &obj.m.params;
        let max_t = (prompt.len() + max_new).min(cfg.max_seq_len);
        let mut decoder = Decoder::new(cfg, params, max_t)?;
        pool.install(|| -> anyhow::Result<()> {
            anetrain::model::memory_estimate(cfg, 1, prompt.len(), false)
                .ensure(&format!("prefilling a prompt of {} tokens", prompt.len()), "use a shorter prompt")?;
            let mut m = anetrain::model::Model::cpu(cfg, 1, prompt.len(), *par)?;
            decoder.prefill(&mut m, prompt)
        })?;
        let (eos, tokenizer) = (obj.end_token(), obj.m.tokenizer.as_ref());
        let (mut rng, mut order) = (Rng::new(s.seed), Vec::with_capacity(cfg.vocab_size));
        // Text goes out as the difference between successive decodings of everything
        // generated so far (a token may be half of a character).
        let (mut generated, mut shown) = (Vec::new(), 0usize);
        let mut produced = 0;
        while produced < max_new && decoder.pos < max_t {
            let next = sample(&mut decoder.logits, &s, &mut rng, &mut order);
            produced += 1;
            generated.push(next);
            let piece = match tokenizer {
                None => None,
                Some(tok) => {
                    let text = tok.decode(&generated)?;
                    let mut piece = String::new();
                    if !text.ends_with('\u{fffd}') && text.len() > shown && text.is_char_boundary(shown) {
                        piece = text[shown..].replace('\0', " ");
                        shown = text.len();
                    }
                    Some(std::ffi::CString::new(piece).unwrap_or_default())
                }
            };
            if !out_n.is_null() {
                // SAFETY: checked above.
                unsafe { write(out_n, produced) };
            }
            let stop = match callback {
                // SAFETY: the caller's contract; `piece` lives until after the call.
                Some(f) => {
                    let piece = piece.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
                    (unsafe { f(next, piece, user) }) != 0
                }
                None => false,
            };
            if stop || Some(next) == eos || decoder.pos == max_t {
                break;
            }
            pool.install(|| decoder.step(next))?;
        }
        Ok(())
    })
}

/// The model's mean next-token cross-entropy (nats per token) on `n` tokens, in windows of
/// `seq` + 1 tokens: window i reads tokens i·seq … i·seq + seq and predicts its last `seq`
/// from the ones before them, so every token after the first is scored once, up to the last
/// whole window. `seq` 0 means one window of all `n` tokens (at most the model's
/// `max_seq_len` + 1). Runs on the CPU in f32.
///
/// # Safety
/// `tokens` is NULL or holds `n` ids; `loss` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_model_loss(
    model: AnetrainModel,
    tokens: *const u32,
    n: usize,
    seq: usize,
    loss: *mut f64,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(loss, "loss")?;
        // SAFETY: the caller's contract.
        let tokens = unsafe { slice(tokens, n, "tokens") }?;
        let obj = self::model(model)?;
        let obj = handles::lock(&obj)?;
        let cfg = &obj.m.cfg;
        if tokens.len() < 2 {
            return Err(fail(AnetrainStatus::BadLength, format!("{n} tokens: the loss needs at least 2")));
        }
        obj.check_ids(tokens, "tokens")?;
        let t = if seq == 0 { (tokens.len() - 1).min(cfg.max_seq_len) } else { seq };
        if t > cfg.max_seq_len || t >= tokens.len() {
            return Err(fail(
                AnetrainStatus::BadArgument,
                format!("seq {t} needs more than {t} tokens and at most the model's {} positions", cfg.max_seq_len),
            ));
        }
        let data = anetrain::data::TokenData::from_vec(tokens.to_vec(), cfg.vocab_size, "the token buffer")?;
        let (par, pool) = crate::runtime()?;
        let r = pool.install(|| anetrain::eval::evaluate(cfg, &obj.m.params, &data, t, 8, 0, *par))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(loss, r.loss) };
        Ok(())
    })
}
