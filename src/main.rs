//! The `anetrain` command line: argument parsing and dispatch (implementations in `cli/`).

mod cli;

use cli::commands::{
    StepArgs, bench_attention, bench_gemm, bench_lora_gemm, bench_step, convert, eval, generate, info, prepare,
    prepare_chat,
};
use cli::train::train;

use anetrain::config::ModelConfig;
use anetrain::ops::Par;
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cli::choices::{AneBenchArg, BackendArg, DialectArg, DialectChoice, GemmArg, LayoutArg, Llama2cFormatArg};
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
    /// Watch a training run in the terminal: `dashboard -- <train arguments>` runs it,
    /// `dashboard --attach run.jsonl` follows a running or finished run's log.
    Dashboard {
        /// Follow this telemetry log instead of starting a run.
        #[arg(long)]
        attach: Option<PathBuf>,
        /// `train` arguments (after `--`).
        #[arg(last = true, allow_hyphen_values = true)]
        train_args: Vec<String>,
    },
    /// Plot telemetry logs (loss vs updates and tokens, learning rate, gradient norm,
    /// tokens/s; several runs overlaid), or export them as CSV.
    Plot {
        /// Logs written by `train --log`.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Output file (default: loss.png, loss.svg with --svg, telemetry.csv with --csv).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write SVG instead of PNG.
        #[arg(long, conflicts_with = "csv")]
        svg: bool,
        /// Write every update as a CSV row instead of a plot.
        #[arg(long)]
        csv: bool,
    },
    // Negative numbers parse as values, so validation can say what is wrong with them.
    #[command(allow_negative_numbers = true)]
    /// Train a model (defaults: stories2m on the built-in story corpus, 400 updates, ~2-3 minutes on 2 cores).
    Train(Box<TrainArgs>),
    /// Print a model's shape, parameter count and FLOPs per token.
    Info {
        /// Preset name, path to an HF config.json, or a .gguf file.
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
    /// Convert a model between HF directories, llama2.c .bin files and GGUF files.
    Convert {
        /// HF model directory, llama2.c .bin, .gguf, or training checkpoint directory.
        #[arg(long)]
        from: PathBuf,
        /// Output: a directory (HF), a file ending in .bin (llama2.c) or .gguf (GGUF).
        #[arg(long)]
        to: PathBuf,
        /// Matrix dtype: f32 or bf16 for HF; f32, f16 or q8_0 for GGUF.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: ExportDtype,
        /// llama2.c format of a .bin export.
        #[arg(long, value_enum, default_value = "legacy")]
        llama2c_format: Llama2cFormatArg,
        /// Merge these LoRA adapters (a PEFT adapter directory or a LoRA checkpoint) into
        /// --from, the base they were trained on, and write the merged model.
        #[arg(long)]
        merge_lora: Option<PathBuf>,
    },
    // Negative numbers parse as values, so validation can say what is wrong with them.
    #[command(allow_negative_numbers = true)]
    /// Tokenize a corpus into train.tok, val.tok and the tokenizer (tokenizer.json; tokenizer.bin for
    /// a sentencepiece or llama2.c tokenizer).
    Prepare {
        /// tokenizer.json (HF), tokenizer.model (sentencepiece), tokenizer.bin (llama2.c), or
        /// `bpe:N` to train a byte-level BPE of N entries on the input.
        #[arg(long, default_value = "bpe:4096")]
        tokenizer: String,
        /// Inputs: .txt or .md files (blank-line-separated documents), .jsonl files (`text`
        /// field), directories (searched at any depth; other files are skipped and named), or
        /// `builtin:stories:N`.
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
        /// The inputs are chat examples (.jsonl lines `{"messages": [...]}` or `{"prompt": ...,
        /// "completion": ...}`), rendered with the chat template and masked so that only
        /// assistant tokens are trained on.
        #[arg(long)]
        chat: bool,
        /// A Jinja chat template file (default: `chat_template` of the tokenizer_config.json
        /// beside --tokenizer).
        #[arg(long, requires = "chat")]
        chat_template: Option<PathBuf>,
        #[command(flatten)]
        rt: Runtime,
    },
    // Negative numbers parse as values, so validation can say what is wrong with them.
    #[command(allow_negative_numbers = true)]
    /// Generate from a model: prefill the prompt in one pass, decode from a KV cache.
    Generate {
        /// HF model directory, llama2.c .bin, .gguf, or training checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapters (a PEFT adapter directory or a LoRA checkpoint) to apply to --model.
        #[arg(long)]
        lora: Option<PathBuf>,
        /// The prompt as raw token ids, comma-separated (e.g. `1,2,3`); ids are printed.
        #[arg(long, value_delimiter = ',', required_unless_present = "prompt", conflicts_with = "prompt")]
        ids: Vec<u32>,
        /// The prompt as text (with --tokenizer, or the model's own: a GGUF file's, an HF
        /// directory's, or the one saved with a checkpoint); text is printed as it is decoded.
        #[arg(long)]
        prompt: Option<String>,
        /// tokenizer.json, tokenizer.model, tokenizer.bin, or a directory made by prepare
        /// (default: the model's own; a checkpoint refuses another than it was trained with).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Stop after this token id (e.g. the tokenizer's end-of-sequence).
        #[arg(long)]
        eos: Option<u32>,
        #[command(flatten)]
        quant: QuantArgs,
        #[command(flatten)]
        rt: Runtime,
    },
    /// Talk to a model in the terminal with its chat template; replies stream as they are
    /// decoded and the conversation stays in the KV cache.
    Chat(cli::chat::ChatArgs),
    // Negative numbers parse as values, so validation can say what is wrong with them.
    #[command(allow_negative_numbers = true)]
    /// An OpenAI-compatible HTTP server (chat and text completions, streaming, continuous
    /// batching) with a chat page at `/`.
    Serve(cli::serve::ServeArgs),
    /// Mean cross-entropy and perplexity over consecutive windows of a token file.
    Eval {
        /// HF model directory, llama2.c .bin, .gguf, or training checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapters (a PEFT adapter directory or a LoRA checkpoint) to apply to --model.
        #[arg(long)]
        lora: Option<PathBuf>,
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
        /// With --quant: every window runs through the KV-cache decoder with quantized
        /// matrices (as decoding does), 64 positions per pass.
        #[command(flatten)]
        quant: QuantArgs,
        #[command(flatten)]
        rt: Runtime,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportDtype {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

/// `--quant` of `generate`, `chat`, `serve` and `eval`.
#[derive(Args, Clone, Debug)]
pub(crate) struct QuantArgs {
    /// Decode with quantized matrices: q8_0 (W8A8), q4_0 (W4A8, classifier q8_0), or gguf (a
    /// GGUF file's own Q8_0/Q4_0/Q4_1 tensors as stored). Embeddings and norms stay f32.
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
}

impl QuantArgs {
    fn mode(&self) -> Option<anetrain::quant::weights::QuantMode> {
        use anetrain::quant::weights::QuantMode;
        self.quant.map(|q| match q {
            QuantArg::Q8_0 => QuantMode::Q8_0,
            QuantArg::Q4_0 => QuantMode::Q4_0,
            QuantArg::Gguf => QuantMode::Gguf,
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    Gguf,
}

/// How `generate`, `chat` and `serve` pick each next token.
#[derive(Args, Clone, Debug)]
pub(crate) struct SamplingArgs {
    /// Softmax temperature; 0 = greedy (argmax).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = all).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Keep the k most likely tokens (0 = no cut).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampling seed (generate and chat: 1337 when not given; serve: see above).
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    /// The checked settings, with `seed` standing in for a missing --seed.
    fn sampling(&self, seed: u64) -> Result<anetrain::generate::Sampling> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a non-negative number, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(anetrain::generate::Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed.unwrap_or(seed),
        })
    }
}

/// The seed of `generate` and `chat` without --seed.
pub(crate) const DEFAULT_SEED: u64 = 1337;

#[derive(Args, Clone)]
struct Runtime {
    /// Worker threads (rayon pool and GEMM); default: all cores; at most 4 per core.
    #[arg(long)]
    threads: Option<usize>,
    /// GEMM implementation for every matrix product.
    #[arg(long, value_enum, default_value = "gemm")]
    gemm: GemmArg,
}

impl Runtime {
    /// Builds the thread pool every op runs in; the count is explicit, never inherited.
    fn setup(&self) -> Result<(Par, rayon::ThreadPool)> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Past a few threads per core the GEMMs and row blocks only split finer; thousands of
        // threads would exhaust the process's stacks before doing any work.
        let cap = 4 * cores;
        let threads = match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) if n > cap => {
                eprintln!("note: --threads {n} is more than 4 per core on this {cores}-core machine; using {cap}");
                cap
            }
            Some(n) => n,
            None => cores,
        };
        let gemm = anetrain::ops::GemmImpl::from(self.gemm);
        if !gemm.available() {
            bail!("--gemm blas needs a build with `--features blas` (and libopenblas-dev on Linux)");
        }
        // matrixmultiply reads its thread cap from the environment, once, on first use.
        // SAFETY: set before any other thread exists in this process.
        unsafe { std::env::set_var("MATMUL_NUM_THREADS", threads.to_string()) };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("cannot start thread pool")?;
        Ok((Par { threads, gemm }, pool))
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

/// `--ane-mode`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AneModeArg {
    /// Weights as kernel inputs; every kernel compiled once.
    Dynamic,
    /// Weights baked into per-layer programs, recompiled every --recompile-every updates.
    Static,
}

/// `--dp-reduce`: how data-parallel ranks sum gradients.
#[derive(Clone, Copy, ValueEnum)]
enum DpReduce {
    /// Fixed-order sum: bit-identical to one process with the same --accum and --exact-accum.
    Exact,
    /// MPI_Allreduce: the library's summation order (not bit-exact).
    Allreduce,
}

impl DpReduce {
    fn mode(self) -> anetrain::dist::ReduceMode {
        match self {
            DpReduce::Exact => anetrain::dist::ReduceMode::Exact,
            DpReduce::Allreduce => anetrain::dist::ReduceMode::Allreduce,
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Preset (stories260k, stories2m, stories15m, stories42m, stories110m, qwen3-0.6b), HF
    /// config.json, or .gguf (its shape; random weights) [default: stories2m].
    #[arg(long, conflicts_with = "init")]
    model: Option<String>,
    /// Start from a pretrained model's weights (HF directory, .gguf, llama2.c .bin or training
    /// checkpoint) with a fresh optimizer; the shape comes from it, and raw-text --data is
    /// tokenized with its own tokenizer.
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
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
    backend: BackendArg,
    /// How the MIL backends pass weights: `packed` into one input with the activations (the
    /// original system's layout) or `separate` function inputs.
    #[arg(long, value_enum, default_value = "packed")]
    mil_layout: LayoutArg,
    /// Run the per-layer dW GEMMs on a CPU worker thread beside the backend's kernels
    /// (results are bit-identical either way).
    #[arg(long, value_enum, default_value = "auto")]
    dw_overlap: DwOverlap,
    /// How the MIL backends give kernels their weights: `dynamic` (inputs, compiled once) or
    /// `static` (baked into per-layer programs as constants, recompiled every
    /// --recompile-every updates, stale in between; the original's large-model pipeline).
    #[arg(long, value_enum, default_value = "dynamic")]
    ane_mode: AneModeArg,
    /// MIL text dialect of the programs the MIL backends compile: `auto` (on `ane` by the
    /// chip: ios16 on M1/M2, ios18 later; on `mil-sim` ios18), `ios18` or `ios16`. Only the
    /// spelling differs: the numbers are the same.
    #[arg(long, value_enum, default_value = "auto")]
    mil_dialect: DialectChoice,
    /// Write every MIL program the run compiles, as compiled (dialect included), under this
    /// directory (`NNNN-<kernel>/model.mil` and weights; numbering continues across resumes).
    #[arg(long)]
    mil_dump: Option<PathBuf>,
    /// Run the classifier and the loss over only the token ids that occur in the training
    /// (and validation) data: softmax over that subset; other rows of the embedding and
    /// classifier stay untouched. Checkpoints keep the full vocabulary.
    #[arg(long)]
    compact_vocab: bool,
    /// Static mode: updates between recompiles of the baked weights.
    #[arg(long, default_value_t = 10)]
    recompile_every: usize,
    /// Kernel compiles one process may make (default: 100 on `ane`, which fails past about
    /// 119; no limit on `mil-sim`). When the next recompile would pass it, training
    /// checkpoints (needs --ckpt-dir) and re-executes itself with `--resume latest`.
    #[arg(long)]
    compile_budget: Option<usize>,
    /// The most compile-budget restarts one run may make (counted across processes through
    /// the ANETRAIN_RESTARTS environment variable).
    #[arg(long, default_value_t = 10_000)]
    max_restarts: usize,
    /// Write one JSON line per update to this file.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Print every N-th update (the first and last always print).
    #[arg(long, default_value_t = 10)]
    print_every: usize,
    /// Tokens of the sample printed after training (0: none).
    #[arg(long, default_value_t = 160)]
    sample_tokens: usize,
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
    /// Write checkpoints into this directory (one always at the end of the run). It is locked
    /// for the run; a fresh run needs it empty (or --overwrite).
    #[arg(long)]
    ckpt_dir: Option<PathBuf>,
    /// Let a fresh run (or a resume from elsewhere) remove the checkpoints already in
    /// --ckpt-dir.
    #[arg(long)]
    overwrite: bool,
    /// Also checkpoint every N updates.
    #[arg(long, default_value_t = 0)]
    ckpt_every: usize,
    /// Keep only the newest K checkpoints (0 = all).
    #[arg(long, default_value_t = 3)]
    keep_last: usize,
    /// Continue from a checkpoint: a step directory, or `latest` (in --ckpt-dir), or a
    /// checkpoint directory. Model, token data, --batch, --seq and --accum must match; --steps
    /// (the total), the lr schedule and logging may change. Resuming from an earlier step of
    /// --ckpt-dir moves its later steps into superseded-<time>/.
    #[arg(long)]
    resume: Option<String>,
    /// Under mpirun (a build with `--features mpi`), how the ranks sum gradients: `exact`
    /// (fixed order: bit-identical to one process with the same --accum and --exact-accum) or `allreduce`
    /// (MPI_Allreduce: faster with several micro-batches per rank, not bit-exact).
    #[arg(long, value_enum)]
    dp_reduce: Option<DpReduce>,
    /// With --accum > 1 in one process: sum the micro-batch gradients in the fixed order that
    /// `mpirun` ranks with `--dp-reduce exact` use, so the weights are bit-identical to theirs
    /// (one more gradient-sized buffer, a few % slower). Off: gradients accumulate in place.
    #[arg(long)]
    exact_accum: bool,
    /// Under mpirun: end a rank whose MPI call has waited this many seconds (a dead rank or
    /// network); longer than rank 0's slowest evaluation or checkpoint.
    #[arg(long, default_value_t = 600)]
    dp_timeout: u64,
    /// Train LoRA adapters of this rank on the frozen model instead of every weight
    /// (checkpoints then hold the adapters as a PEFT adapter directory).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha: the adapters are scaled by alpha / rank (default: 2 × rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Projections to adapt: a comma list of q, k, v, o, gate, up, down, or `all`.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    lora_targets: String,
    /// With --lora-rank: `bf16` holds the frozen layer weights in bf16 (half their memory; the
    /// layers then compute with the bf16-rounded weights).
    #[arg(long, value_enum, default_value = "f32")]
    base_dtype: BaseDtype,
    /// With --base-dtype bf16: run the frozen layers' projections as bf16 GEMMs (AVX-512 BF16,
    /// activations rounded to bf16 as PyTorch's bf16 autocast does, f32 accumulation), the
    /// adapters applied beside them in f32. On a CPU without AVX-512 BF16 a notice is printed
    /// and the f32 GEMMs run. Changes the numerics (docs/BENCHMARKS.md §12); off by default.
    #[arg(long)]
    bf16_matmul: bool,
    /// With --bf16-matmul: run the attention core's products (q·kᵀ, p·v and their backward)
    /// on bf16 inputs too, as PyTorch's bf16 autocast does; the softmax and saved
    /// probabilities stay f32. Faster, and less exact than --bf16-matmul alone when
    /// attention scores are large (docs/BENCHMARKS.md §12); off by default.
    #[arg(long)]
    bf16_attention: bool,
    #[command(flatten)]
    rt: Runtime,
}

/// How a LoRA run holds its frozen base (`--base-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BaseDtype {
    F32,
    Bf16,
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
    /// Parse and type-check MIL files (this crate's subset); errors give line and column.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write every kernel's MIL program and weight blob files, plus manifest.json.
    Emit {
        /// Preset name or path to an HF config.json.
        #[arg(long, default_value = "stories110m")]
        model: String,
        /// Sequence length T the kernels are built for (padded to a multiple of 32).
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, value_enum, default_value = "packed")]
        layout: LayoutArg,
        /// MIL text dialect: `ios18` (program 1.3) or `ios16` (program 1.0, for M1/M2).
        #[arg(long, value_enum, default_value = "ios18")]
        mil_dialect: DialectArg,
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
        /// Sequence length; the default 40 pads to 64, so the padded positions are checked.
        #[arg(long, default_value_t = 40)]
        seq: usize,
        #[arg(long, value_enum, default_value = "packed")]
        layout: LayoutArg,
        /// MIL dialect; `auto` chooses from the chip's reported aneSubType (M1/M2: ios16,
        /// later: ios18; table in src/ane/chips.rs).
        #[arg(long, value_enum, default_value = "auto")]
        mil_dialect: DialectChoice,
    },
    /// The benchmark programs: on a Mac, ms per evaluation, weight MB, TFLOP/s and share of
    /// the chip's rated peak; anywhere, `--emit DIR` writes them and checks each in mil-sim.
    Bench {
        #[arg(value_enum)]
        kind: AneBenchArg,
        /// One JSON object (chip, macOS, every figure, the command) for docs/ANE_RESULTS.md.
        #[arg(long)]
        json: bool,
        /// Write the programs here and check a small instance of each in the simulator
        /// against a CPU reference, instead of running them.
        #[arg(long)]
        emit: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        #[arg(long, default_value_t = 50)]
        iters: usize,
        /// Run one program of this many channels instead of the suite (with --sp, --depth).
        #[arg(long)]
        ch: Option<usize>,
        /// Spatial positions of the --ch program (default 64).
        #[arg(long)]
        sp: Option<usize>,
        /// Convs in the --ch program's chain (default 1).
        #[arg(long)]
        depth: Option<usize>,
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
        which: Option<GemmArg>,
        /// Seconds of repetitions per shape and implementation.
        #[arg(long, default_value_t = 0.5, value_parser = parse_budget)]
        budget: f64,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// GFLOP/s of every GEMM a LoRA micro-step with `--base-dtype bf16 --bf16-matmul`
    /// issues: the base projections on the f32 GEMM and the bf16 GEMM (and its packing
    /// share), and the rank-r adapter products on the f32 GEMM.
    LoraGemm {
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Seconds of repetitions per product and kernel.
        #[arg(long, default_value_t = 0.3, value_parser = parse_budget)]
        budget: f64,
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Measure only the base projections or only the adapter products.
        #[arg(long, value_parser = ["base", "adapters"])]
        only: Option<String>,
        /// The bf16 GEMM's k-pairs per block (its default unless given).
        #[arg(long)]
        bf16_kcp: Option<usize>,
        /// The bf16 GEMM's columns per block, a multiple of 32 (its default unless given).
        #[arg(long)]
        bf16_nc: Option<usize>,
    },
    /// Median ms of the attention core (QKᵀ, causal softmax, PV, and their backward) at a
    /// model's heads, on the f32 products and on the bf16 ones `--bf16-matmul` runs.
    Attention {
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Seconds of repetitions per direction and path.
        #[arg(long, default_value_t = 0.5, value_parser = parse_budget)]
        budget: f64,
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
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
        backend: BackendArg,
        #[arg(long, value_enum, default_value = "packed")]
        mil_layout: LayoutArg,
        /// MIL dialect on the MIL backends (`auto`: by the chip on `ane`, ios18 on `mil-sim`).
        #[arg(long, value_enum, default_value = "auto")]
        mil_dialect: DialectChoice,
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
    // Piped into `head` and the like, exit quietly when the reader goes away, as command-line
    // tools do, instead of panicking on the first failed print. Rust ignores SIGPIPE by
    // default; restore the default action.
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(err) = run(Cli::parse()) {
        // A data-parallel rank other than 0 whose reason rank 0 reports.
        if err.downcast_ref::<anetrain::dist::QuietExit>().is_some() {
            std::process::exit(1);
        }
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Dashboard { attach, train_args } => cli::dashboard::dashboard(attach, train_args),
        Command::Plot { logs, out, svg, csv } => cli::plot::plot(&logs, out, svg, csv),
        Command::Train(args) => train(*args),
        Command::Info { model, seq } => info(&model, seq),
        Command::Bench(BenchCommand::Gemm { shape, which, budget, threads }) => {
            bench_gemm(&shape.model, shape.batch * shape.seq, which.map(Into::into), budget, threads)
        }
        Command::Bench(BenchCommand::LoraGemm {
            model,
            batch,
            seq,
            rank,
            budget,
            threads,
            json,
            only,
            bf16_kcp,
            bf16_nc,
        }) => {
            let opts = anetrain::bench::lora_gemm::Options { only, bf16_kcp, bf16_nc };
            bench_lora_gemm(&model, batch * seq, rank, budget, threads, json, opts)
        }
        Command::Bench(BenchCommand::Attention { model, batch, seq, budget, threads, json }) => {
            bench_attention(&model, batch, seq, budget, threads, json)
        }
        Command::Bench(BenchCommand::Step {
            shape,
            accum,
            min_micro,
            json,
            dw_overlap,
            backend,
            mil_layout,
            mil_dialect,
            rt,
        }) => {
            let (backend, mil_layout, mil_dialect) = (backend.into(), mil_layout.into(), mil_dialect.dialect());
            let dw_overlap = dw_overlap.forced();
            let step = StepArgs { accum, min_micro, json, dw_overlap, backend, mil_layout, mil_dialect };
            bench_step(&shape.model, shape.batch, shape.seq, step, rt)
        }
        Command::Mil(MilCommand::Check { files }) => {
            for f in &files {
                let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
                let program = anetrain::mil::parse::parse(&text).with_context(|| format!("{}", f.display()))?;
                println!("{}: ok ({} statements)", f.display(), program.func.body.len());
            }
            Ok(())
        }
        Command::Mil(MilCommand::Emit { model, seq, layout, mil_dialect, out }) => {
            let cfg = ModelConfig::resolve(&model)?;
            let written = anetrain::mil::export::write_kernel_set(&cfg, seq, layout.into(), mil_dialect.into(), &out)?;
            println!(
                "wrote {} kernels for {} (T={seq}, {layout:?} layout, {mil_dialect:?} dialect) to {}",
                written,
                cfg.name,
                out.display()
            );
            for note in anetrain::mil::emit::hardware_notes(&cfg) {
                println!("note: {note} (unverified; `anetrain ane probe --model ...` on a Mac settles it)");
            }
            Ok(())
        }
        Command::Ane(AneCommand::Probe { model, seq, layout, mil_dialect }) => {
            anetrain::ane::probe::run(model.as_deref(), seq, layout.into(), mil_dialect.dialect())
        }
        Command::Ane(AneCommand::Bench { kind, json, emit, warmup, iters, ch, sp, depth }) => {
            ane_bench(kind, json, emit, warmup, iters, ch, sp, depth)
        }
        Command::Convert { from, to, dtype, llama2c_format, merge_lora } => {
            convert(&from, &to, dtype, llama2c_format.into(), merge_lora.as_deref())
        }
        Command::Prepare { tokenizer, input, out, val_fraction, seed, chat: false, rt, .. } => {
            prepare(&tokenizer, &input, &out, val_fraction, seed, rt)
        }
        Command::Prepare { tokenizer, input, out, val_fraction, chat: true, chat_template, rt, .. } => {
            prepare_chat(&tokenizer, &input, &out, val_fraction, chat_template.as_deref(), rt)
        }
        Command::Generate { model, lora, ids, prompt, tokenizer, max_tokens, sampling, eos, quant, rt } => {
            let sampling = sampling.sampling(DEFAULT_SEED)?;
            // Raw ids need no tokenizer; --tokenizer is checked against a checkpoint's record.
            // Without it, a text prompt uses the model's own (loaded with the model).
            let tokenizer = match (&prompt, &tokenizer) {
                (_, Some(path)) => cli::commands::model_tokenizer(&model, Some(path))?,
                _ => None,
            };
            let quant = quant.mode();
            generate(&model, lora.as_deref(), &ids, prompt.as_deref(), tokenizer, max_tokens, sampling, eos, quant, rt)
        }
        Command::Chat(args) => cli::chat::chat(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Eval { model, lora, data, seq, batch, batches, json, quant, rt } => {
            eval(&model, lora.as_deref(), &data, seq, batch, batches, json, quant.mode(), rt)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn ane_bench(
    kind: AneBenchArg,
    json: bool,
    emit: Option<PathBuf>,
    warmup: usize,
    iters: usize,
    ch: Option<usize>,
    sp: Option<usize>,
    depth: Option<usize>,
) -> Result<()> {
    use anetrain::mil::benchprog::{Precision, Spec, suite};
    let specs = match ch {
        Some(ch) => {
            let one = |precision| Spec { ch, sp: sp.unwrap_or(64), depth: depth.unwrap_or(1), precision };
            match kind {
                AneBenchArg::Int8 => vec![one(Precision::Fp16), one(Precision::W8a8)],
                _ => vec![one(Precision::Fp16)],
            }
        }
        None if sp.is_some() || depth.is_some() => bail!("--sp and --depth size a --ch program; give --ch too"),
        None => suite(kind.name())?,
    };
    match emit {
        Some(dir) => {
            let failures = anetrain::ane::bench::emit(kind.name(), &specs, &dir, &mut std::io::stdout().lock())?;
            anyhow::ensure!(failures == 0, "{failures} programs disagree with the CPU reference in the simulator");
            Ok(())
        }
        None => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            anetrain::ane::bench::run_device(kind.name(), &specs, warmup, iters, json, &command)
        }
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

/// A benchmark's time budget (`--budget`): finite and non-negative seconds.
fn parse_budget(arg: &str) -> std::result::Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => Err(format!("'{arg}' is not a time budget: give finite, non-negative seconds (e.g. 0.3)")),
    }
}
