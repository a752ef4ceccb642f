//! `anetrain ane probe`: for Mac users to check this crate's kernels on their hardware and
//! report the table. Three checks:
//! 1. raw: the same random fp16 inputs through the Neural Engine and the fp16 simulator,
//!    outputs compared (they run the same program; differences are the hardware's own
//!    rounding and accumulation order);
//! 2. end to end: the `ane` backend against the f32 `cpu` backend on a random layer, with
//!    the same tolerances the simulator meets in CI (`mil::check`);
//! 3. the trainer: 10 updates on the device and on the `cpu` backend, losses within 2%.

use super::{AneOptions, AneRunner};
use crate::backend::cpu::CpuBackend;
use crate::config::ModelConfig;
use crate::data::{TokenData, synthetic_tokens};
use crate::mil::KernelRunner;
use crate::mil::backend::MilBackend;
use crate::mil::check::{MAX_TOL, MEAN_TOL, compare_with_cpu, rel_errors};
use crate::mil::dialect::{Dialect, DialectRunner};
use crate::mil::emit::{InputLayout, KernelSet};
use crate::mil::sim::SimRunner;
use crate::ops::Par;
use crate::rng::Rng;
use crate::train::{TrainOptions, Trainer};
use anyhow::{Context, Result};
use half::f16;
use std::io::Write;
use std::time::Instant;

/// The default probe shape: small, but GQA with QK-norm and head_dim ≠ dim/heads, so every
/// kernel variant is exercised (with the default T = 40, padded positions too).
pub fn probe_config() -> ModelConfig {
    ModelConfig {
        name: "probe-gqa-qknorm".into(),
        dim: 256,
        ffn_dim: 512,
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 96,
        vocab_size: 512,
        max_seq_len: 1024,
        rope_theta: 1e6,
        norm_eps: 1e-6,
        qk_norm: true,
        tied_embeddings: true,
        rope_scaling: None,
        qkv_bias: false,
        sliding_window: None,
    }
}

/// `dialect`: the `--mil-dialect` override, or None to choose by the chip (`chips`).
pub fn run(model: Option<&str>, t: usize, layout: InputLayout, dialect: Option<Dialect>) -> Result<()> {
    let cfg = match model {
        Some(m) => ModelConfig::resolve(m)?,
        None => probe_config(),
    };
    let ane = AneRunner::new(AneOptions::default())?;
    let sub = ane.sub_type();
    drop(ane);
    let (dialect, why) = super::chips::choose_dialect(sub.as_deref(), dialect)?;
    let mut out = std::io::stdout().lock();
    let device = sub.map_or("?".to_string(), |s| format!("aneSubType={s}"));
    writeln!(out, "anetrain ane probe {} | device {device} | {why}", env!("CARGO_PKG_VERSION"))?;
    let failures = report(
        &cfg,
        t,
        layout,
        &|| {
            let ane = AneRunner::new(AneOptions::default())?;
            Ok(Box::new(DialectRunner::new(Box::new(ane), dialect)) as Box<dyn KernelRunner>)
        },
        &mut out,
    )?;
    writeln!(
        out,
        "\n{} — please report this output (chip, macOS version) in an issue: it is how this backend gets verified.",
        if failures == 0 { "all kernels agree".to_string() } else { format!("{failures} problems") }
    )?;
    anyhow::ensure!(failures == 0, "{failures} kernel checks failed on this device");
    Ok(())
}

/// The probe's two tables for a device made by `device` (called twice: once for the raw
/// kernels, once for the backend), written to `out`; returns the number of failed checks.
/// Tests run it with the simulator as the device.
pub fn report(
    cfg: &ModelConfig,
    t: usize,
    layout: InputLayout,
    device: &dyn Fn() -> Result<Box<dyn KernelRunner>>,
    out: &mut dyn Write,
) -> Result<usize> {
    let mut ane = device()?;
    writeln!(
        out,
        "model {}: C={} H={} KV={} D={} F={} qk_norm={} | T={t} | {layout:?} layout",
        cfg.name, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.qk_norm
    )?;
    for note in crate::mil::emit::hardware_notes(cfg) {
        writeln!(out, "note: {note}: a mismatch below may come from that")?;
    }
    let set = KernelSet::new(cfg, t, layout)?;
    let mut sim = SimRunner::new(Par::seq());
    let mut rng = Rng::new(1);
    writeln!(out, "\n1. raw kernels, {} vs fp16 simulator (same random fp16 inputs)", ane.name())?;
    writeln!(
        out,
        "{:<14} {:>11} {:>9} {:>10} {:>10}  status",
        "kernel", "compile ms", "eval ms", "max rel", "mean rel"
    )?;
    let mut failures = 0;
    for k in set.all().into_iter().chain([&set.classifier]) {
        let p = &k.program;
        let start = Instant::now();
        let loaded = ane.load(p, 1);
        let compile_ms = start.elapsed().as_secs_f64() * 1e3;
        let id = match loaded {
            Ok(id) => id,
            Err(e) => {
                failures += 1;
                writeln!(
                    out,
                    "{:<14} {compile_ms:>11.1} {:>9} {:>10} {:>10}  COMPILE FAILED: {e:#}",
                    p.name, "-", "-", "-"
                )?;
                continue;
            }
        };
        let sid = sim.load(p, 1)?;
        for (i, sig) in p.inputs.iter().enumerate() {
            let data: Vec<f16> = (0..sig.elems()).map(|_| f16::from_f64(0.5 * rng.normal())).collect();
            ane.write_input(id, 0, i, &mut |buf| buf.copy_from_slice(&data))?;
            sim.write_input(sid, 0, i, &mut |buf| buf.copy_from_slice(&data))?;
        }
        let mut times = Vec::new();
        let mut eval = Ok(());
        for _ in 0..5 {
            let s = Instant::now();
            eval = ane.eval(id, 0);
            times.push(s.elapsed().as_secs_f64() * 1e3);
            if eval.is_err() {
                break;
            }
        }
        times.sort_by(f64::total_cmp);
        if let Err(e) = eval {
            failures += 1;
            writeln!(out, "{:<14} {compile_ms:>11.1} {:>9} {:>10} {:>10}  EVAL FAILED: {e:#}", p.name, "-", "-", "-")?;
            continue;
        }
        sim.eval(sid, 0)?;
        let mut got = Vec::new();
        let mut want = Vec::new();
        ane.read_output(id, 0, &mut |o| got = o.iter().map(|x| x.to_f32()).collect())?;
        sim.read_output(sid, 0, &mut |o| want = o.iter().map(|x| x.to_f32()).collect())?;
        let (max, mean) = rel_errors(&got, &want);
        let ok = max <= MAX_TOL && mean <= MEAN_TOL;
        failures += usize::from(!ok);
        let status = if ok { "ok" } else { "MISMATCH" };
        let eval_ms = times[times.len() / 2];
        writeln!(out, "{:<14} {compile_ms:>11.1} {eval_ms:>9.3} {max:>10.2e} {mean:>10.2e}  {status}", p.name)?;
    }

    let name = ane.name();
    drop(ane);
    writeln!(
        out,
        "\n2. {name} backend vs f32 cpu backend on a random layer (limits: max {MAX_TOL:.0e}, mean {MEAN_TOL:.0e})"
    )?;
    let mut backend =
        MilBackend::new(cfg, 1, t, layout, device()?).with_context(|| format!("building the {name} backend"))?;
    let rows = compare_with_cpu(cfg, 1, t, &mut backend, 7)?;
    writeln!(out, "{:<16} {:<20} {:>10} {:>10}  status", "kernel", "output", "max rel", "mean rel")?;
    for r in &rows {
        failures += usize::from(!r.ok());
        let status = if r.ok() { "ok" } else { "MISMATCH" };
        writeln!(out, "{:<16} {:<20} {:>10.2e} {:>10.2e}  {status}", r.kernel, r.what, r.max_rel, r.mean_rel)?;
    }
    drop(backend);

    // 3. The whole trainer: the same updates on the device and on the cpu backend.
    let cfg = ModelConfig { n_layers: cfg.n_layers.max(2), ..cfg.clone() };
    let updates = 10;
    writeln!(
        out,
        "\n3. {updates} training updates (B=1, T={t}, {} layers), {name} vs cpu (limit 2% per update)",
        cfg.n_layers
    )?;
    let data = TokenData::from_vec(synthetic_tokens(cfg.vocab_size, 20_000, 11), cfg.vocab_size, "synthetic")?;
    let opts = TrainOptions { accum: 2, schedule_lr: 2e-3, min_lr: 2e-3, seed: 3, ..TrainOptions::new(updates, 1, t) };
    let par = Par::seq();
    let device_backend = MilBackend::new(&cfg, 1, t, layout, device()?)?;
    let mut on_device = Trainer::new(&cfg, opts.clone(), par, Box::new(device_backend))?;
    let mut on_cpu = Trainer::new(&cfg, opts, par, Box::new(CpuBackend::new(&cfg, 1, t, par)))?;
    writeln!(out, "{:>6} {:>10} {:>10} {:>10}  status", "update", name, "cpu", "rel diff")?;
    for step in 0..updates {
        let (a, b) = (on_device.step(&data, step)?, on_cpu.step(&data, step)?);
        let rel = (a.loss - b.loss).abs() / b.loss;
        let ok = rel <= 0.02 && !a.skipped;
        failures += usize::from(!ok);
        let status = if a.skipped {
            "SKIPPED (fp16 overflow)"
        } else if ok {
            "ok"
        } else {
            "MISMATCH"
        };
        writeln!(out, "{step:>6} {:>10.5} {:>10.5} {rel:>10.2e}  {status}", a.loss, b.loss)?;
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe end to end with the simulator standing in for the Neural Engine: every
    /// kernel compiles, runs, agrees with itself and with the cpu backend.
    #[test]
    fn probe_runs_every_check_against_a_simulated_device() {
        let cfg = ModelConfig { dim: 64, ffn_dim: 96, head_dim: 24, ..probe_config() };
        let mut out = Vec::new();
        let sim = || Ok(Box::new(SimRunner::new(Par::seq())) as Box<dyn KernelRunner>);
        let failures = report(&cfg, 20, InputLayout::Packed, &sim, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(failures, 0, "{text}");
        for k in ["attn_fwd", "wo_fwd", "ffn_fwd", "ffn_bwd_w13t", "sdpa_bwd1", "sdpa_bwd2", "kv_bwd", "classifier"] {
            assert!(text.matches(k).count() >= 1, "{k} missing from:\n{text}");
        }
        assert_eq!(text.matches("  ok").count(), 11 + 20 + 10, "11 kernels, 20 outputs, 10 updates: {text}");
        assert!(!text.contains("MISMATCH") && !text.contains("FAILED"), "{text}");
    }
}
