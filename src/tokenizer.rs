//! Tokenizers: HF `tokenizer.json` files (Qwen3, anything HF) through the `tokenizers` crate
//! (no network features), and byte-level BPE trained here on a corpus. A tokenizer's
//! fingerprint — a hash of its canonical JSON — goes into every token file made with it, so
//! data from another tokenizer is refused.

use anyhow::{Context, Result, anyhow, ensure};
use std::path::Path;
use std::str::FromStr;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};

/// Separates documents in token files; the first id of a trained vocabulary.
pub const DOC_TOKEN: &str = "<|endoftext|>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `hf:` + 16 hex digits of FNV-1a over the canonical JSON.
    pub fingerprint: String,
    /// Id placed before each document (and the end-of-sequence for generation), if the
    /// vocabulary has one.
    pub doc_token: Option<u32>,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Tokenizer {
    fn wrap(inner: tokenizers::Tokenizer) -> Result<Self> {
        let json = inner.to_string(false).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
        let doc_token = [DOC_TOKEN, "<s>", "<|im_start|>"].iter().find_map(|t| inner.token_to_id(t));
        Ok(Tokenizer { fingerprint: format!("hf:{:016x}", fnv(json.as_bytes())), doc_token, inner })
    }

    /// Loads an HF `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        let inner = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        Self::wrap(inner)
    }

    /// Trains a byte-level BPE of `vocab_size` entries (256 byte symbols, the document token,
    /// and merges) on `texts`.
    pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<Self> {
        ensure!(vocab_size >= 258, "a byte-level BPE needs a vocabulary of at least 258, got {vocab_size}");
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(vec![AddedToken::from(DOC_TOKEN.to_string(), true)])
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

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
        crate::checkpoint::safetensors::write_atomically(path, |out| std::io::Write::write_all(out, json.as_bytes()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| anyhow!("cannot encode: {e}"))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("cannot decode: {e}"))
    }
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

    #[test]
    fn qwen3_tokenizer_loads_and_round_trips() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tokenizers/qwen3/tokenizer.json");
        if !path.is_file() {
            eprintln!("skipping: {} not present", path.display());
            return;
        }
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!(tok.vocab_size(), 151_669);
        let text = "Hello, world! 你好 123";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
}
