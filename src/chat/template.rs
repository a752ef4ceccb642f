//! Chat templates: HF's Jinja `chat_template` (from `tokenizer_config.json`, or a GGUF's
//! `tokenizer.chat_template`) rendered with `minijinja`, configured as transformers configures
//! Jinja: `trim_blocks` and `lstrip_blocks`, loop controls, Python's string methods (`.strip()`,
//! `.startswith()`, `.split()`, … through `minijinja-contrib`'s pycompat), `raise_exception`,
//! `strftime_now`, Python's `json.dumps` as `tojson`, and the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`. Every error names the template line.

use anyhow::{Context, Result, anyhow, ensure};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One turn of a conversation, as HF templates and the OpenAI API see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

const NAME: &str = "chat_template";

/// ChatML in the form SmolLM2 ships it (a default system turn, Python's `.strip()`); the
/// template the tests' tiny chat models carry.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template with the special-token strings it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's source, for saving beside a checkpoint.
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// `tokenizer_config.json`'s special tokens are either strings or `AddedToken` objects.
#[derive(Deserialize, Serialize, Clone)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Added { content: String },
}

impl TokenSpec {
    fn text(&self) -> &str {
        match self {
            TokenSpec::Text(s) | TokenSpec::Added { content: s } => s,
        }
    }
}

/// `chat_template` is a string, or a list of named templates (the one named `default` is used).
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize, Serialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// The fields of HF's `tokenizer_config.json` this crate reads and writes.
#[derive(Deserialize, Serialize)]
struct TokenizerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_template: Option<TemplateSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bos_token: Option<TokenSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token: Option<TokenSpec>,
}

/// `raise_exception(msg)`: the template refuses the conversation.
fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the local date and time through libc's strftime (Llama 3's templates
/// print today's date).
fn strftime_now(fmt: String) -> Result<Value, minijinja::Error> {
    let bad = || minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {fmt:?}"));
    let cfmt = std::ffi::CString::new(fmt.clone()).map_err(|_| bad())?;
    let mut buf = [0u8; 256];
    // SAFETY: time/localtime_r/strftime get valid pointers to locals; strftime writes at most
    // buf.len() bytes and returns how many.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad());
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), cfmt.as_ptr(), &tm)
    };
    Ok(Value::from(String::from_utf8_lossy(&buf[..n]).into_owned()))
}

/// Python's `json.dumps` separators: `", "` between items and `": "` after keys.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// no HTML escaping (minijinja's own escapes `<`, `>`, `&`, `'`).
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            serde::Serialize::serialize(&value, &mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => serde::Serialize::serialize(&value, &mut serde_json::Serializer::with_formatter(&mut out, PythonJson)),
    };
    written.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8_lossy(&out).into_owned()))
}

/// One sentence naming the template line, e.g. `chat template line 3: undefined value`.
fn describe(err: &minijinja::Error) -> anyhow::Error {
    let what = match (err.kind(), err.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
    };
    match err.line() {
        Some(line) => anyhow!("chat template line {line}: {what}"),
        None => anyhow!("chat template: {what}"),
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template of an HF `tokenizer_config.json`, or `None` when it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: TokenizerConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a tokenizer_config.json", path.display()))?;
        let source = match cfg.chat_template {
            None => return Ok(None),
            Some(TemplateSpec::One(s)) => s,
            Some(TemplateSpec::Named(list)) => match list.into_iter().find(|t| t.name == "default") {
                Some(t) => t.template,
                None => anyhow::bail!("{}: chat_template lists no template named 'default'", path.display()),
            },
        };
        let text = |t: &Option<TokenSpec>| t.as_ref().map(|t| t.text().to_string()).unwrap_or_default();
        let tmpl = Self::new(&source, &text(&cfg.bos_token), &text(&cfg.eos_token))
            .with_context(|| format!("in {}", path.display()))?;
        Ok(Some(tmpl))
    }

    /// The template in `dir/tokenizer_config.json`, if the file exists and has one.
    pub fn load_from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::from_tokenizer_config(&path)
    }

    /// Writes `dir/tokenizer_config.json` (template and special tokens) atomically.
    pub fn save_to_dir(&self, dir: &Path) -> Result<()> {
        let cfg = TokenizerConfig {
            chat_template: Some(TemplateSpec::One(self.source.clone())),
            bos_token: Some(TokenSpec::Text(self.bos_token.clone())),
            eos_token: Some(TokenSpec::Text(self.eos_token.clone())),
        };
        let json = serde_json::to_string_pretty(&cfg)?;
        crate::checkpoint::safetensors::write_atomically(&dir.join("tokenizer_config.json"), |out| {
            std::io::Write::write_all(out, json.as_bytes())
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// next reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        tmpl.render(ctx).map_err(|e| describe(&e))
    }

    /// The conversation's text cut into spans, each flagged whether it is an assistant reply
    /// (the reply's text and whatever the template closes it with, such as `<|im_end|>`).
    /// Reply i spans from the end of `render(messages[..i], true)` to the end of
    /// `render(messages[..=i], false)`; a template whose renderings are not prefixes of each
    /// other cannot be split this way and is refused.
    pub fn spans(&self, messages: &[Message]) -> Result<Vec<(String, bool)>> {
        ensure!(!messages.is_empty(), "the conversation has no messages");
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        let mut at = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            ensure!(
                full.starts_with(&through) && through.starts_with(&before) && before.len() >= at,
                "the chat template renders message {} differently depending on what follows it, so its \
                 assistant tokens cannot be located",
                i + 1
            );
            spans.push((full[at..before.len()].to_string(), false));
            spans.push((full[before.len()..through.len()].to_string(), true));
            at = through.len();
        }
        spans.push((full[at..].to_string(), false));
        spans.retain(|(s, _)| !s.is_empty());
        Ok(spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<Message> {
        vec![Message::new("user", " Hi there "), Message::new("assistant", "Hello!"), Message::new("user", "Bye")]
    }

    #[test]
    fn renders_chatml_with_python_methods_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let text = t.render(&conv(), true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&conv(), false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn llama_style_template_with_bos_blocks_and_raise_exception() {
        // Jinja block syntax across lines: trim_blocks/lstrip_blocks must remove the newlines
        // and indentation around the tags, as transformers renders it.
        let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\n[INST] {{ m.content | trim }} [/INST]\n    {% elif m.role == 'assistant' %}\n {{ m.content }}{{ eos_token }}\n    {% else %}\n{{ raise_exception('Only user and assistant roles are supported, got ' + m.role) }}\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let text = t.render(&conv()[..2], false).unwrap();
        // As Jinja2 renders it: trim_blocks drops the newline after a block tag, not after `{{ }}`.
        assert_eq!(text, "<s>\n[INST] Hi there [/INST]\n Hello!</s>\n");
        let err = t.render(&[Message::new("tool", "x")], false).unwrap_err().to_string();
        assert!(err.contains("line 8") && err.contains("Only user and assistant roles"), "{err}");
        assert!(t.render(&[], false).is_ok());
    }

    #[test]
    fn errors_name_the_template_line() {
        let err = ChatTemplate::new("ok\n{% for m in messages %}\n{{ m.content }\n{% endfor %}", "", "").err().unwrap();
        assert!(err.to_string().starts_with("chat template line 3:"), "{err}");
        let t = ChatTemplate::new("a\nb\n{{ messages[0].content.nosuchmethod() }}", "", "").unwrap();
        let err = t.render(&conv(), false).unwrap_err().to_string();
        assert!(err.starts_with("chat template line 3:"), "{err}");
    }

    #[test]
    fn spans_cover_assistant_replies_exactly() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let mut c = conv();
        c.push(Message::new("assistant", "See you"));
        let spans = t.spans(&c).unwrap();
        let text: String = spans.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(text, t.render(&c, false).unwrap());
        let replies: Vec<&str> = spans.iter().filter(|(_, a)| *a).map(|(s, _)| s.as_str()).collect();
        assert_eq!(replies, ["Hello!<|im_end|>\n", "See you<|im_end|>\n"]);
        // A template that looks ahead (the last message is rendered differently) is refused.
        let odd = "{% for m in messages %}{{ m.content }}{% if loop.last %}!{% endif %}{% endfor %}";
        let t = ChatTemplate::new(odd, "", "").unwrap();
        assert!(t.spans(&c).unwrap_err().to_string().contains("cannot be located"));
    }

    #[test]
    fn reads_tokenizer_config_forms() {
        let dir = std::env::temp_dir().join(format!("anetrain-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer_config.json");
        let cfg = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}],
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "<|im_end|>",
            "model_max_length": 2048,
        });
        std::fs::write(&path, cfg.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!((t.bos_token.as_str(), t.eos_token.as_str()), ("<s>", "<|im_end|>"));
        t.save_to_dir(&dir).unwrap();
        let again = ChatTemplate::load_from_dir(&dir).unwrap().unwrap();
        assert_eq!(again.render(&conv(), true).unwrap(), t.render(&conv(), true).unwrap());
        std::fs::write(&path, "{\"bos_token\": \"<s>\"}").unwrap();
        assert!(ChatTemplate::from_tokenizer_config(&path).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
