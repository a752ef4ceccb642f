//! `anetrain serve`: the OpenAI-compatible HTTP server.

use crate::Runtime;
use anetrain::chat::session::ChatModel;
use anetrain::serve::{ServeOptions, serve};
use anyhow::{Context, Result};
use std::sync::Arc;

pub struct ServeArgs {
    pub model: std::path::PathBuf,
    pub chat_template: Option<std::path::PathBuf>,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub max_batch: usize,
    pub queue: usize,
    pub ctx: Option<usize>,
    pub body_limit: usize,
    /// Defaults for requests (its seed unused: see `seed`).
    pub sampling: anetrain::generate::Sampling,
    /// The seed of requests that send none (`None`: each draws its own).
    pub seed: Option<u64>,
    pub quant: Option<anetrain::quant::weights::QuantMode>,
}

pub fn run(args: ServeArgs, rt: Runtime) -> Result<()> {
    let mut model = ChatModel::load(&args.model, args.chat_template.as_deref())?;
    if let Some(mode) = args.quant {
        model.quantize(&args.model, mode)?;
        eprintln!("{}", model.quant.as_ref().expect("just set").summary());
    }
    let (par, _pool) = rt.setup()?;
    let ctx = args.ctx.unwrap_or(model.cfg.max_seq_len.min(2048));
    let name = model.name.clone();
    let opts = ServeOptions {
        api_key: args.api_key.clone(),
        max_batch: args.max_batch,
        max_queue: args.queue,
        ctx,
        body_limit: args.body_limit,
        temperature: args.sampling.temperature,
        top_p: args.sampling.top_p,
        top_k: args.sampling.top_k,
        seed: args.seed,
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
