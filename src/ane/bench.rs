//! `anetrain ane bench dispatch|peak|sram|int8`: the benchmark programs of `mil::benchprog`
//! on the Neural Engine (macOS), or written to disk and checked in the simulator (anywhere).
//!
//! On a Mac each program is compiled and loaded, evaluated `warmup` times, then `iters`
//! times under the clock; the row gives the mean ms per evaluation, weight MB, TFLOP/s and
//! the share of the chip's rated peak (`chips`: FP16 rating for FP16 programs, INT8 rating
//! for W8A8). This path has **not** run on Apple hardware: it is compiled and its arithmetic
//! unit-tested here. Off macOS, `--emit DIR` writes every program (`DIR/<kind>/<name>/model.mil`
//! and `weights/`) and runs a small instance of each (`Spec::small`) through the fp16
//! simulator against the CPU reference.

use super::chips;
use crate::mil::KernelRunner;
use crate::mil::benchprog::{Int8Ref, Precision, Spec, program, reference, weights};
use crate::mil::check::rel_errors;
use crate::mil::sim::SimRunner;
use crate::ops::Par;
use crate::rng::Rng;
use anyhow::{Context, Result, ensure};
use half::f16;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Simulator vs CPU reference limits, relative to the reference's magnitude (as in
/// `mil::check`): max-abs error ≤ 8e-3 of max |ref|, mean-abs ≤ 3e-3 of mean |ref|. FP16
/// chains: each conv rounds its output once (u = 2⁻¹¹) and the f64 reference never does; ≤ 4
/// convs in the small instance (measured ≈ 5e-4). W8A8 chains are compared with
/// `Int8Ref::Program` (the ops' defined arithmetic; differences only from f32 accumulation,
/// measured 0 to a few u); a single W8A8 layer is bounded against the pure integer path in
/// tests/ane_programs.rs.
pub const TOL: (f64, f64) = (8e-3, 3e-3);

/// TFLOP/s of `flops` done in `ms` milliseconds.
pub fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}

/// The share (0..) of a rated peak in TFLOP/s (or TOPS); None when the chip's rating is
/// unknown. The original divided by 0.019 where it meant 19 (facts §1.4); this divides by the
/// rating itself, in the same unit.
pub fn share_of_peak(tflops: f64, rated: Option<f64>) -> Option<f64> {
    rated.filter(|r| *r > 0.0).map(|r| tflops / r)
}

/// One measured program (a row of `docs/ANE_RESULTS.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub program: String,
    pub precision: String,
    pub channels: usize,
    pub spatial: usize,
    pub depth: usize,
    pub weight_mb: f64,
    pub gflop: f64,
    pub ms_per_eval: f64,
    pub tflops: f64,
    /// Fraction of the chip's rated peak (0.5 = 50%), when the rating is known
    pub share_of_peak: Option<f64>,
}

/// `--json`: one object per run, for the community results table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub format: String,
    pub version: u32,
    pub benchmark: String,
    /// `aneSubType` as the framework reports it
    pub chip: String,
    pub generation: Option<String>,
    pub macos: String,
    pub command: String,
    pub warmup: usize,
    pub iters: usize,
    pub rows: Vec<Row>,
}

pub fn row(spec: &Spec, ms: f64, chip: Option<&chips::Chip>) -> Row {
    let t = tflops(spec.flops(), ms);
    let rated = match spec.precision {
        Precision::Fp16 => chip.and_then(|c| c.fp16_tflops),
        Precision::W8a8 => chip.and_then(|c| c.int8_tops),
    };
    Row {
        program: spec.name(),
        precision: format!("{:?}", spec.precision).to_lowercase(),
        channels: spec.ch,
        spatial: spec.sp,
        depth: spec.depth,
        weight_mb: spec.weight_bytes() as f64 / 1e6,
        gflop: spec.flops() / 1e9,
        ms_per_eval: ms,
        tflops: t,
        share_of_peak: share_of_peak(t, rated),
    }
}

fn print_rows(out: &mut dyn Write, rows: &[Row]) -> Result<()> {
    writeln!(
        out,
        "{:<26} {:>10} {:>9} {:>10} {:>9} {:>8}",
        "program", "weight MB", "GFLOP", "ms/eval", "TFLOP/s", "% peak"
    )?;
    for r in rows {
        let share = r.share_of_peak.map_or("n/a".to_string(), |s| format!("{:.1}", 100.0 * s));
        writeln!(
            out,
            "{:<26} {:>10.2} {:>9.3} {:>10.3} {:>9.3} {:>8}",
            r.program, r.weight_mb, r.gflop, r.ms_per_eval, r.tflops, share
        )?;
    }
    Ok(())
}

fn macos_version() -> String {
    std::process::Command::new("sw_vers")
        .arg("-productVersion")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Runs `specs` on the Neural Engine and prints the table (or the JSON report).
pub fn run_device(kind: &str, specs: &[Spec], warmup: usize, iters: usize, json: bool, command: &str) -> Result<()> {
    ensure!(iters >= 1, "--iters must be at least 1");
    let budget = super::AneOptions::default().compile_budget;
    ensure!(
        specs.len() <= budget,
        "{} programs would pass this process's compile budget of {budget}; run fewer",
        specs.len()
    );
    for s in specs {
        s.check()?;
    }
    let mut ane = super::AneRunner::new(super::AneOptions::default()).context(
        "`ane bench` runs on the Neural Engine; off macOS use --emit DIR to write and simulate the programs",
    )?;
    let sub = ane.sub_type().unwrap_or_else(|| "unknown".into());
    let chip = chips::lookup(&sub);
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(
            out,
            "anetrain ane bench {kind} | aneSubType {sub} ({}) | {warmup} warm-up + {iters} timed evaluations",
            chip.map_or("not in the chip table", |c| c.generation)
        )?;
    }
    let mut rows = Vec::new();
    let mut rng = Rng::new(1);
    for (i, spec) in specs.iter().enumerate() {
        let w = weights(spec, 100 + i as u64)?;
        let p = program(spec, &w)?;
        let id = ane.load(&p, 1).with_context(|| format!("compiling {}", spec.name()))?;
        let x: Vec<f16> = (0..spec.ch * spec.sp).map(|_| f16::from_f64(rng.normal())).collect();
        ane.write_input(id, 0, 0, &mut |buf| buf.copy_from_slice(&x))?;
        for _ in 0..warmup {
            ane.eval(id, 0)?;
        }
        let start = Instant::now();
        for _ in 0..iters {
            ane.eval(id, 0)?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let r = row(spec, ms, chip);
        if !json {
            print_rows(&mut out, std::slice::from_ref(&r))?;
        }
        rows.push(r);
    }
    if json {
        let report = Report {
            format: "anetrain-ane-bench".into(),
            version: 1,
            benchmark: kind.into(),
            chip: sub,
            generation: chip.map(|c| c.generation.to_string()),
            macos: macos_version(),
            command: command.into(),
            warmup,
            iters,
            rows,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// One simulated check: the small instance's errors against the CPU reference.
#[derive(Clone, Debug)]
pub struct Check {
    pub spec: Spec,
    pub small: Spec,
    pub max_rel: f64,
    pub mean_rel: f64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.max_rel <= TOL.0 && self.mean_rel <= TOL.1
    }
}

/// Runs the small instance of `spec` in the simulator against the CPU reference.
pub fn simulate(spec: &Spec, seed: u64) -> Result<Check> {
    let small = spec.small();
    let w = weights(&small, seed)?;
    let p = program(&small, &w)?;
    let mut sim = SimRunner::new(Par::seq());
    let id = sim.load(&p, 1)?;
    let mut rng = Rng::new(seed ^ 0x5eed);
    let x: Vec<f16> = (0..small.ch * small.sp).map(|_| f16::from_f64(rng.normal())).collect();
    sim.write_input(id, 0, 0, &mut |buf| buf.copy_from_slice(&x))?;
    sim.eval(id, 0)?;
    let mut got = Vec::new();
    sim.read_output(id, 0, &mut |o| got = o.iter().map(|v| v.to_f32()).collect())?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let want = reference(&small, &w, &xf, Int8Ref::Program);
    let (max_rel, mean_rel) = rel_errors(&got, &want);
    Ok(Check { spec: *spec, small, max_rel, mean_rel })
}

/// `--emit DIR`: writes every program of `specs` under `dir/<kind>/` and checks each one's
/// small instance in the simulator; prints a table and returns the number of failures.
pub fn emit(kind: &str, specs: &[Spec], dir: &Path, out: &mut dyn Write) -> Result<usize> {
    for s in specs {
        s.check()?;
    }
    let base = dir.join(kind);
    writeln!(
        out,
        "writing {} {kind} programs to {}; checking a small instance of each in mil-sim",
        specs.len(),
        base.display()
    )?;
    writeln!(
        out,
        "{:<26} {:>10} {:>9} {:>18} {:>10} {:>10}  status",
        "program", "weight MB", "GFLOP", "simulated as", "max rel", "mean rel"
    )?;
    let mut failures = 0;
    for (i, spec) in specs.iter().enumerate() {
        let w = weights(spec, 100 + i as u64)?;
        let p = program(spec, &w)?;
        drop(w);
        let kdir = base.join(&p.name);
        std::fs::create_dir_all(kdir.join("weights")).with_context(|| format!("cannot create {}", kdir.display()))?;
        let write = |path: &Path, bytes: &[u8]| crate::fsio::write_atomically(path, |f| f.write_all(bytes));
        write(&kdir.join(crate::mil::rules::MIL_FILE), p.mil.as_bytes())?;
        for (rel, bytes) in &p.blobs {
            write(&kdir.join(rel), bytes)?;
        }
        drop(p);
        let c = simulate(spec, 7 + i as u64)?;
        failures += usize::from(!c.ok());
        writeln!(
            out,
            "{:<26} {:>10.2} {:>9.3} {:>18} {:>10.2e} {:>10.2e}  {}",
            spec.name(),
            spec.weight_bytes() as f64 / 1e6,
            spec.flops() / 1e9,
            format!("{}ch×{}sp×{}", c.small.ch, c.small.sp, c.small.depth),
            c.max_rel,
            c.mean_rel,
            if c.ok() { "ok" } else { "MISMATCH" }
        )?;
    }
    writeln!(
        out,
        "timings need a Mac: `anetrain ane bench {kind} --json` there prints ms/eval, TFLOP/s and the share of the rated peak"
    )?;
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tflops_and_share_are_computed_in_the_same_unit() {
        // 128 convs of 512×512 over 64 positions: 4.295 GFLOP; in 0.5 ms that is 8.59 TFLOP/s
        let spec = Spec { ch: 512, sp: 64, depth: 128, precision: Precision::Fp16 };
        assert!((spec.flops() - 4_294_967_296.0).abs() < 1.0);
        let t = tflops(spec.flops(), 0.5);
        assert!((t - 8.589934592).abs() < 1e-9, "{t}");
        // against M4's 19 FP16 TFLOP/s: 45.2%, not the original's 45210% (÷ 0.019)
        let m4 = chips::lookup("H16G");
        let r = row(&spec, 0.5, m4);
        assert!((r.share_of_peak.unwrap() - 8.589934592 / 19.0).abs() < 1e-12);
        assert!(r.share_of_peak.unwrap() < 1.0);
        // W8A8 is measured against the INT8 rating
        let w = Spec { precision: Precision::W8a8, ..spec };
        assert!((row(&w, 0.5, m4).share_of_peak.unwrap() - 8.589934592 / 38.0).abs() < 1e-12);
        assert_eq!(row(&spec, 0.5, chips::lookup("h16")).share_of_peak, None, "M5's rating is unknown");
        assert_eq!(r.weight_mb, 128.0 * 512.0 * 512.0 * 2.0 / 1e6);
    }

    #[test]
    fn sizes_beyond_the_hardware_are_refused_with_the_limit() {
        let s = |ch, sp, depth| Spec { ch, sp, depth, precision: Precision::Fp16 };
        assert!(s(70_000, 64, 1).check().unwrap_err().to_string().contains("65536"));
        assert!(s(64, 131_072, 1).check().unwrap_err().to_string().contains("65536"));
        assert!(s(64, 40, 1).check().unwrap_err().to_string().contains("multiple of 16"));
        assert!(s(64, 64, 0).check().is_err());
        s(65_536, 16, 1).check().unwrap();
    }
}
