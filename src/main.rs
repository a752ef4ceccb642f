//! The `anetrain` command line: train, info, bench.

use anetrain::backend::{Backend, BackendKind};
use anetrain::bench;
use anetrain::checkpoint::llama2c::Format as Llama2cFormat;
use anetrain::checkpoint::safetensors::Dtype;
use anetrain::config::ModelConfig;
use anetrain::data::SYNTHETIC_ENTROPY;
use anetrain::mil::emit::InputLayout;
use anetrain::ops::{GemmImpl, Par};
use anetrain::telemetry::Telemetry;
use anetrain::train::adamw::AdamWConfig;
use anetrain::train::loss_scale::LossScaleMode;
use anetrain::train::{TrainOptions, Trainer};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "anetrain",
    version,
    about = "Train Llama-family transformers with hand-written forward and backward passes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (defaults: stories260k on built-in synthetic data, a few seconds).
    Train(Box<TrainArgs>),
    /// Print a model's shape, parameter count and FLOPs per token.
    Info {
        /// Preset name or path to an HF config.json.
        #[arg(long, default_value = "stories110m")]
        model: String,
        /// Context length for the attention FLOPs.
        #[arg(long, default_value_t = 256)]
        seq: usize,
    },
    /// Benchmarks (commands, not tests).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The MIL programs of the Neural Engine kernel set.
    #[command(subcommand)]
    Mil(MilCommand),
    /// The Apple Neural Engine runtime.
    #[command(subcommand)]
    Ane(AneCommand),
    /// Convert a model between HF directories and llama2.c .bin files.
    Convert {
        /// HF model directory, llama2.c .bin, or training checkpoint directory.
        #[arg(long)]
        from: PathBuf,
        /// Output: a directory (HF) or a file ending in .bin (llama2.c).
        #[arg(long)]
        to: PathBuf,
        /// Tensor dtype of an HF export.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: ExportDtype,
        /// llama2.c format of a .bin export.
        #[arg(long, value_enum, default_value = "legacy")]
        llama2c_format: Llama2cFormat,
    },
    /// Tokenize a corpus into train.tok, val.tok and tokenizer.json.
    Prepare {
        /// tokenizer.json (HF), tokenizer.model (sentencepiece), tokenizer.bin (llama2.c), or
        /// `bpe:N` to train a byte-level BPE of N entries on the input.
        #[arg(long, default_value = "bpe:4096")]
        tokenizer: String,
        /// Inputs: .txt files (blank-line-separated documents), .jsonl files (`text` field),
        /// directories of those, or `builtin:stories:N`.
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// Share of documents (the last ones) held out for validation.
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        /// Seed of the built-in story generator.
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        #[command(flatten)]
        rt: Runtime,
    },
    /// Generate from a model: prefill the prompt in one pass, decode from a KV cache.
    Generate {
        /// HF model directory, llama2.c .bin, or training checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// The prompt as raw token ids, comma-separated (e.g. `1,2,3`); ids are printed.
        #[arg(long, value_delimiter = ',', required_unless_present = "prompt", conflicts_with = "prompt")]
        ids: Vec<u32>,
        /// The prompt as text (needs --tokenizer); text is printed as it is decoded.
        #[arg(long)]
        prompt: Option<String>,
        /// tokenizer.json, tokenizer.model, tokenizer.bin, or a directory made by prepare.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        /// 0 = no top-k cut.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Stop after this token id (e.g. the tokenizer's end-of-sequence).
        #[arg(long)]
        eos: Option<u32>,
        #[command(flatten)]
        rt: Runtime,
    },
    /// Mean cross-entropy and perplexity over consecutive windows of a token file.
    Eval {
        /// HF model directory, llama2.c .bin, or training checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Token file (headed, or llama2.c's flat u16 .bin).
        #[arg(long)]
        data: PathBuf,
        /// Window length T: window i reads tokens [i·T, i·T + T] and predicts the last T.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Windows per forward pass.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Use only the first N windows (default: all).
        #[arg(long, default_value_t = 0)]
        batches: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        rt: Runtime,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportDtype {
    F32,
    Bf16,
}

#[derive(Args, Clone)]
struct Runtime {
    /// Worker threads (rayon pool and GEMM); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// GEMM implementation for every matrix product.
    #[arg(long, value_enum, default_value = "gemm")]
    gemm: GemmImpl,
}

impl Runtime {
    /// Builds the thread pool every op runs in; the count is explicit, never inherited.
    fn setup(&self) -> Result<(Par, rayon::ThreadPool)> {
        let threads = match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if !self.gemm.available() {
            bail!("--gemm blas needs a build with `--features blas` (and libopenblas-dev on Linux)");
        }
        // matrixmultiply reads its thread cap from the environment, once, on first use.
        // SAFETY: set before any other thread exists in this process.
        unsafe { std::env::set_var("MATMUL_NUM_THREADS", threads.to_string()) };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("cannot start thread pool")?;
        Ok((Par { threads, gemm: self.gemm }, pool))
    }
}

/// Whether the per-layer weight-gradient GEMMs run on a CPU worker thread while the backend
/// evaluates the next kernels.
#[derive(Clone, Copy, ValueEnum)]
enum DwOverlap {
    /// The backend decides: on where its kernels run off the CPU (off for `cpu`).
    Auto,
    /// Always (on the `cpu` backend the worker competes with the kernels for the cores).
    On,
    /// Never: the dW GEMMs run between the kernels.
    Off,
}

impl DwOverlap {
    /// `None` leaves the backend's default.
    fn forced(self) -> Option<bool> {
        match self {
            DwOverlap::Auto => None,
            DwOverlap::On => Some(true),
            DwOverlap::Off => Some(false),
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Preset (stories260k, stories2m, stories15m, stories42m, stories110m, qwen3-0.6b) or HF
    /// config.json.
    #[arg(long, default_value = "stories2m")]
    model: String,
    /// `stories` (the built-in story corpus, BPE-tokenized), `synthetic` (a Markov chain over
    /// ids), a directory made by `prepare`, a raw corpus (.txt/.jsonl file or directory,
    /// tokenized with --tokenizer), or a token file (headed, or llama2.c's flat u16).
    #[arg(long, default_value = "stories")]
    data: String,
    /// Optimizer updates.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Sequences per micro-batch (B).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Positions per sequence (T).
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Micro-batches accumulated per update.
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Floor of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    /// Warmup updates (default: 5% of --steps).
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Loss scaling: `dynamic` (start 2^16, halve on a non-finite gradient and skip that
    /// update, double after 2000 clean updates), `off`, or a fixed power of two.
    #[arg(long, default_value = "dynamic")]
    loss_scale: String,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// `cpu` (f32), `mil-sim` (the MIL kernels in the fp16 simulator), or `ane` (the MIL
    /// kernels on the Neural Engine; macOS on Apple silicon only).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// How the MIL backends pass weights: `packed` into one input with the activations (the
    /// original system's layout) or `separate` function inputs.
    #[arg(long, value_enum, default_value = "packed")]
    mil_layout: InputLayout,
    /// Run the per-layer dW GEMMs on a CPU worker thread beside the backend's kernels
    /// (results are bit-identical either way).
    #[arg(long, value_enum, default_value = "auto")]
    dw_overlap: DwOverlap,
    /// Write one JSON line per update to this file.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Print every N-th update (the first and last always print).
    #[arg(long, default_value_t = 10)]
    print_every: usize,
    /// Skip measuring the GEMM peak for the efficiency report.
    #[arg(long)]
    no_peak: bool,
    /// Evaluate on held-out data every N updates and at the end (0 = never).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Tokens per evaluation (whole windows of --seq).
    #[arg(long, default_value_t = 16384)]
    eval_tokens: usize,
    /// Held-out token file for --eval-every (synthetic data makes its own).
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// For a raw --data corpus: tokenizer.json / .model / .bin, or `bpe:N` (default: a BPE of
    /// the model's vocabulary trained on the corpus).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Write checkpoints into this directory (one always at the end of the run).
    #[arg(long)]
    ckpt_dir: Option<PathBuf>,
    /// Also checkpoint every N updates.
    #[arg(long, default_value_t = 0)]
    ckpt_every: usize,
    /// Keep only the newest K checkpoints (0 = all).
    #[arg(long, default_value_t = 3)]
    keep_last: usize,
    /// Continue from a checkpoint: a step directory, or `latest` (in --ckpt-dir), or a
    /// checkpoint directory. Model, token data, --batch, --seq and --accum must match; --steps
    /// (the total), the lr schedule and logging may change.
    #[arg(long)]
    resume: Option<String>,
    #[command(flatten)]
    rt: Runtime,
}

/// The model and micro-batch a benchmark measures (default: the original's Stories110M setting).
#[derive(Args)]
struct BenchShape {
    #[arg(long, default_value = "stories110m")]
    model: String,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
}

#[derive(Subcommand)]
enum MilCommand {
    /// Write every kernel's MIL program and weight blob files, plus manifest.json.
    Emit {
        /// Preset name or path to an HF config.json.
        #[arg(long, default_value = "stories110m")]
        model: String,
        /// Sequence length T the kernels are built for (padded to a multiple of 16).
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, value_enum, default_value = "packed")]
        layout: InputLayout,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AneCommand {
    /// Check every kernel on the Neural Engine against the fp16 simulator and the cpu
    /// backend, and print a table (macOS on Apple silicon).
    Probe {
        /// Preset name or path to an HF config.json (default: a small GQA + QK-norm shape).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 64)]
        seq: usize,
        #[arg(long, value_enum, default_value = "packed")]
        layout: InputLayout,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// GFLOP/s of every GEMM a training step issues, per implementation, plus a 1024³ peak.
    Gemm {
        #[command(flatten)]
        shape: BenchShape,
        /// Benchmark only this implementation (default: all available).
        #[arg(long = "impl", value_enum)]
        which: Option<GemmImpl>,
        /// Seconds of repetitions per shape and implementation.
        #[arg(long, default_value_t = 0.5)]
        budget: f64,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Median ms per training micro-step (forward/backward/optimizer split) and peak RSS.
    Step {
        #[command(flatten)]
        shape: BenchShape,
        #[arg(long, default_value_t = 10)]
        accum: usize,
        /// Minimum timed micro-steps after the warm-up update.
        #[arg(long, default_value_t = 10)]
        min_micro: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Run the per-layer dW GEMMs on a CPU worker thread beside the backend's kernels.
        #[arg(long, value_enum, default_value = "auto")]
        dw_overlap: DwOverlap,
        #[command(flatten)]
        rt: Runtime,
        /// The backend whose step is measured (`mil-sim`: the fp16 simulator, a correctness
        /// tool, not a fast path).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendKind,
        #[arg(long, value_enum, default_value = "packed")]
        mil_layout: InputLayout,
    },
}

/// The `gemm` crate allocates its packing buffers on every call. With glibc's defaults those
/// multi-megabyte blocks are mmap'd and munmap'd each time, and every GEMM then pays page
/// faults and TLB shootdowns (≈10% of a Stories110M step, measured with perf). Serving them
/// from a heap that is never trimmed makes them free after the first step.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: plain glibc tuning calls, made before any allocation-heavy work or thread.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum on 64-bit
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() {
    tune_allocator();
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Train(args) => train(*args),
        Command::Info { model, seq } => info(&model, seq),
        Command::Bench(BenchCommand::Gemm { shape, which, budget, threads }) => {
            bench_gemm(&shape.model, shape.batch * shape.seq, which, budget, threads)
        }
        Command::Bench(BenchCommand::Step { shape, accum, min_micro, json, dw_overlap, backend, mil_layout, rt }) => {
            let step = StepArgs { accum, min_micro, json, dw_overlap: dw_overlap.forced(), backend, mil_layout };
            bench_step(&shape.model, shape.batch, shape.seq, step, rt)
        }
        Command::Mil(MilCommand::Emit { model, seq, layout, out }) => {
            let cfg = ModelConfig::resolve(&model)?;
            let written = anetrain::mil::export::write_kernel_set(&cfg, seq, layout, &out)?;
            println!("wrote {} kernels for {} (T={seq}, {layout:?} layout) to {}", written, cfg.name, out.display());
            Ok(())
        }
        Command::Ane(AneCommand::Probe { model, seq, layout }) => {
            anetrain::ane::probe::run(model.as_deref(), seq, layout)
        }
        Command::Convert { from, to, dtype, llama2c_format } => convert(&from, &to, dtype, llama2c_format),
        Command::Prepare { tokenizer, input, out, val_fraction, seed, rt } => {
            prepare(&tokenizer, &input, &out, val_fraction, seed, rt)
        }
        Command::Generate { model, ids, prompt, tokenizer, max_tokens, temperature, top_p, top_k, seed, eos, rt } => {
            let sampling = anetrain::generate::Sampling { temperature, top_k, top_p, seed };
            let tokenizer = match (&prompt, &tokenizer) {
                (Some(_), None) => bail!("--prompt needs --tokenizer (or pass raw ids with --ids)"),
                (_, Some(path)) if path.is_dir() => Some(anetrain::tokenizer::Tokenizer::load_from_dir(path)?),
                (_, Some(path)) => Some(anetrain::tokenizer::Tokenizer::load(path)?),
                (None, None) => None,
            };
            generate(&model, &ids, prompt.as_deref(), tokenizer.as_ref(), max_tokens, sampling, eos, rt)
        }
        Command::Eval { model, data, seq, batch, batches, json, rt } => {
            eval(&model, &data, seq, batch, batches, json, rt)
        }
    }
}

fn info(model: &str, seq: usize) -> Result<()> {
    let cfg = ModelConfig::resolve(model)?;
    println!("model        {}", cfg.name);
    println!("dim (C)      {}", cfg.dim);
    println!("ffn (F)      {}", cfg.ffn_dim);
    println!("layers (L)   {}", cfg.n_layers);
    println!("heads (H)    {}  kv heads (KV) {}  head_dim (D) {}", cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    println!("vocab (V)    {}", cfg.vocab_size);
    println!("max seq      {}", cfg.max_seq_len);
    println!("rope theta   {}  norm eps {:e}", cfg.rope_theta, cfg.norm_eps);
    println!("qk-norm      {}", cfg.qk_norm);
    println!("classifier   {}", if cfg.tied_embeddings { "tied to embedding" } else { "untied (lm_head)" });
    println!("parameters   {}", group_digits(cfg.param_count()));
    println!(
        "FLOPs/token  forward {:.4} GFLOP, training {:.4} GFLOP (T = {seq})",
        cfg.forward_flops_per_token(seq) / 1e9,
        cfg.train_flops_per_token(seq) / 1e9
    );
    Ok(())
}

/// Refuses a model whose weights, gradients and AdamW moments (16 bytes per parameter) cannot
/// fit in the memory this machine has available, instead of dying in the allocator.
fn check_memory(cfg: &ModelConfig) -> Result<()> {
    let need = 16 * cfg.param_count() as u64;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    });
    if let Some(available) = available
        && need > available
    {
        bail!(
            "{} needs about {:.1} GB for weights, gradients and optimizer state; {:.1} GB is available",
            cfg.name,
            need as f64 / 1e9,
            available as f64 / 1e9
        );
    }
    Ok(())
}

/// Prints what the trained model writes after "Once upon a time".
fn sample_story(
    cfg: &ModelConfig,
    params: &[f32],
    tok: &anetrain::tokenizer::Tokenizer,
    seed: u64,
    par: Par,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let mut prompt: Vec<u32> = tok.doc_token.into_iter().collect();
    prompt.extend(tok.encode("Once upon a time")?);
    let sampling = anetrain::generate::Sampling { temperature: 0.8, top_k: 0, top_p: 0.9, seed };
    let mut ids = prompt.clone();
    let max_new = 160.min(cfg.max_seq_len.saturating_sub(prompt.len()));
    pool.install(|| {
        anetrain::generate::generate(cfg, params, &prompt, max_new, sampling, tok.doc_token, par, |t| ids.push(t))
    })?;
    let text = tok.decode(&ids)?;
    println!("--- sample (temperature 0.8, top-p 0.9) ---\n{}", text.trim());
    Ok(())
}

/// `[#####-----]` for `done` of `total`.
fn progress_bar(done: usize, total: usize) -> String {
    let filled = (done * 20).checked_div(total).unwrap_or(20).min(20);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled))
}

/// `1h02m`, `3m05s` or `12s`.
fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn train(args: TrainArgs) -> Result<()> {
    let cfg = ModelConfig::resolve(&args.model)?;
    let (par, pool) = args.rt.setup()?;
    let opts = TrainOptions {
        steps: args.steps,
        batch: args.batch,
        seq: args.seq,
        accum: args.accum,
        schedule_lr: args.lr,
        min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
        warmup: args.warmup.unwrap_or(args.steps / 20),
        adamw: AdamWConfig {
            beta1: args.beta1,
            beta2: args.beta2,
            eps: args.adam_eps,
            weight_decay: args.weight_decay,
        },
        grad_clip: args.grad_clip,
        loss_scale: LossScaleMode::parse(&args.loss_scale)?,
        eval_every: args.eval_every,
        eval_tokens: args.eval_tokens,
        seed: args.seed,
    };
    opts.validate(&cfg)?;
    check_memory(&cfg)?;
    let min_tokens = args.batch * (args.seq + 1) * 4;
    let prepared = anetrain::prepare::training_data(
        &args.data,
        cfg.vocab_size,
        args.seed,
        min_tokens,
        args.val_data.as_deref(),
        args.tokenizer.as_deref(),
    )?;
    let (data, val_data, tokenizer) = (prepared.train, prepared.val, prepared.tokenizer);
    if args.eval_every > 0 && val_data.is_none() {
        println!("note: no --val-data, so no validation (--eval-every {} ignored)", args.eval_every);
    }
    let mut telemetry = match &args.log {
        Some(path) => Telemetry::to_file(path)?,
        None => Telemetry::none(),
    };
    let backend: Box<dyn Backend> =
        anetrain::backend::build(args.backend, &cfg, args.batch, args.seq, par, args.mil_layout)?;
    let dw_overlap = args.dw_overlap.forced().unwrap_or(backend.overlaps_dw());
    println!(
        "anetrain: {} ({} params) on {} | backend {} | {} threads | gemm {:?} | dW overlap {}",
        cfg.name,
        group_digits(cfg.param_count()),
        data.source,
        backend.name(),
        par.threads,
        par.gemm,
        if dw_overlap { "on" } else { "off" }
    );
    println!(
        "B={} T={} accum={} -> {} tokens/update, {} updates, lr {:.1e} -> {:.1e}, warmup {}",
        args.batch,
        args.seq,
        args.accum,
        args.batch * args.seq * args.accum,
        args.steps,
        opts.schedule_lr,
        opts.min_lr,
        opts.warmup
    );
    if args.data == "synthetic" {
        println!(
            "data: synthetic Markov chain; loss starts near ln(V) = {:.2}, floor ≈ {SYNTHETIC_ENTROPY:.2} nats",
            (cfg.vocab_size as f64).ln()
        );
    }
    let steps = args.steps;
    let every = args.print_every.max(1);
    let resume = args.resume.clone();
    if let Some(dir) = &args.ckpt_dir {
        anetrain::checkpoint::native::check_writable(dir)?;
    }
    let ckpt = args.ckpt_dir.clone().map(|dir| anetrain::train::CheckpointPolicy {
        dir,
        every: args.ckpt_every,
        keep_last: args.keep_last,
    });
    anetrain::signals::install();
    let (summary, params) = pool.install(|| -> Result<_> {
        let mut trainer = Trainer::new(&cfg, opts, par, backend)?;
        trainer.model.set_dw_overlap(dw_overlap)?;
        trainer.val_data = val_data;
        if let Some(spec) = &resume {
            let path = match (spec.as_str(), &ckpt) {
                ("latest", Some(policy)) => policy.dir.clone(),
                ("latest", None) => bail!("--resume latest needs --ckpt-dir"),
                (other, _) => PathBuf::from(other),
            };
            let checkpoint = anetrain::checkpoint::native::load(&path)?;
            checkpoint.restore(&mut trainer, &data)?;
            println!("resumed from {} after {} updates", checkpoint.path.display(), checkpoint.step);
        }
        let (started, first_step) = (std::time::Instant::now(), trainer.start_step);
        trainer.run(&data, &mut telemetry, ckpt.as_ref(), |ev| {
            let done = ev.step - first_step;
            let eta = started.elapsed().as_secs_f64() / done as f64 * (steps - ev.step) as f64;
            if ev.step == 1 || ev.step == steps || ev.step.is_multiple_of(every) || ev.skipped || ev.val_loss.is_some()
            {
                println!(
                    "step {:>5}/{steps} {} | loss {:.4}{} | lr {:.2e} | grad norm {:.3}{} | {:>6.0} tok/s | {:>6.1} ms | ETA {}",
                    ev.step,
                    progress_bar(ev.step, steps),
                    ev.loss,
                    ev.val_loss.map_or(String::new(), |v| format!(" | val {v:.4}")),
                    ev.lr,
                    ev.grad_norm,
                    if ev.skipped { " (non-finite: update skipped, loss scale halved)" } else { "" },
                    ev.tokens_per_s,
                    ev.ms_step,
                    format_duration(eta)
                );
            }
        })
        .map(|summary| (summary, trainer.params))
    })?;
    if summary.interrupted {
        let saved = args.ckpt_dir.as_ref().map_or(String::from(" (no --ckpt-dir: nothing saved)"), |d| {
            format!("; checkpoint in {}, continue with --resume latest", d.display())
        });
        println!("interrupted after {} updates{saved}", summary.losses.len());
    }
    let peak = if args.no_peak { None } else { Some(pool.install(|| bench::gemm_peak_gflops(par, 0.3))) };
    println!("--- efficiency ---");
    println!("wall time            {:.2} s", summary.wall_s);
    println!("median micro-step    {:.1} ms (B·T = {} tokens)", summary.median_micro_ms, args.batch * args.seq);
    println!("throughput           {:.0} tokens/s", summary.tokens_per_s);
    println!(
        "kernels / dW         kernels {:.1} ms, dW {:.1} ms ({}), dW wait {:.1} ms per update",
        summary.kernel_ms,
        summary.dw_ms,
        if summary.dw_overlap { "overlapped" } else { "inline" },
        summary.dw_wait_ms
    );
    println!(
        "achieved             {:.1} GFLOP/s ({:.3} GFLOP/token)",
        summary.gflops,
        cfg.train_flops_per_token(args.seq) / 1e9
    );
    if let Some(peak) = peak {
        println!(
            "GEMM peak (1024³)    {peak:.1} GFLOP/s -> {:.0}% of peak over the whole run",
            100.0 * summary.gflops / peak
        );
    }
    println!("peak RSS             {:.0} MB", bench::peak_rss_mb());
    if let (Some(first), Some(last)) = (summary.losses.first(), summary.losses.last()) {
        println!("loss                 {first:.4} -> {last:.4}");
    }
    if let Some(tok) = &tokenizer {
        sample_story(&cfg, &params, tok, args.seed, par, &pool)?;
    }
    Ok(())
}

fn bench_gemm(model: &str, n: usize, which: Option<GemmImpl>, budget: f64, threads: Option<usize>) -> Result<()> {
    let cfg = ModelConfig::resolve(model)?;
    let impls = bench::impls_to_bench(which);
    if impls.iter().any(|g| !g.available()) {
        bail!("--impl blas needs a build with `--features blas`");
    }
    let (par0, pool) = Runtime { threads, gemm: GemmImpl::Gemm }.setup()?;
    println!("GEMM throughput at {} shapes, N = B·T = {n}, {} threads (GFLOP/s, median)", cfg.name, par0.threads);
    let shapes = bench::model_gemm_shapes(&cfg, n);
    print!("{:<28} {:>6} {:>6} {:>6}", "shape", "m", "n", "k");
    for g in &impls {
        print!(" {:>15}", format!("{g:?}").to_lowercase());
    }
    println!();
    let mut step_secs = vec![0.0; impls.len()];
    let total_flops: f64 = shapes.iter().map(|s| s.flops() * s.per_step as f64).sum();
    for shape in &shapes {
        print!("{:<28} {:>6} {:>6} {:>6}", shape.name, shape.m, shape.n, shape.k);
        for (i, &gemm) in impls.iter().enumerate() {
            let gf = pool.install(|| bench::bench_gemm_shape(shape, Par { gemm, ..par0 }, budget));
            step_secs[i] += shape.flops() * shape.per_step as f64 / (gf * 1e9);
            print!(" {gf:>15.1}");
        }
        println!();
    }
    print!("{:<49}", "whole-step GEMM mix (time-weighted)");
    for secs in &step_secs {
        print!(" {:>15.1}", total_flops / secs / 1e9);
    }
    println!();
    print!("{:<28} {:>6} {:>6} {:>6}", "peak: square", 1024, 1024, 1024);
    for &gemm in &impls {
        print!(" {:>15.1}", pool.install(|| bench::gemm_peak_gflops(Par { gemm, ..par0 }, budget)));
    }
    println!();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// `bench step` options beyond the shape.
struct StepArgs {
    accum: usize,
    min_micro: usize,
    json: bool,
    dw_overlap: Option<bool>,
    backend: BackendKind,
    mil_layout: InputLayout,
}

fn bench_step(model: &str, batch: usize, seq: usize, step: StepArgs, rt: Runtime) -> Result<()> {
    let StepArgs { accum, min_micro, json, dw_overlap, backend, mil_layout } = step;
    let cfg = ModelConfig::resolve(model)?;
    let (par, pool) = rt.setup()?;
    let opts = TrainOptions {
        steps: 1_000_000,
        batch,
        seq,
        accum,
        schedule_lr: 3e-4,
        min_lr: 3e-5,
        warmup: 0,
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        loss_scale: LossScaleMode::Dynamic,
        eval_every: 0,
        eval_tokens: 0,
        seed: 1,
    };
    let backend = anetrain::backend::build(backend, &cfg, batch, seq, par, mil_layout)?;
    let r = pool.install(|| bench::bench_step(&cfg, opts, par, min_micro.max(1), dw_overlap, backend))?;
    let peak = pool.install(|| bench::gemm_peak_gflops(par, 0.5));
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["gemm_peak_gflops"] = peak.into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} ({} params), backend {}, {} threads, B={} T={} accum={}",
        r.model,
        group_digits(r.params),
        r.backend,
        r.threads,
        r.batch,
        r.seq,
        r.accum
    );
    println!(
        "median micro-step    {:.1} ms over {} micro-steps (forward {:.1} ms, backward {:.1} ms)",
        r.median_micro_ms, r.timed_micro_steps, r.median_forward_ms, r.median_backward_ms
    );
    println!(
        "kernels / dW         kernels {:.1} ms, dW {:.1} ms ({}), dW wait {:.1} ms per micro-step",
        r.median_kernel_ms,
        r.median_dw_ms,
        if r.dw_overlap { "overlapped" } else { "inline" },
        r.median_dw_wait_ms
    );
    println!("optimizer update     {:.1} ms (once per {} micro-steps)", r.median_optimizer_ms, r.accum);
    println!("throughput           {:.1} tokens/s incl. optimizer", r.tokens_per_s);
    println!(
        "achieved             {:.1} GFLOP/s = {:.0}% of the 1024³ GEMM peak ({peak:.1} GFLOP/s)",
        r.gflops,
        100.0 * r.gflops / peak
    );
    println!("peak RSS             {:.0} MB", r.peak_rss_mb);
    Ok(())
}

fn convert(from: &std::path::Path, to: &std::path::Path, dtype: ExportDtype, format: Llama2cFormat) -> Result<()> {
    let dtype = match dtype {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::Bf16 => Dtype::BF16,
    };
    let cfg = anetrain::checkpoint::convert(from, to, dtype, format)?;
    println!("wrote {} ({} parameters) from {}", to.display(), group_digits(cfg.param_count()), from.display());
    Ok(())
}

fn eval(
    model: &std::path::Path,
    data: &std::path::Path,
    seq: usize,
    batch: usize,
    batches: usize,
    json: bool,
    rt: Runtime,
) -> Result<()> {
    let (cfg, params) = anetrain::checkpoint::load_model(model)?;
    if seq == 0 || batch == 0 {
        bail!("--seq and --batch must be at least 1");
    }
    if seq > cfg.max_seq_len {
        bail!("--seq {seq} exceeds the model's max_position_embeddings ({})", cfg.max_seq_len);
    }
    let tokens = anetrain::data::TokenData::open(data, cfg.vocab_size, None)?;
    let (par, pool) = rt.setup()?;
    let r = pool.install(|| anetrain::eval::evaluate(&cfg, &params, &tokens, seq, batch, batches, par))?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} windows of {seq}, {} tokens: loss {:.6}, perplexity {:.4} ({:.1} s, {:.0} tokens/s)",
            r.windows, r.tokens, r.loss, r.perplexity, r.seconds, r.tokens_per_s
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn generate(
    model: &std::path::Path,
    ids: &[u32],
    prompt: Option<&str>,
    tokenizer: Option<&anetrain::tokenizer::Tokenizer>,
    max_tokens: usize,
    sampling: anetrain::generate::Sampling,
    eos: Option<u32>,
    rt: Runtime,
) -> Result<()> {
    use std::io::Write;
    if !(sampling.temperature.is_finite() && sampling.temperature >= 0.0) {
        bail!("--temperature must be a non-negative number");
    }
    if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let (cfg, params) = anetrain::checkpoint::load_model(model)?;
    // Text prompts start a document (BOS / document token) and stop at the next one.
    let mut ids = ids.to_vec();
    let mut eos = eos;
    if let (Some(text), Some(tok)) = (prompt, tokenizer) {
        ids = tok.doc_token.into_iter().chain(tok.encode(text)?).collect();
        eos = eos.or(tok.doc_token);
        print!("{text}");
    }
    let ids = &ids[..];
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!("prompt token id {bad} is outside the model's vocabulary ({})", cfg.vocab_size);
    }
    let (par, pool) = rt.setup()?;
    let (prefill_s, decode_s, n) = pool.install(|| {
        // Text is printed as the difference between successive decodings of everything
        // generated so far (a token may be half of a character).
        let (mut generated, mut shown) = (Vec::new(), 0usize);
        anetrain::generate::generate(&cfg, &params, ids, max_tokens, sampling, eos, par, |t| {
            let mut out = std::io::stdout().lock();
            match tokenizer.filter(|_| prompt.is_some()) {
                Some(tok) => {
                    generated.push(t);
                    if let Ok(text) = tok.decode(&generated)
                        && !text.ends_with('\u{fffd}')
                        && text.len() > shown
                        && text.is_char_boundary(shown)
                    {
                        let _ = write!(out, "{}", &text[shown..]);
                        shown = text.len();
                    }
                }
                None => {
                    let _ = write!(out, "{t} ");
                }
            }
            let _ = out.flush();
        })
    })?;
    println!();
    eprintln!(
        "prefill: {} tokens in {:.1} ms ({:.0} tokens/s); decode: {n} tokens in {:.1} ms ({:.1} tokens/s)",
        ids.len(),
        prefill_s * 1e3,
        ids.len() as f64 / prefill_s,
        decode_s * 1e3,
        n.saturating_sub(1) as f64 / decode_s.max(1e-9)
    );
    Ok(())
}

fn prepare(
    tokenizer: &str,
    inputs: &[String],
    out: &std::path::Path,
    val_fraction: f64,
    seed: u64,
    rt: Runtime,
) -> Result<()> {
    let (_, pool) = rt.setup()?;
    let start = std::time::Instant::now();
    let mut docs = Vec::new();
    for input in inputs {
        docs.extend(anetrain::prepare::read_documents(input, seed)?);
    }
    eprintln!(
        "read {} documents in {:.1} s; building the tokenizer ({tokenizer})",
        docs.len(),
        start.elapsed().as_secs_f64()
    );
    let tok = pool.install(|| anetrain::prepare::tokenizer_for(tokenizer, &docs))?;
    let s = pool.install(|| anetrain::prepare::prepare(&docs, &tok, out, val_fraction))?;
    println!(
        "{} documents, {} train + {} validation tokens, vocabulary {} ({}), tokenized {:.1} MB in {:.2} s ({:.1} MB/s, {:.0} tokens/s)",
        s.documents,
        s.train_tokens,
        s.val_tokens,
        tok.vocab_size(),
        tok.fingerprint,
        s.bytes as f64 / 1e6,
        s.seconds,
        s.bytes as f64 / 1e6 / s.seconds,
        (s.train_tokens + s.val_tokens) as f64 / s.seconds
    );
    println!("wrote {}/train.tok, val.tok and the tokenizer", out.display());
    Ok(())
}
