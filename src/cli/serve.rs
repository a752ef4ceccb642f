//! `anetrain serve`: the OpenAI-compatible HTTP server.

use crate::{QuantArgs, Runtime, SamplingArgs};
use anetrain::chat::session::ChatModel;
use anetrain::serve::{ServeOptions, serve};
use anyhow::{Context, Result};
use std::sync::Arc;

/// `anetrain serve`'s arguments, parsed by clap as they are.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// A model with a tokenizer and a chat template: an HF directory (tokenizer.json,
    /// tokenizer_config.json), a .gguf file, or a training checkpoint with its tokenizer.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// A Jinja chat template file used instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<std::path::PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the /v1 routes.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting for a place at most; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Context positions per request, prompt and reply (default: the model's, at most 2048).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// Defaults for requests that leave `temperature`, `top_p` or `seed` out (without
    /// --seed each such request draws its own); --top-k applies to every request.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub rt: Runtime,
}

pub fn run(args: ServeArgs) -> Result<()> {
    // The sampling seed of requests that send none: --seed, or each draws its own.
    let (seed, sampling) = (args.sampling.seed, args.sampling.sampling(0)?);
    let mut model = ChatModel::load(&args.model, args.chat_template.as_deref())?;
    if let Some(mode) = args.quant.mode() {
        model.quantize(&args.model, mode)?;
        eprintln!("{}", model.quant.as_ref().expect("just set").summary());
    }
    let (par, _pool) = args.rt.setup()?;
    let ctx = args.ctx.unwrap_or(model.cfg.max_seq_len.min(2048));
    let name = model.name.clone();
    let opts = ServeOptions {
        api_key: args.api_key.clone(),
        max_batch: args.max_batch,
        max_queue: args.queue,
        ctx,
        body_limit: args.body_limit,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        seed,
        par,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (host, port, key) = (args.host.clone(), args.port, args.api_key.is_some());
    runtime.block_on(serve(Arc::new(model), name.clone(), opts, &host, port, |addr| {
        println!(
            "serving {name} on http://{addr} (OpenAI API under /v1, chat page at /){}",
            if key { "; API key required" } else { "" }
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }))
}
