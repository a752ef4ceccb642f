//! `anetrain train`: data, model, backend and trainer from the command line; the run, its
//! report, and a sample from the trained model.

use crate::{TrainArgs, group_digits};
use anetrain::backend::Backend;
use anetrain::bench;
use anetrain::config::ModelConfig;
use anetrain::data::SYNTHETIC_ENTROPY;
use anetrain::ops::Par;
use anetrain::telemetry::{Header, Record, Report, Telemetry};
use anetrain::train::adamw::AdamWConfig;
use anetrain::train::loss_scale::LossScaleMode;
use anetrain::train::{TrainOptions, Trainer};
use anyhow::{Result, bail};
use indicatif::{HumanDuration, ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Refuses a run whose weights, optimizer state, activations and logits cannot fit in the
/// memory this process may use, before allocating any of them.
pub fn check_memory(cfg: &ModelConfig, batch: usize, seq: usize) -> Result<()> {
    anetrain::model::memory_estimate(cfg, batch, seq, true).ensure(
        &format!("training {} with --batch {batch} --seq {seq}", cfg.name),
        "lower --batch or --seq (--accum keeps the tokens per update), or choose a smaller --model",
    )
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

pub fn train(args: TrainArgs) -> Result<()> {
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
    check_memory(&cfg, args.batch, args.seq)?;
    // The checkpoint directory is locked before anything in it is read or written.
    let _lock = match &args.ckpt_dir {
        Some(dir) => {
            let lock = anetrain::checkpoint::rundir::lock(dir)?;
            anetrain::checkpoint::native::check_writable(dir)?;
            Some(lock)
        }
        None => None,
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
            if let Some(dir) = &args.ckpt_dir {
                for note in anetrain::checkpoint::rundir::prepare(dir, None, args.overwrite)? {
                    println!("{note}");
                }
            }
            None
        }
    };
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
    // A resumed run appends to its log: the earlier history is the point of keeping one.
    let mut telemetry = match &args.log {
        Some(path) if args.resume.is_some() => Telemetry::append_to_file(path)?,
        Some(path) => Telemetry::to_file(path)?,
        None => Telemetry::none(),
    };
    let backend: Box<dyn Backend> =
        anetrain::backends::build(args.backend.into(), &cfg, args.batch, args.seq, par, args.mil_layout.into())?;
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
    let ckpt = args.ckpt_dir.clone().map(|dir| anetrain::train::CheckpointPolicy {
        dir,
        every: args.ckpt_every,
        keep_last: args.keep_last,
    });
    let overwrite = args.overwrite;
    anetrain::signals::install();
    // Measured before training so that the log's header carries it for live views.
    let peak = if args.no_peak { None } else { Some(pool.install(|| bench::gemm_peak_gflops(par, 0.3))) };
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
        let mut trainer = Trainer::new(&cfg, opts, par, backend)?;
        trainer.model.set_dw_overlap(dw_overlap)?;
        trainer.val_data = val_data;
        trainer.tokenizer = tokenizer;
        if let Some(checkpoint) = &checkpoint {
            checkpoint.restore(&mut trainer, &data)?;
            println!("resumed from {} after {} updates", checkpoint.path.display(), checkpoint.step);
            header.resumed_from = Some(checkpoint.path.display().to_string());
            if let Some(policy) = &ckpt {
                let resumed = Some((checkpoint.path.as_path(), checkpoint.step));
                for note in anetrain::checkpoint::rundir::prepare(&policy.dir, resumed, overwrite)? {
                    println!("{note}");
                }
            }
        }
        drop(checkpoint);
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
        let result = trainer.run(&data, &mut telemetry, ckpt.as_ref(), |ev| {
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
        result.map(|summary| {
            let last_step = trainer.start_step + summary.losses.len();
            (summary, trainer.params, trainer.tokenizer.take(), last_step)
        })
    })?;
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
        peak_rss_mb: bench::peak_rss_mb(),
        cpu_s: anetrain::sysstat::process_cpu_s(),
        first_loss: summary.losses.first().copied().unwrap_or(f64::NAN),
        last_loss: summary.losses.last().copied().unwrap_or(f64::NAN),
    }))?;
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
            "GEMM peak            {peak:.1} GFLOP/s (best square SGEMM) -> {} over the whole run",
            bench::share_of_peak(summary.gflops, peak)
        );
    }
    println!("peak RSS             {:.0} MB", bench::peak_rss_mb());
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
        sample_story(&cfg, &params, tok, args.seed, par, &pool)?;
    }
    Ok(())
}
