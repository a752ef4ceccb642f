//! The other subcommands: info, bench, convert, eval, generate, prepare.

use crate::{ExportDtype, Runtime, group_digits};
use anetrain::backends::BackendKind;
use anetrain::bench;
use anetrain::checkpoint::ModelFormat;
use anetrain::checkpoint::llama2c::Format as Llama2cFormat;
use anetrain::checkpoint::native;
use anetrain::config::ModelConfig;
use anetrain::mil::emit::InputLayout;
use anetrain::ops::{GemmImpl, Par};
use anetrain::quant::weights::{QuantMode, QuantWeights};
use anetrain::tokenizer::Tokenizer;
use anetrain::train::TrainOptions;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The tokenizer for `model`: `explicit` when given (refused if it is not the one a
/// checkpoint records), else the one saved with a checkpoint, or an HF directory's
/// tokenizer.json; None if there is none.
pub fn model_tokenizer(model: &Path, explicit: Option<&Path>) -> Result<Option<Tokenizer>> {
    let is_checkpoint = ModelFormat::of_path(model).is_ok_and(|f| f == ModelFormat::Native);
    match explicit {
        Some(path) => {
            let tok = if path.is_dir() { Tokenizer::load_from_dir(path)? } else { Tokenizer::load(path)? };
            if is_checkpoint
                && let Some(recorded) = native::recorded_tokenizer(model)?
                && recorded != tok.fingerprint
            {
                bail!(
                    "--tokenizer {} is tokenizer {}, but {} was trained with {recorded}; leave out --tokenizer to \
                     use the one saved with the checkpoint",
                    path.display(),
                    tok.fingerprint,
                    model.display()
                );
            }
            Ok(Some(tok))
        }
        None if is_checkpoint => native::saved_tokenizer(model),
        None if model.join("tokenizer.json").is_file() => Ok(Some(Tokenizer::load(&model.join("tokenizer.json"))?)),
        None => Ok(None),
    }
}

pub fn info(model: &str, seq: usize) -> Result<()> {
    // A weights file or checkpoint: its config comes with the weights.
    let path = std::path::Path::new(model);
    let is_weights = path.extension().is_some_and(|e| e == "bin")
        || path.join("state.json").is_file()
        || path.join("latest").is_file()
        || path.join("model.safetensors").is_file()
        || path.join("model.safetensors.index.json").is_file();
    let cfg = if ModelConfig::preset(model).is_none() && is_weights {
        anetrain::checkpoint::load_model(path)?.0
    } else {
        ModelConfig::resolve(model)?
    };
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

pub fn bench_gemm(model: &str, n: usize, which: Option<GemmImpl>, budget: f64, threads: Option<usize>) -> Result<()> {
    let cfg = ModelConfig::resolve(model)?;
    let impls = bench::impls_to_bench(which);
    if impls.iter().any(|g| !g.available()) {
        bail!("--impl blas needs a build with `--features blas`");
    }
    let (par0, pool) = Runtime { threads, gemm: super::choices::GemmArg::Gemm }.setup()?;
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
    print!("{:<49}", "peak: best square (256³, 512³, 1024³)");
    for &gemm in &impls {
        print!(" {:>15.1}", pool.install(|| bench::gemm_peak_gflops(Par { gemm, ..par0 }, budget)));
    }
    println!();
    Ok(())
}

/// `anetrain bench lora-gemm`: a table (or JSON) of `bench::lora_gemm` at `model`'s shapes,
/// with the time each kernel family takes per micro-step and the machine's peaks.
pub fn bench_lora_gemm(
    model: &str,
    n: usize,
    rank: usize,
    budget: f64,
    threads: Option<usize>,
    json: bool,
    opts: anetrain::bench::lora_gemm::Options,
) -> Result<()> {
    use anetrain::bench::lora_gemm::{LoraGemmReport, bench_lora_gemm};
    let cfg = ModelConfig::resolve(model)?;
    if rank == 0 || n == 0 {
        bail!("--rank and --batch·--seq must be at least 1");
    }
    let (par, pool) = Runtime { threads, gemm: super::choices::GemmArg::Gemm }.setup()?;
    let rows = pool.install(|| bench_lora_gemm(&cfg, n, rank, budget, par, &opts))?;
    let f32_peak = pool.install(|| bench::gemm_peak_gflops(par, budget));
    let bf16_peak = pool.install(|| anetrain::ops::gemm_bf16::kernel_peak_gflops(par, budget));
    let report = LoraGemmReport::new(&cfg.name, n, rank, par.threads, f32_peak, bf16_peak, rows);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

/// `anetrain bench attention`: a table (or JSON) of `bench::attention` at `model`'s heads.
pub fn bench_attention(
    model: &str,
    batch: usize,
    seq: usize,
    budget: f64,
    threads: Option<usize>,
    json: bool,
) -> Result<()> {
    let cfg = ModelConfig::resolve(model)?;
    if batch == 0 || seq == 0 {
        bail!("--batch and --seq must be at least 1");
    }
    let (par, pool) = Runtime { threads, gemm: super::choices::GemmArg::Gemm }.setup()?;
    let report = pool.install(|| anetrain::bench::attention::bench_attention(&cfg, batch, seq, budget, par))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// `bench step` options beyond the shape.
pub struct StepArgs {
    pub accum: usize,
    pub min_micro: usize,
    pub json: bool,
    pub dw_overlap: Option<bool>,
    pub backend: BackendKind,
    pub mil_layout: InputLayout,
    /// `--mil-dialect` (None: auto)
    pub mil_dialect: Option<anetrain::mil::dialect::Dialect>,
}

pub fn bench_step(model: &str, batch: usize, seq: usize, step: StepArgs, rt: Runtime) -> Result<()> {
    let StepArgs { accum, min_micro, json, dw_overlap, backend, mil_layout, mil_dialect } = step;
    let cfg = ModelConfig::resolve(model)?;
    let (par, pool) = rt.setup()?;
    let opts = TrainOptions { accum, min_lr: 3e-5, ..TrainOptions::new(1_000_000, batch, seq) };
    opts.validate(&cfg)?;
    crate::cli::train::check_memory(&cfg, batch, seq, usize::from(accum > 1), 0, None, false, 1)?;
    let mil_opts = anetrain::backends::MilOptions {
        layout: mil_layout,
        dialect: mil_dialect,
        ..anetrain::backends::MilOptions::default()
    };
    let (backend, dialect_note) = anetrain::backends::build_mil(backend, &cfg, batch, seq, par, &mil_opts)?;
    if let (Some(note), false) = (dialect_note, json) {
        println!("{note}");
    }
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
        "achieved             {:.1} GFLOP/s = {} ({peak:.1} GFLOP/s, best square SGEMM)",
        r.gflops,
        bench::share_of_peak(r.gflops, peak)
    );
    println!("peak RSS             {:.0} MB", r.peak_rss_mb);
    Ok(())
}

pub fn convert(
    from: &std::path::Path,
    to: &std::path::Path,
    dtype: ExportDtype,
    format: Llama2cFormat,
    merge_lora: Option<&std::path::Path>,
) -> Result<()> {
    use anetrain::checkpoint::ExportDtype as D;
    let dtype = match dtype {
        ExportDtype::F32 => D::F32,
        ExportDtype::F16 => D::F16,
        ExportDtype::Bf16 => D::Bf16,
        ExportDtype::Q8_0 => D::Q8_0,
    };
    let cfg = anetrain::checkpoint::convert(from, to, dtype, format, merge_lora)?;
    println!("wrote {} ({} parameters) from {}", to.display(), group_digits(cfg.param_count()), from.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn eval(
    model: &std::path::Path,
    lora: Option<&std::path::Path>,
    data: &std::path::Path,
    seq: usize,
    batch: usize,
    batches: usize,
    json: bool,
    quant: Option<QuantMode>,
    rt: Runtime,
) -> Result<()> {
    let loaded = anetrain::checkpoint::load_with_lora(model, lora)?;
    let (cfg, params) = (loaded.cfg, loaded.params);
    let qw = quant_weights(model, lora, &cfg, &params, quant)?;
    if seq == 0 || batch == 0 {
        bail!("--seq and --batch must be at least 1");
    }
    if seq > cfg.max_seq_len {
        bail!("--seq {seq} exceeds the model's max_position_embeddings ({})", cfg.max_seq_len);
    }
    // A checkpoint's recorded tokenizer must be the one that made a headed token file.
    let recorded = match ModelFormat::of_path(model)? {
        ModelFormat::Native => anetrain::checkpoint::native::recorded_tokenizer(model)?,
        _ => None,
    };
    let tokens = anetrain::data::TokenData::open(data, cfg.vocab_size, recorded.as_deref())
        .with_context(|| format!("{} was trained on tokens of another tokenizer", model.display()))?;
    let (par, pool) = rt.setup()?;
    let r = pool.install(|| match &qw {
        Some(q) => anetrain::eval::evaluate_quant(&cfg, &params, q, &tokens, seq, batches),
        None => anetrain::eval::evaluate(&cfg, &params, &tokens, seq, batch, batches, par),
    })?;
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

/// The quantized matrices `--quant` asks for (None without it), with a line on stderr
/// saying what is used.
pub fn quant_weights(
    model: &std::path::Path,
    lora: Option<&std::path::Path>,
    cfg: &ModelConfig,
    params: &[f32],
    mode: Option<QuantMode>,
) -> Result<Option<QuantWeights>> {
    let Some(mode) = mode else { return Ok(None) };
    if mode == QuantMode::Gguf && lora.is_some() {
        bail!(
            "--quant gguf reads the file's tensors as stored, without --lora's adapters; use --quant q8_0 or q4_0 with --lora"
        );
    }
    let q = QuantWeights::load(model, cfg, params, mode)?;
    eprintln!("{}", q.summary());
    Ok(Some(q))
}

#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &std::path::Path,
    lora: Option<&std::path::Path>,
    ids: &[u32],
    prompt: Option<&str>,
    tokenizer: Option<anetrain::tokenizer::Tokenizer>,
    max_tokens: usize,
    sampling: anetrain::generate::Sampling,
    eos: Option<u32>,
    quant: Option<QuantMode>,
    rt: Runtime,
) -> Result<()> {
    use std::io::Write;
    let loaded = anetrain::checkpoint::load_with_lora(model, lora)?;
    let (cfg, params) = (&loaded.cfg, &loaded.params);
    let mut ids = ids.to_vec();
    let mut eos = eos;
    let tokenizer = match (tokenizer, loaded.tokenizer) {
        (Some(t), _) => {
            // Text prompts start a document (BOS / document token) and stop at the next one.
            if let Some(text) = prompt {
                ids = t.doc_token.into_iter().chain(t.encode(text)?).collect();
                eos = eos.or(t.doc_token);
            }
            Some(t)
        }
        (None, Some(t)) => {
            // The model's own tokenizer. A model that declares BOS/EOS (GGUF, HF) gets its BOS
            // only where its files ask for it, and stops at its EOS; one that does not (a
            // checkpoint) starts and stops at the document token, as with --tokenizer.
            if let Some(text) = prompt {
                if loaded.bos.is_some() || loaded.eos.is_some() {
                    let bos = loaded.bos.filter(|_| loaded.add_bos);
                    ids = bos.into_iter().chain(t.encode(text)?).collect();
                    eos = eos.or(loaded.eos);
                } else {
                    ids = t.doc_token.into_iter().chain(t.encode(text)?).collect();
                    eos = eos.or(t.doc_token);
                }
            }
            Some(t)
        }
        (None, None) if prompt.is_some() => {
            bail!(
                "--prompt needs --tokenizer: {} has no tokenizer saved with it (or pass raw ids with --ids)",
                model.display()
            )
        }
        (None, None) => None,
    };
    let tokenizer = tokenizer.as_ref();
    let ids = &ids[..];
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!("prompt token id {bad} is outside the model's vocabulary ({})", cfg.vocab_size);
    }
    if let Some(e) = eos
        && e as usize >= cfg.vocab_size
    {
        bail!("--eos {e} is outside the model's vocabulary ({})", cfg.vocab_size);
    }
    if ids.len() > cfg.max_seq_len {
        bail!("the prompt is {} tokens; the model has {} positions", ids.len(), cfg.max_seq_len);
    }
    let room = cfg.max_seq_len - ids.len();
    if max_tokens > room {
        eprintln!(
            "note: --max-tokens {max_tokens} capped at {room} (the model's {} positions less the {}-token prompt)",
            cfg.max_seq_len,
            ids.len()
        );
    }
    let qw = quant_weights(model, lora, cfg, params, quant)?;
    // Echoed only once the prompt is known to be usable.
    if let Some(text) = prompt.filter(|_| tokenizer.is_some()) {
        print!("{text}");
    }
    let (par, pool) = rt.setup()?;
    let (prefill_s, decode_s, n) = pool.install(|| {
        // Text is printed as the difference between successive decodings of everything
        // generated so far (a token may be half of a character).
        let (mut generated, mut shown) = (Vec::new(), 0usize);
        anetrain::generate::generate(cfg, params, qw.as_ref(), ids, max_tokens, sampling, eos, par, |t| {
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
    // The first token comes from the prefill's logits: a decode rate needs two or more.
    let rate = if n >= 2 {
        format!("{:.1} tokens/s", (n - 1) as f64 / decode_s.max(1e-9))
    } else {
        String::from("no rate: the only token came from the prefill")
    };
    eprintln!(
        "prefill: {} tokens in {:.1} ms ({:.0} tokens/s); decode: {n} token{} in {:.1} ms ({rate})",
        ids.len(),
        prefill_s * 1e3,
        ids.len() as f64 / prefill_s,
        if n == 1 { "" } else { "s" },
        decode_s * 1e3,
    );
    Ok(())
}

pub fn prepare(
    tokenizer: &str,
    inputs: &[String],
    out: &std::path::Path,
    val_fraction: f64,
    seed: u64,
    rt: Runtime,
) -> Result<()> {
    let (_, pool) = rt.setup()?;
    let start = std::time::Instant::now();
    let (mut docs, mut skipped) = (Vec::new(), Vec::new());
    for input in inputs {
        docs.extend(anetrain::prepare::read_documents(input, seed, &mut skipped)?);
    }
    if let Some(note) = anetrain::prepare::skipped_note(&skipped) {
        eprintln!("note: {note}");
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

pub fn prepare_chat(
    tokenizer: &str,
    inputs: &[String],
    out: &std::path::Path,
    val_fraction: f64,
    template_file: Option<&std::path::Path>,
    rt: Runtime,
) -> Result<()> {
    use anetrain::chat::data::{read_examples, template_for};
    if tokenizer.starts_with("bpe:") {
        bail!("prepare --chat needs the model's tokenizer (--tokenizer path/to/tokenizer.json), not {tokenizer}");
    }
    let (_, pool) = rt.setup()?;
    let mut examples = Vec::new();
    for input in inputs {
        examples.extend(read_examples(std::path::Path::new(input))?);
    }
    let tok = anetrain::tokenizer::Tokenizer::load(std::path::Path::new(tokenizer))?;
    let template = template_for(std::path::Path::new(tokenizer), template_file, &tok)?;
    if template.is_none() {
        eprintln!(
            "note: no chat template found (tokenizer_config.json beside the tokenizer, or --chat-template); prompt/completion lines are joined as plain text"
        );
    }
    let s = pool.install(|| anetrain::prepare::prepare_chat(&examples, &tok, template.as_ref(), out, val_fraction))?;
    println!(
        "{} examples, {} train + {} validation tokens (loss on assistant tokens only), vocabulary {} ({}), {:.2} s",
        s.documents,
        s.train_tokens,
        s.val_tokens,
        tok.vocab_size(),
        tok.fingerprint,
        s.seconds
    );
    println!("wrote {}/train.tok, val.tok, the tokenizer and its chat template", out.display());
    Ok(())
}
