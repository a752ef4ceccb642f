//! Chat and instruction data: JSON lines of `{"messages": [{"role", "content"}, …]}` or
//! `{"prompt": …, "completion": …}`, rendered with the model's chat template and tokenized
//! span by span, with a loss mask that is 1 only on assistant tokens.

use super::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;
use serde::Deserialize;
use std::path::Path;

/// One line of a chat `.jsonl`; exactly one of the two forms.
/// Other fields (ids, sources) are ignored.
#[derive(Deserialize)]
struct Line {
    messages: Option<Vec<Message>>,
    prompt: Option<String>,
    completion: Option<String>,
}

/// A training example read from one line.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    Conversation(Vec<Message>),
    Completion { prompt: String, completion: String },
}

/// Whether a `.jsonl` file holds chat data: its first non-blank line has `messages` or
/// `prompt` (text corpora have `text`).
pub fn is_chat_jsonl(path: &Path) -> Result<bool> {
    if path.extension().is_none_or(|e| e != "jsonl") || !path.is_file() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let Some(first) = text.lines().find(|l| !l.trim().is_empty()) else { return Ok(false) };
    #[derive(Deserialize)]
    struct Keys {
        messages: Option<serde_json::Value>,
        prompt: Option<serde_json::Value>,
    }
    Ok(serde_json::from_str::<Keys>(first).is_ok_and(|k| k.messages.is_some() || k.prompt.is_some()))
}

/// Every example of a chat `.jsonl`; a bad line is named by its number.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (UTF-8 JSON lines expected)", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let parsed: Line = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: not a chat example (expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}} \
                 or {{\"prompt\": ..., \"completion\": ...}})",
                at()
            )
        })?;
        let example = match parsed {
            Line { messages: Some(m), prompt: None, completion: None, .. } => {
                ensure!(!m.is_empty(), "{}: \"messages\" is empty", at());
                ensure!(
                    m.iter().any(|m| m.role == "assistant"),
                    "{}: no assistant message, so nothing to learn from",
                    at()
                );
                Example::Conversation(m)
            }
            Line { messages: None, prompt: Some(prompt), completion: Some(completion), .. } => {
                ensure!(!completion.is_empty(), "{}: \"completion\" is empty", at());
                Example::Completion { prompt, completion }
            }
            Line { messages: None, prompt: Some(_), completion: None, .. } => {
                bail!("{}: \"prompt\" without \"completion\"", at())
            }
            _ => bail!("{}: give either \"messages\" or \"prompt\" and \"completion\", not both", at()),
        };
        out.push(example);
    }
    ensure!(!out.is_empty(), "{} holds no examples", path.display());
    Ok(out)
}

/// Token ids and loss mask `[n]` (1 on assistant tokens) of one example. With a template, a
/// prompt/completion pair is a user turn and an assistant reply; without one it is plain text,
/// the completion followed by the end-of-sequence token learned.
pub fn encode_example(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    example: &Example,
    eos: Option<u32>,
) -> Result<(Vec<u32>, Vec<u8>)> {
    let spans = match (example, template) {
        (Example::Conversation(m), Some(t)) => t.spans(m)?,
        (Example::Completion { prompt, completion }, Some(t)) => {
            t.spans(&[Message::new("user", prompt), Message::new("assistant", completion)])?
        }
        (Example::Completion { prompt, completion }, None) => {
            vec![(prompt.clone(), false), (completion.clone(), true)]
        }
        (Example::Conversation(_), None) => bail!(
            "the tokenizer has no chat template (tokenizer_config.json `chat_template`); \
             conversations need one"
        ),
    };
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (text, learn) in &spans {
        let part = tok.encode(text)?;
        mask.extend(std::iter::repeat_n(*learn as u8, part.len()));
        ids.extend(part);
    }
    if let (Example::Completion { .. }, None, Some(eos)) = (example, template, eos) {
        ids.push(eos);
        mask.push(1);
    }
    Ok((ids, mask))
}

/// All examples, in order, concatenated: ids and mask of equal length.
pub fn encode_examples(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    examples: &[Example],
    eos: Option<u32>,
    source: &str,
) -> Result<(Vec<u32>, Vec<u8>)> {
    let parts: Vec<(Vec<u32>, Vec<u8>)> = examples
        .par_iter()
        .enumerate()
        .map(|(i, e)| encode_example(tok, template, e, eos).with_context(|| format!("{source}: example {}", i + 1)))
        .collect::<Result<_>>()?;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (i, m) in parts {
        ids.extend(i);
        mask.extend(m);
    }
    ensure!(mask.contains(&1), "{source}: the examples hold no assistant tokens to learn");
    Ok((ids, mask))
}

/// The tokenizer's chat template: `template_file` (a Jinja file) if given, else the
/// `tokenizer_config.json` beside the tokenizer file (or in the tokenizer directory).
pub fn template_for(tokenizer: &Path, template_file: Option<&Path>, tok: &Tokenizer) -> Result<Option<ChatTemplate>> {
    if let Some(file) = template_file {
        let src = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let doc = tok.doc_token.and_then(|id| tok.id_to_token(id)).unwrap_or_default();
        return ChatTemplate::new(&src, &doc, &doc).with_context(|| format!("in {}", file.display())).map(Some);
    }
    let dir = if tokenizer.is_dir() { tokenizer } else { tokenizer.parent().unwrap_or(Path::new(".")) };
    ChatTemplate::load_from_dir(dir)
}
