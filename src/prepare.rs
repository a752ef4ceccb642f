//! Corpus preparation: documents from text files, JSON lines or the built-in story generator;
//! a tokenizer loaded or trained; parallel tokenization with the document token before each
//! document; a train/validation split by document; headed token files.

use crate::data::TokenData;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Documents of one input: `builtin:stories:N` (N generated stories); a `.jsonl` file (the
/// `text` field of each line); a `.txt` file (paragraphs separated by blank lines, or pieces
/// separated by `<|endoftext|>` when it has that marker); a directory (its .txt and .jsonl
/// files, sorted by name).
pub fn read_documents(input: &str, seed: u64) -> Result<Vec<String>> {
    if let Some(n) = input.strip_prefix("builtin:stories:") {
        let n: usize = n.parse().with_context(|| format!("'{input}': expected builtin:stories:<count>"))?;
        return Ok(crate::corpus::stories(seed, n));
    }
    let path = Path::new(input);
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt" || e == "jsonl"))
            .collect();
        files.sort();
        let mut docs = Vec::new();
        for f in files {
            docs.extend(read_documents(f.to_str().context("non-UTF-8 path")?, seed)?);
        }
        return Ok(docs);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (UTF-8 text expected)", path.display()))?;
    let docs: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| -> Result<String> {
                let v: serde_json::Value =
                    serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
                v["text"]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{}:{}: no \"text\" field", path.display(), i + 1))
            })
            .collect::<Result<_>>()?
    } else if text.contains(crate::tokenizer::DOC_TOKEN) {
        text.split(crate::tokenizer::DOC_TOKEN).map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect()
    } else {
        text.split("\n\n").map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect()
    };
    Ok(docs)
}

/// The tokenizer named by `spec`: `bpe:N` trains a byte-level BPE of N entries on `docs`
/// (at most 20 MB of them); anything else is a tokenizer.json path.
pub fn tokenizer_for(spec: &str, docs: &[String]) -> Result<Tokenizer> {
    match spec.strip_prefix("bpe:") {
        Some(n) => {
            let n: usize = n.parse().with_context(|| format!("'{spec}': expected bpe:<vocabulary size>"))?;
            let mut budget = 20usize << 20;
            let sample: Vec<String> = docs
                .iter()
                .take_while(|d| {
                    let fits = budget > 0;
                    budget = budget.saturating_sub(d.len());
                    fits
                })
                .cloned()
                .collect();
            Tokenizer::train_bpe(&sample, n)
        }
        None => Tokenizer::load(Path::new(spec)),
    }
}

/// Token ids of all documents, each preceded by the document token (when the vocabulary has
/// one), tokenized in parallel; order is the documents' order.
pub fn tokenize(tok: &Tokenizer, docs: &[String]) -> Result<Vec<u32>> {
    tokenize_with_progress(tok, docs, |_, _| {})
}

/// `tokenize`, calling `progress(done, total)` after each block of documents.
pub fn tokenize_with_progress(
    tok: &Tokenizer,
    docs: &[String],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for (i, block) in docs.chunks(2048).enumerate() {
        let parts: Vec<Vec<u32>> = block.par_iter().map(|d| tok.encode(d)).collect::<Result<_>>()?;
        for p in parts {
            out.extend(tok.doc_token);
            out.extend(p);
        }
        progress((i * 2048 + block.len()).min(docs.len()), docs.len());
    }
    Ok(out)
}

pub struct PrepareSummary {
    pub documents: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub bytes: usize,
    pub seconds: f64,
}

/// Writes `<out>/train.tok`, `<out>/val.tok` and the tokenizer (tokenizer.json, or
/// tokenizer.bin for sentencepiece vocabularies); the last
/// `val_fraction` of the documents (at least one) are held out.
pub fn prepare(docs: &[String], tok: &Tokenizer, out: &Path, val_fraction: f64) -> Result<PrepareSummary> {
    ensure!(docs.len() >= 2, "need at least 2 documents (one for validation), got {}", docs.len());
    ensure!((0.0..1.0).contains(&val_fraction), "--val-fraction must be in [0, 1)");
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let start = std::time::Instant::now();
    let n_val = ((docs.len() as f64 * val_fraction).ceil() as usize).clamp(1, docs.len() - 1);
    let (train_docs, val_docs) = docs.split_at(docs.len() - n_val);
    let bar = |done: usize, total: usize| {
        let filled = done * 30 / total.max(1);
        eprint!("\rtokenizing [{}{}] {done}/{total} documents", "#".repeat(filled), "-".repeat(30 - filled));
    };
    let train = tokenize_with_progress(tok, train_docs, bar)?;
    eprintln!();
    let val = tokenize(tok, val_docs)?;
    let seconds = start.elapsed().as_secs_f64();
    if train.is_empty() || val.is_empty() {
        bail!("the documents tokenized to nothing");
    }
    tok.save_to_dir(out)?;
    TokenData::write(&out.join("train.tok"), &train, tok.vocab_size(), &tok.fingerprint)?;
    TokenData::write(&out.join("val.tok"), &val, tok.vocab_size(), &tok.fingerprint)?;
    Ok(PrepareSummary {
        documents: docs.len(),
        train_tokens: train.len(),
        val_tokens: val.len(),
        bytes: docs.iter().map(String::len).sum(),
        seconds,
    })
}

/// What `train --data` resolved to.
pub struct TrainingData {
    pub train: TokenData,
    pub val: Option<TokenData>,
    /// For decoding samples; present for built-in stories and prepared directories.
    pub tokenizer: Option<Tokenizer>,
}

/// `--data`: `stories` (the built-in corpus, tokenized with a BPE of the model's vocabulary
/// trained on it), `synthetic` (a Markov chain over ids), a directory made by `prepare`
/// (train.tok, val.tok, tokenizer), a raw corpus (.txt, .jsonl, or a directory of them,
/// tokenized with `tokenizer`), or a token file (with `--val-data` for validation).
pub fn training_data(
    spec: &str,
    vocab: usize,
    seed: u64,
    min_tokens: usize,
    val_path: Option<&Path>,
    tokenizer: Option<&str>,
) -> Result<TrainingData> {
    match spec {
        "stories" => {
            let docs = crate::corpus::stories(seed, 10_000);
            let tok = Tokenizer::train_bpe(&docs[..2_000], vocab)?;
            let n_val = docs.len() / 50;
            let train = tokenize(&tok, &docs[..docs.len() - n_val])?;
            let val = tokenize(&tok, &docs[docs.len() - n_val..])?;
            Ok(TrainingData {
                train: TokenData::from_vec(train, vocab, "built-in stories")?,
                val: Some(TokenData::from_vec(val, vocab, "built-in stories (held out)")?),
                tokenizer: Some(tok),
            })
        }
        "synthetic" => {
            // One walk of the chain: the tail is held out for validation.
            let n = 2_000_000usize.max(min_tokens);
            let n_val = 65_536;
            let mut tokens = crate::data::synthetic_tokens(vocab, n + n_val, seed);
            let val = tokens.split_off(n);
            Ok(TrainingData {
                train: TokenData::from_vec(tokens, vocab, "synthetic")?,
                val: Some(TokenData::from_vec(val, vocab, "synthetic (held out)")?),
                tokenizer: None,
            })
        }
        path if Path::new(path).join("train.tok").is_file() => {
            let dir = Path::new(path);
            let tok = Tokenizer::load_from_dir(dir)
                .with_context(|| format!("{path} is not a directory made by `anetrain prepare`"))?;
            let train = TokenData::open(&dir.join("train.tok"), vocab, Some(&tok.fingerprint))?;
            let val = TokenData::open(&dir.join("val.tok"), vocab, Some(&tok.fingerprint))?;
            Ok(TrainingData { train, val: Some(val), tokenizer: Some(tok) })
        }
        path if path.ends_with(".txt") || path.ends_with(".jsonl") || Path::new(path).is_dir() => {
            // A raw corpus: prepared in memory with `tokenizer` (default: a BPE of the model's
            // vocabulary trained on it); the last 1% of documents are held out.
            let docs = read_documents(path, seed)?;
            ensure!(docs.len() >= 2, "{path}: need at least 2 documents, found {}", docs.len());
            let tok = tokenizer_for(tokenizer.unwrap_or(&format!("bpe:{vocab}")), &docs)?;
            ensure!(
                tok.vocab_size() <= vocab,
                "the tokenizer has {} entries, the model's vocabulary {vocab}",
                tok.vocab_size()
            );
            let n_val = docs.len().div_ceil(100);
            let train = tokenize(&tok, &docs[..docs.len() - n_val])?;
            let val = tokenize(&tok, &docs[docs.len() - n_val..])?;
            Ok(TrainingData {
                train: TokenData::from_vec(train, vocab, path)?,
                val: Some(TokenData::from_vec(val, vocab, &format!("{path} (held out)"))?),
                tokenizer: Some(tok),
            })
        }
        path => {
            let train = TokenData::open(Path::new(path), vocab, None)?;
            let val = match val_path {
                Some(p) => Some(TokenData::open(p, vocab, train.tokenizer.as_deref())?),
                None => None,
            };
            Ok(TrainingData { train, val, tokenizer: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_writes_matching_token_files() {
        let dir = std::env::temp_dir().join(format!("anetrain-prepare-{}", std::process::id()));
        let docs = read_documents("builtin:stories:200", 3).unwrap();
        let tok = tokenizer_for("bpe:300", &docs).unwrap();
        let summary = prepare(&docs, &tok, &dir, 0.1).unwrap();
        assert_eq!(summary.documents, 200);
        let train = TokenData::open(&dir.join("train.tok"), 300, Some(&tok.fingerprint)).unwrap();
        assert_eq!(train.len(), summary.train_tokens);
        assert_eq!(train.get(0), tok.doc_token.unwrap());
        let reloaded = Tokenizer::load_from_dir(&dir).unwrap();
        assert_eq!(reloaded.fingerprint, tok.fingerprint);
        let first: Vec<u32> = (1..40).map(|i| train.get(i)).collect();
        assert!(docs[0].starts_with(&reloaded.decode(&first).unwrap()));
        // JSON lines and blank-line-separated text.
        std::fs::write(dir.join("a.jsonl"), "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n").unwrap();
        std::fs::write(dir.join("b.txt"), "three\n\nfour\n").unwrap();
        assert_eq!(read_documents(dir.to_str().unwrap(), 0).unwrap(), ["one", "two", "three", "four"]);
        std::fs::write(dir.join("c.jsonl"), "{\"txt\": 1}\n").unwrap();
        assert!(format!("{:#}", read_documents(dir.to_str().unwrap(), 0).unwrap_err()).contains("c.jsonl:1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
