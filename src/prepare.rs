//! Corpus preparation: documents from text files, JSON lines or the built-in story generator;
//! a tokenizer loaded or trained; parallel tokenization with the document token before each
//! document; a train/validation split by document; headed token files.

use crate::chat::data::{Example, encode_examples, is_chat_jsonl, read_examples};
use crate::chat::template::ChatTemplate;
use crate::data::TokenData;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Bytes a generated story takes in memory, with its `String` (the average is ~560; tested).
pub const STORY_BYTES: u64 = 1024;

/// Memory the BPE trainer and the tokenizer take per vocabulary entry, beyond the text: the
/// vocabulary and merge maps (string, id, hash-table slot) and the pair statistics. An
/// allocation of 283 GB for 4·10⁹ entries was observed, ~71 bytes per entry.
const BPE_BYTES_PER_ENTRY: usize = 128;

/// Extensions of the text files a directory input contributes.
const TEXT_EXTENSIONS: [&str; 3] = ["txt", "jsonl", "md"];

/// Documents of one input: `builtin:stories:N` (N generated stories); a `.jsonl` file (the
/// `text` field of each line); a `.txt` or `.md` file (paragraphs separated by blank lines, or
/// pieces separated by `<|endoftext|>` when it has that marker); a directory (its .txt, .md
/// and .jsonl files at any depth, sorted by path; every other entry is pushed to `skipped`).
/// Devices, pipes and sockets are refused: they have no size to check and may never end.
pub fn read_documents(input: &str, seed: u64, skipped: &mut Vec<PathBuf>) -> Result<Vec<String>> {
    if let Some(n) = input.strip_prefix("builtin:stories:") {
        let n: usize = n.parse().with_context(|| format!("'{input}': expected builtin:stories:<count>"))?;
        crate::memory::ensure_fits(
            &format!("generating {n} stories"),
            crate::memory::bytes(STORY_BYTES as usize, &[n]),
            "ask for fewer stories",
        )?;
        return Ok(crate::corpus::stories(seed, n));
    }
    let path = Path::new(input);
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        collect_text_files(path, &mut files, skipped)?;
        files.sort();
        let mut docs = Vec::new();
        for f in files {
            docs.extend(read_documents(f.to_str().context("non-UTF-8 path")?, seed, skipped)?);
        }
        return Ok(docs);
    }
    ensure!(
        meta.is_file(),
        "{} is not a regular file (a device, pipe or socket); give text files or directories",
        path.display()
    );
    // The text, then the documents cut from it.
    crate::memory::ensure_fits(
        &format!("reading {}", path.display()),
        meta.len().saturating_mul(2),
        "split the corpus into smaller inputs",
    )?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (UTF-8 text expected)", path.display()))?;
    let docs: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| -> Result<String> {
                let _: serde::de::IgnoredAny =
                    serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
                let line: TextLine = serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: no \"text\" field with a string", path.display(), i + 1))?;
                Ok(line.text)
            })
            .collect::<Result<_>>()?
    } else if text.contains(crate::tokenizer::DOC_TOKEN) {
        text.split(crate::tokenizer::DOC_TOKEN).map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect()
    } else {
        text.split("\n\n").map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect()
    };
    Ok(docs)
}

/// The text files under `dir` at any depth; everything else (other extensions, hidden
/// entries, devices, unreadable entries) goes to `skipped`.
fn collect_text_files(dir: &Path, files: &mut Vec<PathBuf>, skipped: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry.with_context(|| format!("cannot list {}", dir.display()))?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() && !hidden => collect_text_files(&path, files, skipped)?,
            Ok(m)
                if m.is_file()
                    && !hidden
                    && path.extension().is_some_and(|e| TEXT_EXTENSIONS.iter().any(|t| e == *t)) =>
            {
                files.push(path)
            }
            _ => skipped.push(path),
        }
    }
    Ok(())
}

/// `skipped 3 entries (not .txt, .md or .jsonl): a.png, b.pdf, c` (at most 5 named), for
/// printing after `read_documents`; `None` when nothing was skipped.
pub fn skipped_note(skipped: &[PathBuf]) -> Option<String> {
    if skipped.is_empty() {
        return None;
    }
    let mut names: Vec<String> = skipped.iter().take(5).map(|p| p.display().to_string()).collect();
    if skipped.len() > 5 {
        names.push(format!("and {} more", skipped.len() - 5));
    }
    Some(format!(
        "skipped {} entr{} (not .txt, .md or .jsonl files): {}",
        skipped.len(),
        if skipped.len() == 1 { "y" } else { "ies" },
        names.join(", ")
    ))
}

/// One line of a `.jsonl` corpus (other fields are ignored).
#[derive(serde::Deserialize)]
struct TextLine {
    text: String,
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
            // The trainer sizes its tables by the vocabulary asked for.
            crate::memory::ensure_fits(
                &format!("training a BPE of {n} entries"),
                crate::memory::bytes(BPE_BYTES_PER_ENTRY, &[n]),
                "ask for a smaller vocabulary",
            )?;
            // Every merge needs a pair seen at least twice and removes two or more symbols, so
            // a sample of S bytes yields at most S/2 merges beside the 256 bytes and the
            // document token: asking the trainer for more changes nothing but its tables.
            let sample_bytes: usize = sample.iter().map(String::len).sum();
            let cap = (257 + sample_bytes / 2).max(258);
            Tokenizer::train_bpe(&sample, if n > cap { cap } else { n })
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

/// Everything `prepare` writes into its output directory.
pub const OUTPUTS: [&str; 5] = ["train.tok", "val.tok", "tokenizer.json", "tokenizer.bin", "tokenizer_config.json"];

/// Writes `<out>/train.tok`, `<out>/val.tok` and the tokenizer (tokenizer.json, or
/// tokenizer.bin for sentencepiece vocabularies); the last `val_fraction` of the documents (at
/// least one) are held out. The outputs are written into a temporary sibling directory that
/// then replaces `out` as a whole, so `out` never mixes the files of two runs (a stale
/// tokenizer beside new tokens); `out` must hold nothing but an earlier prepare's outputs.
pub fn prepare(docs: &[String], tok: &Tokenizer, out: &Path, val_fraction: f64) -> Result<PrepareSummary> {
    ensure!(docs.len() >= 2, "need at least 2 documents (one for validation), got {}", docs.len());
    ensure!(
        val_fraction > 0.0 && val_fraction < 1.0,
        "--val-fraction must be in (0, 1): a share of the documents is held out for validation"
    );
    replace_outputs(out, |tmp| write_outputs(docs, tok, tmp, val_fraction))
}

/// Writes prepare's outputs with `write` into a temporary sibling of `out`, then replaces
/// `out` with it; refuses an `out` holding files prepare did not write.
fn replace_outputs(out: &Path, write: impl FnOnce(&Path) -> Result<PrepareSummary>) -> Result<PrepareSummary> {
    if out.exists() {
        ensure!(out.is_dir(), "--out {} is not a directory", out.display());
        let mut others: Vec<String> = std::fs::read_dir(out)
            .with_context(|| format!("cannot list {}", out.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !OUTPUTS.contains(&n.as_str()))
            .collect();
        others.sort();
        if !others.is_empty() {
            bail!(
                "--out {} holds files prepare did not write ({}); prepare replaces the whole directory, so give it a new \
                 or empty one",
                out.display(),
                others.join(", ")
            );
        }
    }
    let name = out.file_name().with_context(|| format!("--out {} needs a directory name", out.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".prepare-{}", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = write(&tmp).and_then(|summary| {
        crate::fsio::replace_dir(&tmp, out)?;
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_outputs(docs: &[String], tok: &Tokenizer, out: &Path, val_fraction: f64) -> Result<PrepareSummary> {
    let start = std::time::Instant::now();
    let n_val = ((docs.len() as f64 * val_fraction).ceil() as usize).clamp(1, docs.len() - 1);
    let (train_docs, val_docs) = docs.split_at(docs.len() - n_val);
    // On stderr, and only when it is a terminal.
    let bar = indicatif::ProgressBar::new(train_docs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "tokenizing [{bar:30}] {pos}/{len} documents, {per_sec}, {elapsed} elapsed, ETA {eta}",
        )?
        .progress_chars("#>-"),
    );
    let train = tokenize_with_progress(tok, train_docs, |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
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

/// Chat examples to `<out>/train.tok` and `<out>/val.tok` with loss masks (1 on assistant
/// tokens), the tokenizer, and its chat template in `tokenizer_config.json`; the last
/// `val_fraction` of the examples (at least one) are held out.
pub fn prepare_chat(
    examples: &[Example],
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    out: &Path,
    val_fraction: f64,
) -> Result<PrepareSummary> {
    ensure!(examples.len() >= 2, "need at least 2 examples (one for validation), got {}", examples.len());
    ensure!(
        val_fraction > 0.0 && val_fraction < 1.0,
        "--val-fraction must be in (0, 1): a share of the examples is held out for validation"
    );
    let start = std::time::Instant::now();
    let n_val = ((examples.len() as f64 * val_fraction).ceil() as usize).clamp(1, examples.len() - 1);
    let (train_ex, val_ex) = examples.split_at(examples.len() - n_val);
    let eos = chat_eos(tok, template);
    let (train, train_mask) = encode_examples(tok, template, train_ex, eos, "training examples")?;
    let (val, val_mask) = encode_examples(tok, template, val_ex, eos, "held-out examples")?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes = |e: &Example| match e {
        Example::Conversation(m) => m.iter().map(|m| m.content.len()).sum(),
        Example::Completion { prompt, completion } => prompt.len() + completion.len(),
    };
    let summary = PrepareSummary {
        documents: examples.len(),
        train_tokens: train.len(),
        val_tokens: val.len(),
        bytes: examples.iter().map(bytes).sum(),
        seconds,
    };
    replace_outputs(out, |tmp| {
        tok.save_to_dir(tmp)?;
        if let Some(t) = template {
            t.save_to_dir(tmp)?;
        }
        let (v, fp) = (tok.vocab_size(), &tok.fingerprint);
        TokenData::write_masked(&tmp.join("train.tok"), &train, Some(&train_mask), v, fp)?;
        TokenData::write_masked(&tmp.join("val.tok"), &val, Some(&val_mask), v, fp)?;
        Ok(summary)
    })
}

/// The end-of-sequence id learned after a plain prompt/completion pair: the template's
/// `eos_token`, else the document token.
pub fn chat_eos(tok: &Tokenizer, template: Option<&ChatTemplate>) -> Option<u32> {
    template.and_then(|t| tok.token_to_id(&t.eos_token)).or(tok.doc_token)
}

/// A chat `.jsonl` tokenized in memory with the loss mask; the last 1% of examples (at least
/// one) are held out for validation.
pub fn chat_training_data(
    path: &Path,
    tok: Tokenizer,
    template: Option<&ChatTemplate>,
    vocab: usize,
) -> Result<TrainingData> {
    let examples = read_examples(path)?;
    ensure!(examples.len() >= 2, "{}: need at least 2 examples, found {}", path.display(), examples.len());
    ensure!(
        tok.vocab_size() <= vocab,
        "the tokenizer has {} entries, the model's vocabulary {vocab}",
        tok.vocab_size()
    );
    let n_val = examples.len().div_ceil(100);
    let (train_ex, val_ex) = examples.split_at(examples.len() - n_val);
    let eos = chat_eos(&tok, template);
    let source = path.display().to_string();
    let (train, train_mask) = encode_examples(&tok, template, train_ex, eos, &source)?;
    let held_out = format!("{source} (held out)");
    let (val, val_mask) = encode_examples(&tok, template, val_ex, eos, &held_out)?;
    Ok(TrainingData {
        train: TokenData::from_vec_masked(train, Some(train_mask), vocab, &source)?.made_with(&tok),
        val: Some(TokenData::from_vec_masked(val, Some(val_mask), vocab, &held_out)?.made_with(&tok)),
        tokenizer: Some(tok),
        chat_template: template.map(|t| t.source.clone()),
    })
}

/// What `train --data` resolved to.
pub struct TrainingData {
    pub train: TokenData,
    pub val: Option<TokenData>,
    /// For decoding samples; present for built-in stories and prepared directories.
    pub tokenizer: Option<Tokenizer>,
    /// The chat template chat examples were rendered with (Jinja source).
    pub chat_template: Option<String>,
}

/// Whether `--data` names a token file (the one source that takes `--val-data`).
fn is_token_file(spec: &str) -> bool {
    let p = Path::new(spec);
    !["stories", "synthetic"].contains(&spec)
        && !p.is_dir()
        && !spec.ends_with(".txt")
        && !spec.ends_with(".jsonl")
        && !spec.ends_with(".md")
}

/// `--data`: `stories` (the built-in corpus, tokenized with a BPE of the model's vocabulary
/// trained on it), `synthetic` (a Markov chain over ids), a directory made by `prepare`
/// (train.tok, val.tok, tokenizer), a raw corpus (.txt, .jsonl, or a directory of them,
/// tokenized with `tokenizer`), or a token file (with `--val-data` for validation).
/// `model_tokenizer` is the tokenizer a pretrained model (`train --init`) came with: raw text,
/// the built-in stories and chat examples are tokenized with it unless `tokenizer` names
/// another; chat examples are rendered with `model_template`, the model's chat template.
/// tokenized with `tokenizer`), a chat `.jsonl` (`messages` or `prompt`/`completion` lines,
/// tokenized with `tokenizer` and the chat template in the `tokenizer_config.json` beside it,
/// loss on assistant tokens only), or a token file (with `--val-data` for validation).
#[allow(clippy::too_many_arguments)]
pub fn training_data(
    spec: &str,
    vocab: usize,
    seed: u64,
    min_tokens: usize,
    val_path: Option<&Path>,
    tokenizer: Option<&str>,
    model_tokenizer: Option<Tokenizer>,
    model_template: Option<ChatTemplate>,
) -> Result<TrainingData> {
    ensure!(
        val_path.is_none() || is_token_file(spec),
        "--val-data is for a token-file --data; '{spec}' holds out its own validation data"
    );
    match spec {
        "stories" => {
            let docs = crate::corpus::stories(seed, 10_000);
            let tok = match model_tokenizer {
                Some(t) => t,
                None => Tokenizer::train_bpe(&docs[..2_000], vocab)?,
            };
            let n_val = docs.len() / 50;
            let train = tokenize(&tok, &docs[..docs.len() - n_val])?;
            let val = tokenize(&tok, &docs[docs.len() - n_val..])?;
            Ok(TrainingData {
                train: TokenData::from_vec(train, vocab, "built-in stories")?.made_with(&tok),
                val: Some(TokenData::from_vec(val, vocab, "built-in stories (held out)")?.made_with(&tok)),
                tokenizer: Some(tok),
                chat_template: None,
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
                chat_template: None,
            })
        }
        path if Path::new(path).join("train.tok").is_file() => {
            let dir = Path::new(path);
            let tok = Tokenizer::load_from_dir(dir)
                .with_context(|| format!("{path} is not a directory made by `anetrain prepare`"))?;
            let train = TokenData::open(&dir.join("train.tok"), vocab, Some(&tok.fingerprint))?;
            let val = TokenData::open(&dir.join("val.tok"), vocab, Some(&tok.fingerprint))?;
            // A directory made by `prepare --chat` keeps its template in tokenizer_config.json.
            let chat_template = crate::chat::template::ChatTemplate::load_from_dir(dir)?.map(|t| t.source);
            Ok(TrainingData { train, val: Some(val), tokenizer: Some(tok), chat_template })
        }
        path if is_chat_jsonl(Path::new(path))? && tokenizer.is_none() && model_tokenizer.is_some() => {
            // A pretrained model's own tokenizer and chat template (`train --init`).
            let tok = model_tokenizer.expect("checked in the guard");
            if model_template.is_none() {
                eprintln!("note: the model has no chat template; prompt/completion lines are joined as plain text");
            }
            chat_training_data(Path::new(path), tok, model_template.as_ref(), vocab)
        }
        path if is_chat_jsonl(Path::new(path))? => {
            let spec = tokenizer.with_context(|| {
                format!(
                    "{path} holds chat examples: pass the model's tokenizer with --tokenizer (a tokenizer.json \
                     with the tokenizer_config.json that holds its chat template beside it)"
                )
            })?;
            ensure!(!spec.starts_with("bpe:"), "chat examples need the model's own tokenizer, not {spec}");
            let tok = tokenizer_for(spec, &[])?;
            let template = crate::chat::data::template_for(Path::new(spec), None, &tok)?;
            chat_training_data(Path::new(path), tok, template.as_ref(), vocab)
        }
        path if path.ends_with(".txt") || path.ends_with(".jsonl") || Path::new(path).is_dir() => {
            // A raw corpus: prepared in memory with `tokenizer` (default: a BPE of the model's
            // vocabulary trained on it); the last 1% of documents are held out.
            let mut skipped = Vec::new();
            let docs = read_documents(path, seed, &mut skipped)?;
            if let Some(note) = skipped_note(&skipped) {
                eprintln!("note: {path}: {note}");
            }
            ensure!(docs.len() >= 2, "{path}: need at least 2 documents, found {}", docs.len());
            let tok = match (tokenizer, model_tokenizer) {
                (Some(spec), _) => tokenizer_for(spec, &docs)?,
                (None, Some(t)) => t,
                (None, None) => tokenizer_for(&format!("bpe:{vocab}"), &docs)?,
            };
            ensure!(
                tok.vocab_size() <= vocab,
                "the tokenizer has {} entries, the model's vocabulary {vocab}",
                tok.vocab_size()
            );
            let n_val = docs.len().div_ceil(100);
            let train = tokenize(&tok, &docs[..docs.len() - n_val])?;
            let val = tokenize(&tok, &docs[docs.len() - n_val..])?;
            Ok(TrainingData {
                train: TokenData::from_vec(train, vocab, path)?.made_with(&tok),
                val: Some(TokenData::from_vec(val, vocab, &format!("{path} (held out)"))?.made_with(&tok)),
                tokenizer: Some(tok),
                chat_template: None,
            })
        }
        path => {
            let train = TokenData::open(Path::new(path), vocab, None)?;
            let val = match val_path {
                Some(p) => Some(TokenData::open(p, vocab, train.tokenizer.as_deref())?),
                None => None,
            };
            Ok(TrainingData { train, val, tokenizer: None, chat_template: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_writes_matching_token_files() {
        let tmp_dir = tempfile::Builder::new().prefix("anetrain-prepare-").tempdir().unwrap();
        let dir = tmp_dir.path().to_path_buf();
        let docs = read_documents("builtin:stories:200", 3, &mut Vec::new()).unwrap();
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
        let mut skipped = Vec::new();
        let docs = read_documents(dir.to_str().unwrap(), 0, &mut skipped).unwrap();
        assert_eq!(docs, ["one", "two", "three", "four"]);
        assert!(skipped.iter().any(|p| p.ends_with("train.tok")), "{skipped:?}");
        std::fs::write(dir.join("c.jsonl"), "{\"txt\": 1}\n").unwrap();
        let err = read_documents(dir.to_str().unwrap(), 0, &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("c.jsonl:1"));
    }

    #[test]
    fn directories_are_read_at_any_depth_and_skips_are_named() {
        let tmp_dir = tempfile::Builder::new().prefix("anetrain-prepare-tree-").tempdir().unwrap();
        let dir = tmp_dir.path().to_path_buf();
        std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        std::fs::write(dir.join("a.txt"), "one").unwrap();
        std::fs::write(dir.join("sub/b.md"), "two\n\nthree").unwrap();
        std::fs::write(dir.join("sub/deeper/c.jsonl"), "{\"text\": \"four\"}\n").unwrap();
        std::fs::write(dir.join("sub/d.png"), [0u8, 159, 146, 150]).unwrap();
        std::fs::write(dir.join(".hidden.txt"), "never").unwrap();
        let mut skipped = Vec::new();
        let docs = read_documents(dir.to_str().unwrap(), 0, &mut skipped).unwrap();
        assert_eq!(docs, ["one", "two", "three", "four"]);
        skipped.sort();
        assert_eq!(skipped, [dir.join(".hidden.txt"), dir.join("sub/d.png")]);
        let note = skipped_note(&skipped).unwrap();
        assert!(note.starts_with("skipped 2 entries (not .txt, .md or .jsonl files): ") && note.contains("d.png"));
        assert_eq!(skipped_note(&[]), None);
    }

    #[test]
    fn refuses_devices_and_absurd_story_counts() {
        let err = read_documents("/dev/zero", 0, &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("/dev/zero is not a regular file"), "{err}");
        let err = read_documents("builtin:stories:99999999999999", 0, &mut Vec::new()).unwrap_err().to_string();
        assert!(err.starts_with("generating 99999999999999 stories needs about 102.4 PB"), "{err}");
        // The estimate per story holds with room to spare.
        let stories = crate::corpus::stories(1, 1000);
        let avg = stories.iter().map(|s| s.capacity() + 24).sum::<usize>() / stories.len();
        assert!((avg as u64) < STORY_BYTES, "stories average {avg} bytes");
    }

    /// A llama2.c tokenizer.bin of the three specials, 256 byte pieces and "▁the".
    fn byte_sentencepiece(path: &Path) -> Tokenizer {
        let mut bytes = 16i32.to_le_bytes().to_vec();
        let pieces = ["<unk>".to_string(), "<s>".into(), "</s>".into()]
            .into_iter()
            .chain((0..256).map(|b| format!("<0x{b:02X}>")))
            .chain([" the".to_string()]);
        for p in pieces {
            bytes.extend_from_slice(&0f32.to_le_bytes());
            bytes.extend_from_slice(&(p.len() as i32).to_le_bytes());
            bytes.extend_from_slice(p.as_bytes());
        }
        std::fs::write(path, bytes).unwrap();
        Tokenizer::load(path).unwrap()
    }

    #[test]
    fn prepare_replaces_every_output_of_an_earlier_prepare() {
        let base = std::env::temp_dir().join(format!("anetrain-reprepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let out = base.join("data");
        let docs = read_documents("builtin:stories:60", 3, &mut Vec::new()).unwrap();
        let bpe = tokenizer_for("bpe:300", &docs).unwrap();
        prepare(&docs, &bpe, &out, 0.1).unwrap();
        assert!(out.join("tokenizer.json").is_file());
        // Now a sentencepiece vocabulary (written as tokenizer.bin) into the same directory:
        // the BPE's tokenizer.json must not survive beside the new tokens.
        let sp = byte_sentencepiece(&base.join("sp.bin"));
        prepare(&docs, &sp, &out, 0.1).unwrap();
        assert!(!out.join("tokenizer.json").exists(), "stale tokenizer.json left beside the new tokens");
        assert_eq!(Tokenizer::load_from_dir(&out).unwrap().fingerprint, sp.fingerprint);
        let mut names: Vec<_> = std::fs::read_dir(&base).unwrap().flatten().map(|e| e.file_name()).collect();
        names.sort();
        assert_eq!(names, ["data", "sp.bin"], "no temporary directory left");
        // A tokenizer file that does not match train.tok is refused, not used.
        bpe.save_to_dir(&out).unwrap();
        std::fs::remove_file(out.join("tokenizer.bin")).unwrap();
        let err = format!("{:#}", Tokenizer::load_from_dir(&out).err().unwrap());
        assert!(err.contains("train.tok was made with tokenizer sp:"), "{err}");
        // A directory holding anything else is not replaced.
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let err = format!("{:#}", prepare(&docs, &bpe, &out, 0.1).err().unwrap());
        assert!(err.contains("notes.txt") && out.join("notes.txt").is_file(), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn chat_examples_are_masked_to_assistant_tokens() {
        use crate::chat::template::{CHATML, ChatTemplate};
        let dir = std::env::temp_dir().join(format!("anetrain-prepare-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok =
            Tokenizer::train_bpe_with_specials(&crate::corpus::stories(1, 200), 400, &["<|im_start|>", "<|im_end|>"])
                .unwrap();
        let tmpl = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        tok.save_to_dir(&dir).unwrap();
        tmpl.save_to_dir(&dir).unwrap();
        let jsonl = dir.join("chat.jsonl");
        let lines = [
            r#"{"messages": [{"role": "user", "content": "Who is Lily?"}, {"role": "assistant", "content": "A little girl."}]}"#,
            r#"{"prompt": "Say hi", "completion": "hi"}"#,
            "",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}, {"role": "user", "content": "Ok"}, {"role": "assistant", "content": "Good."}], "id": 7}"#,
        ];
        std::fs::write(&jsonl, lines.join("\n")).unwrap();
        let examples = read_examples(&jsonl).unwrap();
        assert_eq!(examples.len(), 3);
        let out = dir.join("prepared");
        let s = prepare_chat(&examples, &tok, Some(&tmpl), &out, 0.3).unwrap();
        assert_eq!(s.documents, 3);
        let train = TokenData::open(&out.join("train.tok"), 400, Some(&tok.fingerprint)).unwrap();
        assert!(train.is_masked());
        let learned: Vec<u32> = (0..train.len()).filter(|&i| train.is_target(i)).map(|i| train.get(i)).collect();
        let context: Vec<u32> = (0..train.len()).filter(|&i| !train.is_target(i)).map(|i| train.get(i)).collect();
        assert_eq!(tok.decode(&learned).unwrap(), "A little girl.\nhi\n");
        assert!(tok.decode(&context).unwrap().contains("Who is Lily?"));
        // Each reply's closing <|im_end|> is learned, so the model learns to stop.
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(learned.iter().filter(|&&t| t == im_end).count(), 2);
        let val = TokenData::open(&out.join("val.tok"), 400, None).unwrap();
        let learned: Vec<u32> = (0..val.len()).filter(|&i| val.is_target(i)).map(|i| val.get(i)).collect();
        assert_eq!(tok.decode(&learned).unwrap(), "Because.\nGood.\n");
        // The same file as `train --data`, with the tokenizer and template beside it.
        let tok_path = dir.join("tokenizer.json");
        let data = training_data(jsonl.to_str().unwrap(), 400, 0, 0, None, tok_path.to_str(), None, None).unwrap();
        assert!(data.train.is_masked() && data.val.unwrap().is_masked());
        let err = training_data(jsonl.to_str().unwrap(), 400, 0, 0, None, None, None, None).err().unwrap();
        assert!(format!("{err:#}").contains("--tokenizer"), "{err:#}");
        // Bad lines are named by number.
        for (bad, want) in [
            ("{\"messages\": [{\"role\": \"user\"}]}", "chat.jsonl:4: not a chat example"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", "chat.jsonl:4: no assistant message"),
            ("{\"prompt\": \"x\"}", "chat.jsonl:4: \"prompt\" without \"completion\""),
            ("{\"text\": \"x\"}", "chat.jsonl:4: give either"),
            ("not json", "chat.jsonl:4: not a chat example"),
        ] {
            std::fs::write(&jsonl, format!("{}\n{}\n\n{bad}\n", lines[0], lines[1])).unwrap();
            let err = format!("{:#}", read_examples(&jsonl).unwrap_err());
            assert!(err.contains(want), "{err}");
        }
        // Conversations need a template; a template error names its line.
        let err = prepare_chat(&examples, &tok, None, &out, 0.3).err().unwrap();
        assert!(format!("{err:#}").contains("no chat template"), "{err:#}");
        let broken = ChatTemplate::new("{% for m in messages %}\n{{ m.nope.deeper }}\n{% endfor %}", "", "").unwrap();
        let err = prepare_chat(&examples, &tok, Some(&broken), &out, 0.3).err().unwrap();
        assert!(format!("{err:#}").contains("chat template line 2"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
