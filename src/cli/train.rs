//! `anetrain train`: data, model, backend and trainer from the command line; the run, its
//! report, and a sample from the trained model.

use crate::{TrainArgs, group_digits};
use anetrain::backend::Backend;
use anetrain::bench;
use anetrain::config::ModelConfig;
use anetrain::data::SYNTHETIC_ENTROPY;
use anetrain::dist;
use anetrain::ops::Par;
use anetrain::telemetry::{Header, Record, Report, Telemetry};
use anetrain::train::adamw::AdamWConfig;
use anetrain::train::loss_scale::LossScaleMode;
use anetrain::train::{TrainOptions, Trainer};
use anyhow::{Context, Result, bail};
use indicatif::{HumanDuration, ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Refuses a run whose weights, optimizer state, activations and logits cannot fit in the
/// memory this process may use, before allocating any of them. `extra_arenas` counts further
/// f32 buffers the size of the trained arena (the micro-batch gradient of --accum);
/// `exchange_values` the data-parallel exchange's f32 buffers (`dist::Plan::buffer_values`:
/// with LoRA, sized by the adapters). With LoRA the frozen base needs only its weights; the
/// adapters need weights, gradients, AdamW moments and a layer-sized merge scratch.
/// `local_ranks` processes of a data-parallel job share this machine's memory, each needing
/// as much.
#[allow(clippy::too_many_arguments)]
pub fn check_memory(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    extra_arenas: usize,
    exchange_values: usize,
    lora: Option<&anetrain::lora::LoraConfig>,
    base_bf16: bool,
    local_ranks: usize,
) -> Result<()> {
    let mut estimate = anetrain::model::memory_estimate(cfg, batch, seq, lora.is_none());
    let trained = match lora {
        None => cfg.param_count(),
        Some(lc) => {
            anetrain::lora::memory_estimate(cfg, lc, batch * seq, base_bf16, &mut estimate);
            lc.adapter_count(cfg)
        }
    };
    if extra_arenas > 0 {
        let bytes = anetrain::memory::f32_bytes(&[extra_arenas, trained]);
        estimate.add("gradient buffers (--accum)", bytes);
    }
    if exchange_values > 0 {
        estimate.add("data-parallel exchange buffers", anetrain::memory::f32_bytes(&[exchange_values]));
    }
    let fix = if local_ranks > 1 {
        "start fewer ranks per machine (mpirun -np, or a hostfile's slots), or lower --batch or --seq"
    } else {
        "lower --batch or --seq (--accum keeps the tokens per update), or choose a smaller --model"
    };
    estimate.ensure_copies(&format!("training {} with --batch {batch} --seq {seq}", cfg.name), fix, local_ranks)
}

/// How a rank exchanges gradients: over the whole parameter arena, or with LoRA over the
/// adapter arena only.
fn dist_plan(
    cfg: &ModelConfig,
    lora: Option<&anetrain::lora::LoraConfig>,
    rank: usize,
    size: usize,
    accum: usize,
    mode: dist::ReduceMode,
) -> Result<dist::Plan> {
    let layout = anetrain::params::ParamLayout::new(cfg);
    match lora {
        None => dist::Plan::new(&layout, rank, size, accum, mode),
        Some(lc) => dist::Plan::for_lora(&anetrain::lora::LoraLayout::new(cfg, &layout, lc)?, rank, size, accum, mode),
    }
}

/// Prints what the trained model writes after "Once upon a time".
fn sample_story(
    cfg: &ModelConfig,
    params: &[f32],
    tok: &anetrain::tokenizer::Tokenizer,
    max_new: usize,
    seed: u64,
    par: Par,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let mut prompt: Vec<u32> = tok.doc_token.into_iter().collect();
    prompt.extend(tok.encode("Once upon a time")?);
    let sampling = anetrain::generate::Sampling { temperature: 0.8, top_k: 0, top_p: 0.9, seed };
    let mut ids = prompt.clone();
    let max_new = max_new.min(cfg.max_seq_len.saturating_sub(prompt.len()));
    pool.install(|| {
        anetrain::generate::generate(cfg, params, None, &prompt, max_new, sampling, tok.doc_token, par, |t| ids.push(t))
    })?;
    let text = tok.decode(&ids)?;
    println!("--- sample (temperature 0.8, top-p 0.9) ---\n{}", text.trim());
    Ok(())
}

/// The MPI job this process is a rank of, when an MPI launcher started it.
#[cfg(feature = "mpi")]
type MpiJob = Option<anetrain::dist::mpi::MpiRuntime>;
#[cfg(not(feature = "mpi"))]
type MpiJob = Option<std::convert::Infallible>;

/// Joins the MPI job when `mpirun` started this process (silencing ranks > 0); refuses MPI
/// options and launchers in a build without the `mpi` feature.
fn start_mpi(args: &TrainArgs) -> Result<MpiJob> {
    #[cfg(feature = "mpi")]
    {
        if dist::launched_by_mpi().is_none() {
            return Ok(None);
        }
        let job = dist::mpi::MpiRuntime::start(std::time::Duration::from_secs(args.dp_timeout.max(1)))?;
        if job.rank != 0 {
            dist::silence_stdout()?;
        }
        dist::check_divides(job.rank, job.size, args.accum)?;
        Ok(Some(job))
    }
    #[cfg(not(feature = "mpi"))]
    {
        dist::check_no_mpi_build(args.dp_reduce.is_some())?;
        Ok(None)
    }
}

pub fn train(args: TrainArgs) -> Result<()> {
    anyhow::ensure!(
        !args.bf16_matmul || (args.base_dtype == crate::BaseDtype::Bf16 && args.lora_rank.is_some()),
        "--bf16-matmul needs --lora-rank and --base-dtype bf16 (the bf16 GEMMs multiply the frozen bf16 base)"
    );
    anyhow::ensure!(!args.bf16_attention || args.bf16_matmul, "--bf16-attention needs --bf16-matmul");
    let job = start_mpi(&args)?;
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    let (rank, ranks) = job.as_ref().map_or((0, 1), |j| {
        #[cfg(feature = "mpi")]
        return (j.rank, j.size);
        #[cfg(not(feature = "mpi"))]
        match *j {}
    });
    let mode = args.dp_reduce.map_or(dist::ReduceMode::Exact, |d| d.mode());
    // --init: the model's config, weights and tokenizer; the weights go into the trainer below.
    let (cfg, mut init) = match &args.init {
        Some(path) => {
            let m = anetrain::checkpoint::load(path)?;
            println!("initialising from {} ({} parameters)", path.display(), group_digits(m.cfg.param_count()));
            (m.cfg.clone(), Some(m))
        }
        None => (ModelConfig::resolve(args.model.as_deref().unwrap_or("stories2m"))?, None),
    };
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
        base_bf16: args.base_dtype == crate::BaseDtype::Bf16,
        exact_accum: args.exact_accum,
        lora: match args.lora_rank {
            None => None,
            Some(rank) => Some(anetrain::lora::LoraConfig {
                rank,
                alpha: args.lora_alpha.unwrap_or(2.0 * rank as f64),
                targets: anetrain::lora::Target::parse_list(&args.lora_targets)?,
            }),
        },
    };
    if opts.lora.is_none() && args.lora_alpha.is_some() {
        bail!("--lora-alpha needs --lora-rank");
    }
    opts.validate(&cfg)?;
    // Gradient buffers beyond weights, gradients and optimizer state: one process with
    // --accum > 1 --exact-accum keeps one micro-batch's gradient apart; a rank keeps the
    // exchange's buffers, of the adapter arena with LoRA (only its gradient is exchanged).
    let extra = usize::from(job.is_none() && args.accum > 1 && args.exact_accum);
    let exchange = match &job {
        None => 0,
        Some(_) => dist_plan(&cfg, opts.lora.as_ref(), rank, ranks, args.accum, mode)?.buffer_values(),
    };
    let local_ranks = if job.is_some() { dist::ranks_on_this_machine() } else { 1 };
    check_memory(&cfg, args.batch, args.seq, extra, exchange, opts.lora.as_ref(), opts.base_bf16, local_ranks)?;
    // The checkpoint directory is locked before anything in it is read or written; only rank
    // 0 of a data-parallel job writes it (the others only read a checkpoint to resume).
    let static_mode = args.ane_mode == crate::AneModeArg::Static;
    if static_mode && job.is_some() {
        bail!("--ane-mode static restarts processes past the compile budget, which mpirun cannot follow; use dynamic");
    }
    let ane_mode = if static_mode {
        anetrain::backends::AneMode::Static { every: args.recompile_every }
    } else {
        anetrain::backends::AneMode::Dynamic
    };
    let compile_budget =
        args.compile_budget.or(matches!(args.backend, crate::cli::choices::BackendArg::Ane)
            .then_some(anetrain::backends::ANE_COMPILE_BUDGET));
    let restarts = super::restart::restarts_so_far()?;
    let lock = match &args.ckpt_dir {
        Some(dir) if rank == 0 => {
            let lock = anetrain::checkpoint::rundir::lock(dir)?;
            anetrain::checkpoint::native::check_writable(dir)?;
            Some(lock)
        }
        _ => None,
    };
    let checkpoint = match &args.resume {
        Some(spec) => {
            let path = match (spec.as_str(), &args.ckpt_dir) {
                ("latest", Some(dir)) => dir.clone(),
                ("latest", None) => bail!("--resume latest needs --ckpt-dir"),
                (other, _) => PathBuf::from(other),
            };
            let checkpoint = anetrain::checkpoint::native::load(&path)?;
            if checkpoint.step >= args.steps {
                println!(
                    "nothing to do: already at step {} ({}); --steps {} is the total number of updates, raise it \
                     to continue",
                    checkpoint.step,
                    checkpoint.path.display(),
                    args.steps
                );
                return Ok(());
            }
            Some(checkpoint)
        }
        None => {
            if let Some(dir) = &args.ckpt_dir
                && rank == 0
            {
                for note in anetrain::checkpoint::rundir::prepare(dir, None, args.overwrite)? {
                    println!("{note}");
                }
            }
            None
        }
    };
    // A static run that will need a restart must have somewhere to checkpoint, known now
    // rather than when the budget runs out. Per bake: 8 weight-bearing kernels per layer.
    if let (anetrain::backends::AneMode::Static { every }, Some(budget), None) =
        (ane_mode, compile_budget, &args.ckpt_dir)
    {
        let start = checkpoint.as_ref().map_or(0, |c| c.step);
        let bakes = (start..args.steps).filter(|&u| u == start || u % every.max(1) == 0).count();
        let needed = 2 + bakes * 8 * cfg.n_layers;
        if needed > budget {
            bail!(
                "--ane-mode static needs about {needed} compiles for this run and --compile-budget is {budget}: give \
                 --ckpt-dir so that it can checkpoint and restart past the budget"
            );
        }
    }
    // --init's chat template (GGUF `tokenizer.chat_template`, HF tokenizer_config.json), for
    // chat examples in --data.
    let model_template = match &init {
        Some(m) => match (&m.chat_template, &m.tokenizer) {
            (Some(src), Some(tok)) => {
                let text_of = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
                let template = anetrain::chat::template::ChatTemplate::new(src, &text_of(m.bos), &text_of(m.eos));
                Some(template.with_context(|| format!("in the chat template of {}", m.cfg.name))?)
            }
            _ => None,
        },
        None => None,
    };
    let min_tokens = args.batch * (args.seq + 1) * 4;
    let prepared = anetrain::prepare::training_data(
        &args.data,
        cfg.vocab_size,
        args.seed,
        min_tokens,
        args.val_data.as_deref(),
        args.tokenizer.as_deref(),
        init.as_mut().and_then(|m| m.tokenizer.take()),
        model_template,
    )?;
    let (data, val_data, tokenizer) = (prepared.train, prepared.val, prepared.tokenizer);
    let chat_template = prepared.chat_template.or_else(|| init.as_ref().and_then(|m| m.chat_template.clone()));
    // Only rank 0 evaluates (and logs, checkpoints and samples).
    let val_data = if rank == 0 { val_data } else { None };
    #[cfg(feature = "mpi")]
    if let Some(job) = &job {
        use anetrain::hash::fnv1a;
        use dist::Agreement;
        let config = format!("{cfg:?}|{opts:?}|{mode:?}|{:?}", args.backend);
        let fingerprint = anetrain::checkpoint::native::data_fingerprint(&data);
        job.agree(Agreement {
            config: fnv1a(config.as_bytes()),
            data: fnv1a(fingerprint.as_bytes()),
            binary: Agreement::binary_digest()?,
        })?;
    }
    if args.eval_every > 0 && val_data.is_none() {
        println!("note: no --val-data, so no validation (--eval-every {} ignored)", args.eval_every);
    }
    // A resumed run appends to its log: the earlier history is the point of keeping one.
    let mut telemetry = match &args.log {
        Some(path) if rank != 0 => {
            let _ = path;
            Telemetry::none()
        }
        Some(path) if args.resume.is_some() => Telemetry::append_to_file(path)?,
        Some(path) => Telemetry::to_file(path)?,
        None => Telemetry::none(),
    };
    let mil_opts = anetrain::backends::MilOptions {
        layout: args.mil_layout.into(),
        mode: ane_mode,
        compile_budget,
        dialect: args.mil_dialect.dialect(),
        dump: args.mil_dump.clone(),
    };
    let (backend, dialect_note): (Box<dyn Backend>, _) =
        anetrain::backends::build_mil(args.backend.into(), &cfg, args.batch, args.seq, par, &mil_opts)?;
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
    if let Some(note) = dialect_note {
        println!("{note}");
    }
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
    if ranks > 1 {
        println!(
            "data parallel: {ranks} ranks, {} micro-batches each per update, gradient sum {}",
            args.accum / ranks,
            match mode {
                dist::ReduceMode::Exact => "exact (fixed order)",
                dist::ReduceMode::Allreduce => "allreduce (MPI's order)",
            }
        );
    }
    if args.data == "synthetic" {
        println!(
            "data: synthetic Markov chain; loss starts near ln(V) = {:.2}, floor ≈ {SYNTHETIC_ENTROPY:.2} nats",
            (cfg.vocab_size as f64).ln()
        );
    }
    let steps = args.steps;
    let every = args.print_every.max(1);
    let ckpt = args.ckpt_dir.clone().map(|dir| anetrain::train::CheckpointPolicy {
        dir,
        every: args.ckpt_every,
        keep_last: args.keep_last,
    });
    let overwrite = args.overwrite;
    anetrain::signals::install();
    // Measured before training so that the log's header carries it for live views.
    let peak = if args.no_peak || rank != 0 { None } else { Some(pool.install(|| bench::gemm_peak_gflops(par, 0.3))) };
    let mut header = Header {
        model: cfg.name.clone(),
        params: cfg.param_count(),
        layers: cfg.n_layers,
        dim: cfg.dim,
        heads: cfg.n_heads,
        kv_heads: cfg.n_kv_heads,
        vocab: cfg.vocab_size,
        flops_per_token: cfg.train_flops_per_token(args.seq),
        backend: backend.name().into(),
        threads: par.threads,
        gemm: format!("{:?}", par.gemm).to_lowercase(),
        dw_overlap,
        data: data.source.clone(),
        batch: args.batch,
        seq: args.seq,
        accum: args.accum,
        steps: args.steps,
        lr: opts.schedule_lr,
        min_lr: opts.min_lr,
        warmup: opts.warmup,
        weight_decay: opts.adamw.weight_decay,
        beta1: opts.adamw.beta1,
        beta2: opts.adamw.beta2,
        adam_eps: opts.adamw.eps,
        grad_clip: opts.grad_clip,
        loss_scale: args.loss_scale.clone(),
        eval_every: if val_data.is_some() { opts.eval_every } else { 0 },
        eval_tokens: opts.eval_tokens,
        seed: args.seed,
        ckpt_dir: args.ckpt_dir.as_ref().map(|d| d.display().to_string()),
        ckpt_every: args.ckpt_every,
        gemm_peak_gflops: peak,
        ..Header::new()
    };
    let (summary, params, tokenizer, last_step) = pool.install(|| -> Result<_> {
        let accum = opts.accum;
        // --init's weights become the base; with --base-dtype bf16 its layers are converted
        // and the f32 copy dropped here.
        let base = init.take().map(|m| m.params);
        let mut trainer = Trainer::with_base(&cfg, opts, par, backend, base)?;
        #[cfg(feature = "mpi")]
        if let Some(job) = job {
            let plan = dist_plan(&trainer.model.cfg, trainer.opts.lora.as_ref(), job.rank, job.size, accum, mode)?;
            let total = plan.total();
            trainer.set_dist(job.exchange(plan, total)?)?;
        }
        #[cfg(not(feature = "mpi"))]
        let _ = (job, accum, mode);
        trainer.model.set_dw_overlap(dw_overlap)?;
        if args.bf16_matmul {
            if trainer.model.set_lora_bf16_matmul(false)? {
                println!("bf16 matmul: the frozen layers' projections run as AVX-512 BF16 GEMMs");
                if args.bf16_attention {
                    trainer.model.set_lora_bf16_attention(true)?;
                    println!("bf16 attention: q·kᵀ, p·v and their backward run on bf16 inputs");
                }
            } else {
                let attention = if args.bf16_attention { " (and attention stays f32)" } else { "" };
                println!("bf16 matmul: this CPU has no AVX-512 BF16; the f32 GEMMs on the widened base run{attention}");
            }
        }
        trainer.compile_budget = compile_budget;
        trainer.val_data = val_data;
        trainer.tokenizer = tokenizer;
        trainer.chat_template = chat_template;
        if let Some(checkpoint) = &checkpoint {
            checkpoint.restore(&mut trainer, &data)?;
            println!(
                "resumed from {} after {} updates{}",
                checkpoint.path.display(),
                checkpoint.step,
                if restarts > 0 { format!(" (compile-budget restart {restarts})") } else { String::new() }
            );
            header.resumed_from = Some(checkpoint.path.display().to_string());
            if let Some(policy) = &ckpt
                && rank == 0
            {
                let resumed = Some((checkpoint.path.as_path(), checkpoint.step));
                for note in anetrain::checkpoint::rundir::prepare(&policy.dir, resumed, overwrite)? {
                    println!("{note}");
                }
            }
        }
        drop(checkpoint);
        if args.compact_vocab {
            let mut sources = vec![&data];
            sources.extend(trainer.val_data.as_ref());
            let ids = anetrain::compact::occurring_ids(cfg.vocab_size, &sources)?;
            println!(
                "compact vocabulary: {} of {} ids occur in the data; classifier and loss run over those",
                ids.len(),
                cfg.vocab_size
            );
            trainer.set_compact_vocab(ids)?;
        }
        header.start_step = trainer.start_step;
        telemetry.record(Record::Header(Box::new(header)))?;
        // Drawn on stderr only when it is a terminal; the periodic lines below go to stdout
        // either way (suspend clears the bar while they print).
        let bar = ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template("[{bar:30}] {pos}/{len} updates | {msg} | {elapsed} elapsed, ETA {eta}")?
                .progress_chars("#>-"),
        );
        bar.set_position(trainer.start_step as u64);
        bar.reset_eta();
        let ckpt = if rank == 0 { ckpt.as_ref() } else { None };
        let result = trainer.run(&data, &mut telemetry, ckpt, |ev| {
            bar.set_message(format!("loss {:.4} | {:.0} tok/s", ev.loss, ev.tokens_per_s));
            bar.set_position(ev.step as u64);
            if ev.step == 1 || ev.step == steps || ev.step.is_multiple_of(every) || ev.skipped || ev.val_loss.is_some()
            {
                // Read before suspend, which holds the bar's lock while its closure runs.
                let eta = HumanDuration(bar.eta());
                bar.suspend(|| {
                    println!(
                        "step {:>5}/{steps} | loss {:.4}{} | lr {:.2e} | grad norm {:.3}{} | {:>6.0} tok/s | {:>6.1} ms | ETA {}",
                        ev.step,
                        ev.loss,
                        ev.val_loss.map_or(String::new(), |v| format!(" | val {v:.4}")),
                        ev.lr,
                        ev.grad_norm,
                        if ev.skipped { " (non-finite: update skipped, loss scale halved)" } else { "" },
                        ev.tokens_per_s,
                        ev.ms_step,
                        eta
                    )
                });
            }
        });
        bar.finish_and_clear();
        #[cfg(feature = "mpi")]
        if result.is_ok() {
            dist::mpi::mark_success();
        }
        result.map(|summary| {
            let last_step = trainer.start_step + summary.losses.len();
            // The weights for the sample only when there will be one: with a bf16 base,
            // widening the layers back to f32 would be the run's peak memory.
            let tokenizer = trainer.tokenizer.take().filter(|_| args.sample_tokens > 0 && rank == 0);
            let params = if tokenizer.is_some() { trainer.into_effective_params() } else { Vec::new() };
            (summary, params, tokenizer, last_step)
        })
    })?;
    if summary.restart {
        println!(
            "compile budget: {} compiles allowed per process; checkpointed at step {last_step}/{steps}, restarting \
             with --resume latest",
            compile_budget.unwrap_or(0)
        );
        // exec runs no destructors: close the log and release the directory lock first.
        drop(telemetry);
        drop(lock);
        std::io::Write::flush(&mut std::io::stdout())?;
        match super::restart::exec_resume(args.max_restarts)? {}
    }
    if summary.interrupted {
        let saved = args.ckpt_dir.as_ref().map_or(String::from(" (no --ckpt-dir: nothing saved)"), |d| {
            format!("; checkpoint in {}, continue with --resume latest", d.display())
        });
        // The checkpoint's step, not this process's share of it (a resumed run starts late).
        println!("interrupted at step {last_step}/{steps}{saved}");
    }
    let share_of_peak_pct = peak.map(|p| 100.0 * summary.gflops / p);
    telemetry.record(Record::Report(Report {
        step: last_step,
        interrupted: summary.interrupted,
        updates: summary.losses.len(),
        wall_s: summary.wall_s,
        median_micro_ms: summary.median_micro_ms,
        tokens: summary.tokens,
        tokens_per_s: summary.tokens_per_s,
        gflops: summary.gflops,
        gemm_peak_gflops: peak,
        share_of_peak_pct,
        dw_overlap: summary.dw_overlap,
        kernel_ms: summary.kernel_ms,
        dw_ms: summary.dw_ms,
        dw_wait_ms: summary.dw_wait_ms,
        comm_wait_ms: summary.comm_wait_ms,
        comm_bytes: summary.comm_bytes,
        peak_rss_mb: bench::peak_rss_mb(),
        cpu_s: anetrain::sysstat::process_cpu_s(),
        first_loss: summary.losses.first().copied().unwrap_or(f64::NAN),
        last_loss: summary.losses.last().copied().unwrap_or(f64::NAN),
    }))?;
    println!("--- efficiency ---");
    println!("wall time            {:.2} s", summary.wall_s);
    println!(
        "median micro-step    {:.1} ms (B·T = {} tokens; after the first update when there are more)",
        summary.median_micro_ms,
        args.batch * args.seq
    );
    println!("throughput           {:.0} tokens/s", summary.tokens_per_s);
    println!(
        "kernels / dW         kernels {:.1} ms, dW {:.1} ms ({}), dW wait {:.1} ms per update",
        summary.kernel_ms,
        summary.dw_ms,
        if summary.dw_overlap { "overlapped" } else { "inline" },
        summary.dw_wait_ms
    );
    if ranks > 1 {
        println!(
            "data parallel        {ranks} ranks: comm wait {:.1} ms, {:.1} MB sent per update (this rank)",
            summary.comm_wait_ms,
            summary.comm_bytes as f64 / 1e6
        );
    }
    println!(
        "achieved             {:.1} GFLOP/s ({:.3} GFLOP/token)",
        summary.gflops,
        cfg.train_flops_per_token(args.seq) / 1e9
    );
    if let Some(peak) = peak {
        println!(
            "GEMM peak            {peak:.1} GFLOP/s (best square SGEMM) -> {} over the whole run",
            bench::share_of_peak(summary.gflops, peak)
        );
    }
    println!("peak RSS             {:.0} MB", bench::peak_rss_mb());
    if anetrain::prof::enabled() {
        match anetrain::prof::micro_steps() {
            0 => println!(
                "profile: {} is set but the run had one update (the first is not profiled)",
                anetrain::prof::VAR
            ),
            _ => print!("{}", anetrain::prof::report()),
        }
    }
    if let (Some(first), Some(last)) = (summary.losses.first(), summary.losses.last()) {
        println!("loss                 {first:.4} -> {last:.4}");
    }
    // Stopped by SIGINT/SIGTERM: the checkpoint is written; exit as the shell reports that
    // signal (130/143), not 0 like a finished run, and skip the sample.
    if summary.interrupted
        && let Some(status) = anetrain::signals::exit_status()
    {
        std::process::exit(status);
    }
    if let Some(tok) = &tokenizer {
        sample_story(&cfg, &params, tok, args.sample_tokens, args.seed, par, &pool)?;
    }
    Ok(())
}
