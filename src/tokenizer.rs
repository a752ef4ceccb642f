//! Tokenizers: HF `tokenizer.json` files (Qwen3, anything HF) through the `tokenizers` crate
//! (no network features), byte-level BPE trained here on a corpus, and sentencepiece
//! vocabularies (a `tokenizer.model` protobuf or llama2.c's `tokenizer.bin`) encoded by this
//! file's own merge loop. A tokenizer's
//! fingerprint — a hash of its canonical JSON — goes into every token file made with it, so
//! data from another tokenizer is refused.

use crate::hash::fnv1a as fnv;
use anyhow::{Context, Result, anyhow, ensure};
use std::path::Path;
use std::str::FromStr;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};

/// Separates documents in token files; the first id of a trained vocabulary.
pub const DOC_TOKEN: &str = "<|endoftext|>";

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    SentencePiece(SentencePiece),
}

pub struct Tokenizer {
    inner: Inner,
    /// `hf:` + 16 hex digits of FNV-1a over the canonical JSON.
    pub fingerprint: String,
    /// Id placed before each document (and the end-of-sequence for generation), if the
    /// vocabulary has one.
    pub doc_token: Option<u32>,
}

impl Tokenizer {
    fn wrap(inner: tokenizers::Tokenizer) -> Result<Self> {
        let json = inner.to_string(false).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
        let doc_token = [DOC_TOKEN, "<s>", "<|im_start|>"].iter().find_map(|t| inner.token_to_id(t));
        Ok(Tokenizer {
            fingerprint: format!("hf:{:016x}", fnv(json.as_bytes())),
            doc_token,
            inner: Inner::Hf(Box::new(inner)),
        })
    }

    fn wrap_sp(sp: SentencePiece) -> Self {
        let mut h = Vec::new();
        for (p, s) in sp.pieces.iter().zip(&sp.scores) {
            h.extend_from_slice(p.as_bytes());
            h.extend_from_slice(&s.to_le_bytes());
        }
        // sentencepiece's BOS is id 1 (llama2.c's tokenizer.bin spells it "\n<s>\n").
        let doc_token = Some(1);
        Tokenizer { fingerprint: format!("sp:{:016x}", fnv(&h)), doc_token, inner: Inner::SentencePiece(sp) }
    }

    /// Wraps an HF tokenizer built elsewhere (e.g. from a GGUF file's metadata).
    pub fn from_hf(inner: tokenizers::Tokenizer) -> Result<Self> {
        Self::wrap(inner)
    }

    /// A Llama sentencepiece-style tokenizer from its pieces and scores (e.g. a GGUF file's
    /// `tokenizer.ggml.tokens` / `scores`); byte fallback pieces must sit at ids 3–258.
    pub fn from_pieces(pieces: Vec<String>, scores: Vec<f32>) -> Result<Self> {
        ensure!(pieces.len() == scores.len(), "{} pieces but {} scores", pieces.len(), scores.len());
        Ok(Self::wrap_sp(SentencePiece::new(pieces, scores)?))
    }

    /// The HF tokenizer inside, if this is one.
    pub fn as_hf(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.inner {
            Inner::Hf(t) => Some(t),
            Inner::SentencePiece(_) => None,
        }
    }

    /// (pieces, scores) of a sentencepiece-style tokenizer.
    pub fn as_pieces(&self) -> Option<(&[String], &[f32])> {
        match &self.inner {
            Inner::Hf(_) => None,
            Inner::SentencePiece(sp) => Some((&sp.pieces, &sp.scores)),
        }
    }

    /// Loads a tokenizer by file kind: HF `tokenizer.json`, sentencepiece `tokenizer.model`,
    /// or llama2.c `tokenizer.bin`.
    pub fn load(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("model") => return Ok(Self::wrap_sp(SentencePiece::from_model(path)?)),
            Some("bin") => return Ok(Self::wrap_sp(SentencePiece::from_llama2c(path)?)),
            _ => {}
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        let inner = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        Self::wrap(inner)
    }

    /// Trains a byte-level BPE of `vocab_size` entries (256 byte symbols, the document token,
    /// and merges) on `texts`.
    pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<Self> {
        Self::train_bpe_with_specials(texts, vocab_size, &[])
    }

    /// `train_bpe` with more special tokens after the document token (ids 1, 2, …), such as
    /// ChatML's `<|im_start|>` and `<|im_end|>` for a chat template.
    pub fn train_bpe_with_specials(texts: &[String], vocab_size: usize, specials: &[&str]) -> Result<Self> {
        ensure!(
            vocab_size >= 258 + specials.len(),
            "a byte-level BPE needs a vocabulary of at least {}, got {vocab_size}",
            258 + specials.len()
        );
        let specials: Vec<AddedToken> = std::iter::once(DOC_TOKEN)
            .chain(specials.iter().copied())
            .map(|s| AddedToken::from(s.to_string(), true))
            .collect();
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut typed = tokenizers::TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .map_err(|e| anyhow!("cannot build tokenizer: {e}"))?;
        typed.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("BPE training failed: {e}"))?;
        let json = typed.to_string(false).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
        Self::wrap(
            tokenizers::Tokenizer::from_str(&json).map_err(|e| anyhow!("trained tokenizer does not reload: {e}"))?,
        )
    }

    /// Writes the tokenizer into `dir` (HF: tokenizer.json; sentencepiece: tokenizer.bin in
    /// llama2.c's format) and returns the file's path.
    pub fn save_to_dir(&self, dir: &Path) -> Result<std::path::PathBuf> {
        let (path, bytes) = match &self.inner {
            Inner::Hf(inner) => {
                let json = inner.to_string(false).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
                (dir.join("tokenizer.json"), json.into_bytes())
            }
            Inner::SentencePiece(sp) => (dir.join("tokenizer.bin"), sp.to_llama2c()),
        };
        crate::fsio::write_atomically(&path, |out| std::io::Write::write_all(out, &bytes))?;
        Ok(path)
    }

    /// The tokenizer `prepare` wrote into `dir`: the one whose fingerprint `train.tok` records
    /// (a tokenizer file that does not match the tokens beside it is refused, not used).
    pub fn load_from_dir(dir: &Path) -> Result<Self> {
        let train = dir.join("train.tok");
        let want = if train.is_file() { crate::data::TokenData::recorded_tokenizer(&train)? } else { None };
        let mut found = Vec::new();
        for name in ["tokenizer.json", "tokenizer.bin"] {
            if dir.join(name).is_file() {
                let tok = Self::load(&dir.join(name))?;
                match &want {
                    Some(want) if *want != tok.fingerprint => found.push(format!("{name} is {}", tok.fingerprint)),
                    _ => return Ok(tok),
                }
            }
        }
        match want {
            Some(want) if !found.is_empty() => anyhow::bail!(
                "{}: train.tok was made with tokenizer {want}, but {}; re-run prepare into an empty directory",
                dir.display(),
                found.join(" and ")
            ),
            _ => anyhow::bail!("{} has no tokenizer.json or tokenizer.bin", dir.display()),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::SentencePiece(sp) => sp.pieces.len(),
        }
    }

    /// The id of a token given by its text (special tokens such as `<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::SentencePiece(sp) => sp.lookup.get(token).copied(),
        }
    }

    /// The text of token `id` as the vocabulary spells it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::SentencePiece(sp) => sp.pieces.get(id as usize).cloned(),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => Ok(t.encode(text, false).map_err(|e| anyhow!("cannot encode: {e}"))?.get_ids().to_vec()),
            Inner::SentencePiece(sp) => Ok(sp.encode(text)),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, true).map_err(|e| anyhow!("cannot decode: {e}")),
            Inner::SentencePiece(sp) => sp.decode(ids),
        }
    }
}

/// Llama 2's sentencepiece BPE: spaces become `▁` and one is prepended; symbols start as
/// characters; the adjacent pair whose concatenation has the highest score is merged until
/// none is in the vocabulary; a symbol outside the vocabulary falls back to its UTF-8 bytes
/// (`<0x00>`… at ids 3–258).
pub struct SentencePiece {
    pieces: Vec<String>,
    scores: Vec<f32>,
    lookup: std::collections::HashMap<String, u32>,
}

impl SentencePiece {
    fn new(pieces: Vec<String>, scores: Vec<f32>) -> Result<Self> {
        ensure!(pieces.len() > 259, "a sentencepiece vocabulary with byte fallback has more than 259 pieces");
        ensure!(pieces[3] == "<0x00>", "piece 3 is '{}', not the byte-fallback '<0x00>'", pieces[3]);
        let lookup = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
        Ok(SentencePiece { pieces, scores, lookup })
    }

    /// llama2.c's tokenizer.bin: u32 max piece length, then per piece f32 score, i32 length,
    /// bytes (sentencepiece's `▁` written as a space).
    pub fn from_llama2c(path: &Path) -> Result<Self> {
        let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bad = || anyhow!("{} is not a llama2.c tokenizer.bin (truncated or corrupt)", path.display());
        let (mut pieces, mut scores, mut at) = (Vec::new(), Vec::new(), 4usize);
        ensure!(b.len() >= 4, bad());
        while at < b.len() {
            let score = f32::from_le_bytes(b.get(at..at + 4).ok_or_else(bad)?.try_into()?);
            let len = i32::from_le_bytes(b.get(at + 4..at + 8).ok_or_else(bad)?.try_into()?);
            let len = usize::try_from(len).map_err(|_| bad())?;
            let bytes = b.get(at + 8..at + 8 + len).ok_or_else(bad)?;
            // llama2.c's export spells sentencepiece's `▁` as a plain space.
            pieces.push(String::from_utf8_lossy(bytes).replace(' ', "▁"));
            scores.push(score);
            at += 8 + len;
        }
        Self::new(pieces, scores)
    }

    /// sentencepiece's tokenizer.model (protobuf `ModelProto`: field 1 = pieces, each with
    /// field 1 = text, field 2 = score).
    pub fn from_model(path: &Path) -> Result<Self> {
        let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bad = || anyhow!("{} is not a sentencepiece model (corrupt protobuf)", path.display());
        let (mut pieces, mut scores) = (Vec::new(), Vec::new());
        for (field, value) in proto_fields(&b).ok_or_else(bad)? {
            if let (1, ProtoValue::Bytes(msg)) = (field, value) {
                let (mut piece, mut score) = (String::new(), 0.0f32);
                for (f, v) in proto_fields(msg).ok_or_else(bad)? {
                    match (f, v) {
                        (1, ProtoValue::Bytes(text)) => piece = String::from_utf8_lossy(text).into_owned(),
                        (2, ProtoValue::Fixed32(bits)) => score = f32::from_bits(bits),
                        _ => {}
                    }
                }
                pieces.push(piece);
                scores.push(score);
            }
        }
        Self::new(pieces, scores)
    }

    /// llama2.c's tokenizer.bin bytes (the inverse of `from_llama2c`).
    pub fn to_llama2c(&self) -> Vec<u8> {
        let pieces: Vec<String> = self.pieces.iter().map(|p| p.replace('▁', " ")).collect();
        let max = pieces.iter().map(String::len).max().unwrap_or(0) as u32;
        let mut out = max.to_le_bytes().to_vec();
        for (p, s) in pieces.iter().zip(&self.scores) {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&(p.len() as i32).to_le_bytes());
            out.extend_from_slice(p.as_bytes());
        }
        out
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        let normalized = format!("▁{}", text.replace(' ', "▁"));
        let mut symbols: Vec<String> = normalized.chars().map(String::from).collect();
        // score[i]: score of merging symbols i and i+1 (−∞ when not in the vocabulary); only
        // the two neighbours of a merge change, so each merge costs one scan of floats.
        let pair_score = |a: &str, b: &str| {
            let mut m = String::with_capacity(a.len() + b.len());
            m.push_str(a);
            m.push_str(b);
            self.lookup.get(m.as_str()).map_or(f32::NEG_INFINITY, |&id| self.scores[id as usize])
        };
        let mut score: Vec<f32> = symbols.windows(2).map(|w| pair_score(&w[0], &w[1])).collect();
        loop {
            // The leftmost best pair, as sentencepiece picks it.
            let best = score.iter().enumerate().fold(None, |best: Option<(usize, f32)>, (i, &s)| match best {
                Some((_, b)) if b >= s => best,
                _ if s > f32::NEG_INFINITY => Some((i, s)),
                _ => best,
            });
            let Some((i, _)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
            score.remove(i);
            if i < score.len() {
                score[i] = pair_score(&symbols[i], &symbols[i + 1]);
            }
            if i > 0 {
                score[i - 1] = pair_score(&symbols[i - 1], &symbols[i]);
            }
        }
        let mut ids = Vec::with_capacity(symbols.len());
        for s in &symbols {
            match self.lookup.get(s.as_str()) {
                Some(&id) => ids.push(id),
                None => ids.extend(s.bytes().map(|b| b as u32 + 3)),
            }
        }
        ids
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let piece = self.pieces.get(id as usize).ok_or_else(|| anyhow!("token id {id} outside the vocabulary"))?;
            if (3..259).contains(&id) {
                bytes.push((id - 3) as u8);
            } else if id > 2 {
                bytes.extend_from_slice(piece.replace('▁', " ").as_bytes());
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(text.strip_prefix(' ').map(str::to_string).unwrap_or(text))
    }
}

/// A protobuf field's value; integers other than fixed32 are skipped, not kept.
enum ProtoValue<'a> {
    Varint,
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The top-level fields of a protobuf message, or None if it is malformed.
fn proto_fields(mut b: &[u8]) -> Option<Vec<(u64, ProtoValue<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        let value = match tag & 7 {
            0 => {
                varint(&mut b)?;
                ProtoValue::Varint
            }
            1 => {
                b = b.get(8..)?;
                ProtoValue::Fixed64
            }
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let (v, rest) = b.split_at_checked(len)?;
                b = rest;
                ProtoValue::Bytes(v)
            }
            5 => {
                let (v, rest) = b.split_at_checked(4)?;
                b = rest;
                ProtoValue::Fixed32(u32::from_le_bytes(v.try_into().ok()?))
            }
            _ => return None,
        };
        out.push((tag >> 3, value));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_and_fingerprints() {
        let texts = crate::corpus::stories(1, 300);
        let tok = Tokenizer::train_bpe(&texts, 400).unwrap();
        assert_eq!(tok.vocab_size(), 400);
        assert_eq!(tok.doc_token, Some(0));
        for text in [texts[0].as_str(), "Héllo wörld, 123 — ünïcode ✓", "  leading spaces"] {
            let ids = tok.encode(text).unwrap();
            assert!(ids.iter().all(|&i| (i as usize) < 400));
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        // Merges compress the corpus it was trained on well below one token per byte.
        let ids = tok.encode(&texts[1]).unwrap();
        assert!(ids.len() * 2 < texts[1].len(), "{} tokens for {} bytes", ids.len(), texts[1].len());
        let again = Tokenizer::train_bpe(&texts, 400).unwrap();
        assert_eq!(again.fingerprint, tok.fingerprint, "training must be deterministic");
        assert_ne!(Tokenizer::train_bpe(&texts, 450).unwrap().fingerprint, tok.fingerprint);
    }

    /// (strings, Llama 2 ids, Qwen3 ids) from tools/make_tokenizer_goldens.py.
    fn golden() -> (Vec<String>, Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_golden.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ids = |k: &str| -> Vec<Vec<u32>> { serde_json::from_value(v[k].clone()).unwrap() };
        (serde_json::from_value(v["strings"].clone()).unwrap(), ids("llama2"), ids("qwen3"))
    }

    #[test]
    fn llama2_tokenizers_match_sentencepiece() {
        let Some(dir) = crate::shared_data::shared_data("data/tokenizers/llama2") else { return };
        let golden = golden();
        for file in ["tokenizer.model", "tokenizer.bin"] {
            let tok = Tokenizer::load(&dir.join(file)).unwrap();
            assert_eq!(tok.vocab_size(), 32000);
            assert_eq!(tok.doc_token, Some(1));
            for (text, ids) in golden.0.iter().zip(&golden.1) {
                assert_eq!(&tok.encode(text).unwrap(), ids, "{file}: encoding of {text:?}");
            }
            assert_eq!(tok.decode(&tok.encode("Hello world").unwrap()).unwrap(), "Hello world");
        }
        // Saved into a prepared directory and reloaded: the same tokenizer.
        let tmp_out = tempfile::Builder::new().prefix("anetrain-sp-").tempdir().unwrap();
        let out = tmp_out.path().to_path_buf();
        std::fs::create_dir_all(&out).unwrap();
        let tok = Tokenizer::load(&dir.join("tokenizer.model")).unwrap();
        tok.save_to_dir(&out).unwrap();
        assert_eq!(Tokenizer::load_from_dir(&out).unwrap().fingerprint, tok.fingerprint);
    }

    #[test]
    fn qwen3_tokenizer_loads_and_round_trips() {
        let Some(path) = crate::shared_data::shared_data("data/tokenizers/qwen3/tokenizer.json") else { return };
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!(tok.vocab_size(), 151_669);
        let golden = golden();
        for (text, ids) in golden.0.iter().zip(&golden.2) {
            assert_eq!(&tok.encode(text).unwrap(), ids, "qwen3 encoding of {text:?}");
            assert_eq!(&tok.decode(ids).unwrap(), text);
        }
        let text = "Hello, world! 你好 123";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
}
