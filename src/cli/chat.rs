//! `anetrain chat`: a terminal conversation with streaming replies.

use crate::Runtime;
use anetrain::chat::session::{ChatModel, ChatSession, TurnEnd};
use anetrain::generate::Sampling;
use anetrain::rng::Rng;
use anetrain::signals::interrupt;
use anyhow::Result;
use std::io::{BufRead, Write};

pub struct ChatArgs {
    pub model: std::path::PathBuf,
    pub chat_template: Option<std::path::PathBuf>,
    /// LoRA adapters to merge into the model.
    pub lora: Option<std::path::PathBuf>,
    pub system: Option<String>,
    pub ctx: Option<usize>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub quant: Option<anetrain::quant::weights::QuantMode>,
}

const HELP: &str = "/reset forgets the conversation, /system TEXT sets the system prompt (and resets), /quit leaves; Ctrl-C stops a reply";

/// `text` with control characters other than newline and tab shown as U+FFFD: a model's
/// output must not drive the terminal (escape sequences could move the cursor or clear it).
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '\u{fffd}' } else { c }).collect()
}

pub fn chat(args: ChatArgs, rt: Runtime) -> Result<()> {
    let mut model = ChatModel::load_with_lora(&args.model, args.chat_template.as_deref(), args.lora.as_deref())?;
    if let Some(mode) = args.quant {
        model.quantize(&args.model, mode)?;
        eprintln!("{}", model.quant.as_ref().expect("just set").summary());
    }
    let ctx = args.ctx.unwrap_or(model.cfg.max_seq_len.min(2048));
    let (_, pool) = rt.setup()?;
    let mut session = ChatSession::new(&model, ctx, args.system.clone())?;
    let mut rng = Rng::new(args.sampling.seed);
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
            session.turn(input, args.max_tokens, &args.sampling, &mut rng, interrupt::requested, |text| {
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
