//! Tokenizers in GGUF metadata, both ways.
//!
//! `tokenizer.ggml.model = "gpt2"`: byte-level BPE — `tokens` (the vocabulary by id, in
//! GPT-2's byte-to-unicode alphabet), `merges` ("a b" strings, in rank order), `token_type`
//! (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and `pre`, the name of
//! llama.cpp's pre-tokenizer (how text is split before BPE). It becomes an HF
//! `tokenizers::Tokenizer`; control tokens are special added tokens, user-defined ones plain
//! added tokens, so both are matched whole in text.
//!
//! `tokenizer.ggml.model = "llama"`: sentencepiece-style pieces with `scores`, run by this
//! crate's own sentencepiece BPE (the one llama2.c's tokenizer.bin uses).

use super::reader::Value;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::str::FromStr;

/// Llama 3's split pattern (`llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern: Llama 3's with single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer names this crate implements, for the error message.
const PRE_NAMES: &str = "gpt2, default, smollm, starcoder, refact, llama-bpe, llama3, qwen2";

/// The HF pre-tokenizer for llama.cpp's pre-tokenizer name.
fn pre_tokenizer(pre: &str) -> Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "gpt2" | "default" => byte_level(true),
        // Every digit its own pre-token, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        other => bail!("tokenizer pre-tokenizer '{other}' is not supported (supported: {PRE_NAMES})"),
    })
}

fn strings(md: &BTreeMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let arr = md
        .get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("metadata '{key}' is missing or not an array"))?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_string).with_context(|| format!("metadata '{key}' holds a non-string")))
        .collect()
}

fn ints(md: &BTreeMap<String, Value>, key: &str, n: usize) -> Result<Option<Vec<i64>>> {
    let Some(v) = md.get(key) else { return Ok(None) };
    let arr = v.as_array().with_context(|| format!("metadata '{key}' is not an array"))?;
    ensure!(arr.len() == n, "metadata '{key}' has {} entries for {n} tokens", arr.len());
    arr.iter()
        .map(|v| v.as_i64().with_context(|| format!("metadata '{key}' holds a non-integer")))
        .collect::<Result<_>>()
        .map(Some)
}

/// Builds the tokenizer a GGUF file's metadata describes, checked against the model's
/// vocabulary size `vocab`. `Ok(None)` when the file carries no tokenizer.
pub fn from_metadata(md: &BTreeMap<String, Value>, vocab: usize) -> Result<Option<Tokenizer>> {
    let Some(model) = md.get("tokenizer.ggml.model") else { return Ok(None) };
    let model = model.as_str().context("metadata 'tokenizer.ggml.model' is not a string")?;
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    ensure!(
        tokens.len() == vocab,
        "the tokenizer has {} tokens but the model's vocabulary is {vocab}; the file's tokenizer does not match its weights",
        tokens.len()
    );
    let types = ints(md, "tokenizer.ggml.token_type", tokens.len())?;
    match model {
        "gpt2" => {
            let merges = strings(md, "tokenizer.ggml.merges")?;
            let pre = match md.get("tokenizer.ggml.pre") {
                Some(v) => v.as_str().context("metadata 'tokenizer.ggml.pre' is not a string")?,
                None => "default",
            };
            let mut vocab_map = serde_json::Map::new();
            for (id, t) in tokens.iter().enumerate() {
                ensure!(
                    vocab_map.insert(t.clone(), id.into()).is_none(),
                    "token {id} ('{t}') repeats an earlier token; the vocabulary is not one-to-one"
                );
            }
            let mut merge_pairs = Vec::with_capacity(merges.len());
            for (i, m) in merges.iter().enumerate() {
                let (a, b) = m.split_once(' ').with_context(|| format!("merge {i} ('{m}') is not two tokens"))?;
                merge_pairs.push(json!([a, b]));
            }
            let mut added = Vec::new();
            for (id, t) in types.iter().flatten().enumerate() {
                if *t == 3 || *t == 4 {
                    added.push(json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": *t == 3}));
                }
            }
            let spec = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer(pre)?,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab_map, "merges": merge_pairs},
            });
            let inner = tokenizers::Tokenizer::from_str(&spec.to_string())
                .map_err(|e| anyhow!("the file's BPE tokenizer is inconsistent: {e}"))?;
            ensure!(
                inner.get_vocab_size(true) == vocab,
                "the file's BPE tokenizer has {} entries, the model's vocabulary {vocab}",
                inner.get_vocab_size(true)
            );
            Ok(Some(Tokenizer::from_hf(inner)?))
        }
        "llama" => {
            let scores = match md.get("tokenizer.ggml.scores") {
                Some(v) => {
                    let arr = v.as_array().context("metadata 'tokenizer.ggml.scores' is not an array")?;
                    ensure!(arr.len() == tokens.len(), "{} scores for {} tokens", arr.len(), tokens.len());
                    arr.iter()
                        .map(|s| {
                            s.as_f64().map(|x| x as f32).context("metadata 'tokenizer.ggml.scores' holds a non-number")
                        })
                        .collect::<Result<Vec<_>>>()?
                }
                None => vec![0.0; tokens.len()],
            };
            Ok(Some(Tokenizer::from_pieces(tokens, scores)?))
        }
        other => bail!("tokenizer model '{other}' is not supported (gpt2 and llama are)"),
    }
}

/// GGUF metadata entries describing `tok`. `pre` names the pre-tokenizer (kept from the
/// file the tokenizer came from; `gpt2` otherwise).
pub fn to_metadata(tok: &Tokenizer, pre: Option<&str>) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    if let Some((pieces, scores)) = tok.as_pieces() {
        out.push(("tokenizer.ggml.model".into(), Value::Str("llama".into())));
        out.push(("tokenizer.ggml.tokens".into(), Value::Array(pieces.iter().cloned().map(Value::Str).collect())));
        out.push(("tokenizer.ggml.scores".into(), Value::Array(scores.iter().copied().map(Value::F32).collect())));
        // ids 0–2 are <unk>, <s>, </s>; 3–258 the byte-fallback pieces.
        let types = (0..pieces.len()).map(|i| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                3..259 => 6,
                _ => 1,
            })
        });
        out.push(("tokenizer.ggml.token_type".into(), Value::Array(types.collect())));
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(1)));
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(2)));
        out.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)));
        return Ok(out);
    }
    let hf = tok.as_hf().context("tokenizer has no exportable form")?;
    let spec: serde_json::Value = serde_json::from_str(&hf.to_string(false).map_err(|e| anyhow!("{e}"))?)?;
    ensure!(
        spec["model"]["type"] == "BPE",
        "only BPE tokenizers can be written to GGUF, not {}",
        spec["model"]["type"]
    );
    let n = hf.get_vocab_size(true);
    let mut tokens = vec![None; n];
    for (t, id) in hf.get_vocab(true) {
        let slot = tokens.get_mut(id as usize).context("tokenizer ids are not contiguous")?;
        *slot = Some(t);
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| anyhow!("tokenizer has no token {i}")))
        .collect::<Result<_>>()?;
    let mut types = vec![1i32; n];
    for t in spec["added_tokens"].as_array().into_iter().flatten() {
        let id = t["id"].as_u64().context("added token without id")? as usize;
        if id < n {
            types[id] = if t["special"].as_bool() == Some(true) { 3 } else { 4 };
        }
    }
    let merges: Vec<Value> = spec["model"]["merges"]
        .as_array()
        .context("BPE tokenizer without merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::Str(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => {
                Ok(Value::Str(format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default())))
            }
            other => bail!("unexpected merge {other}"),
        })
        .collect::<Result<_>>()?;
    out.push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
    out.push(("tokenizer.ggml.pre".into(), Value::Str(pre.unwrap_or("gpt2").into())));
    out.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::Str).collect())));
    out.push(("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())));
    out.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    Ok(out)
}
