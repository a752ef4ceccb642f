//! `anetrain chat`: a terminal conversation with streaming replies.

use crate::{DEFAULT_SEED, QuantArgs, Runtime, SamplingArgs};
use anetrain::chat::session::{ChatModel, ChatSession, TurnEnd};
use anetrain::rng::Rng;
use anetrain::signals::interrupt;
use anyhow::Result;
use std::io::{BufRead, Write};

/// `anetrain chat`'s arguments, parsed by clap as they are.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// A model with a tokenizer and a chat template: an HF directory (tokenizer.json,
    /// tokenizer_config.json), a .gguf file, or a training checkpoint with its tokenizer.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// A Jinja chat template file used instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<std::path::PathBuf>,
    /// LoRA adapters (a PEFT adapter directory or a LoRA checkpoint) to apply to --model.
    #[arg(long)]
    pub lora: Option<std::path::PathBuf>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Context positions (default: the model's, at most 2048).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Longest reply in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub rt: Runtime,
}

const HELP: &str = "/reset forgets the conversation, /system TEXT sets the system prompt (and resets), /quit leaves; Ctrl-C stops a reply";

/// `text` with control characters other than newline and tab shown as U+FFFD: a model's
/// output must not drive the terminal (escape sequences could move the cursor or clear it).
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '\u{fffd}' } else { c }).collect()
}

pub fn chat(args: ChatArgs) -> Result<()> {
    let (sampling, quant, rt) = (args.sampling.sampling(DEFAULT_SEED)?, args.quant.mode(), args.rt);
    let mut model = ChatModel::load_with_lora(&args.model, args.chat_template.as_deref(), args.lora.as_deref())?;
    if let Some(mode) = quant {
        model.quantize(&args.model, mode)?;
        eprintln!("{}", model.quant.as_ref().expect("just set").summary());
    }
    let ctx = args.ctx.unwrap_or(model.cfg.max_seq_len.min(2048));
    let (_, pool) = rt.setup()?;
    let mut session = ChatSession::new(&model, ctx, args.system.clone())?;
    let mut rng = Rng::new(sampling.seed);
    interrupt::install();
    println!("chatting with {} ({} positions of context). {HELP}.", model.name, ctx);
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                session.reset();
                println!("[conversation reset]");
                continue;
            }
            "/help" => {
                println!("{HELP}");
                continue;
            }
            _ if input == "/system" || input.starts_with("/system ") => {
                let text = input["/system".len()..].trim();
                session.system = (!text.is_empty()).then(|| text.to_string());
                session.reset();
                match &session.system {
                    Some(_) => println!("[system prompt set; conversation reset]"),
                    None => println!("[system prompt cleared; conversation reset]"),
                }
                continue;
            }
            _ if input.starts_with('/') => {
                println!("[unknown command {input}; {HELP}]");
                continue;
            }
            _ => {}
        }
        interrupt::generating(true);
        let report = pool.install(|| {
            session.turn(input, args.max_tokens, &sampling, &mut rng, interrupt::requested, |text| {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(printable(text).as_bytes());
                let _ = out.flush();
            })
        });
        interrupt::generating(false);
        match report {
            Ok(r) => {
                println!();
                if r.dropped_turns > 0 {
                    println!("[context full: dropped the oldest {} turn(s)]", r.dropped_turns);
                }
                match r.end {
                    TurnEnd::Interrupted => println!("[stopped]"),
                    TurnEnd::ContextFull => println!("[context full: reply cut; older turns will be dropped]"),
                    TurnEnd::Length => println!("[reply cut at --max-tokens {}]", args.max_tokens),
                    TurnEnd::Stop => {}
                }
            }
            Err(e) => println!("[error: {e:#}]"),
        }
    }
}
