//! `--mil-dialect` on the commands that run MIL programs (issue 13: M1/M2 users need the
//! ios16 dialect to train). Training in ios16 gives the same weights, bit for bit, as in
//! ios18 (dynamic and static mode), and the programs a run compiles really are in the dialect
//! asked for (`--mil-dump`), so a flag that was accepted but ignored fails here.

use anetrain::backends::{AneMode, BackendKind, MilOptions, build_mil};
use anetrain::data::{TokenData, synthetic_tokens};
use anetrain::mil::dialect::Dialect;
use anetrain::mil::emit::InputLayout;
use anetrain::ops::Par;
use anetrain::train::{TrainOptions, Trainer};
use std::path::Path;
use std::process::Command;

#[path = "common/tiny_models.rs"]
mod tiny_models;
use tiny_models::tiny;

/// The weights after `updates` updates on the simulator with `opts`.
fn train(opts: &MilOptions, updates: usize) -> Vec<f32> {
    let cfg = tiny("gqa-qknorm");
    let (b, t) = (2, 20);
    let par = Par::seq();
    let data = TokenData::from_vec(synthetic_tokens(cfg.vocab_size, 5_000, 4), cfg.vocab_size, "synthetic").unwrap();
    let (backend, note) = build_mil(BackendKind::MilSim, &cfg, b, t, par, opts).unwrap();
    let want = opts.dialect.unwrap_or(Dialect::Ios18).name();
    assert!(note.as_deref().is_some_and(|n| n.contains(want)), "{note:?}");
    let topts = TrainOptions { accum: 2, schedule_lr: 3e-3, min_lr: 3e-3, seed: 5, ..TrainOptions::new(updates, b, t) };
    let mut trainer = Trainer::new(&cfg, topts, par, backend).unwrap();
    for step in 0..updates {
        let e = trainer.step(&data, step).unwrap();
        assert!(!e.skipped, "update {step} skipped");
    }
    trainer.params
}

/// Every program dumped under `dir`, as (entry name, MIL text), in compile order.
fn dumped(dir: &Path) -> Vec<(String, String)> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    entries
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(p.join("model.mil")).unwrap())
        })
        .collect()
}

#[test]
fn training_in_ios16_is_bit_identical_to_ios18_and_compiles_ios16_programs() {
    let tmp = tempfile::Builder::new().prefix("anetrain-dialect-").tempdir().unwrap();
    for (mode, layout, tag) in [
        (AneMode::Dynamic, InputLayout::Packed, "dynamic-packed"),
        (AneMode::Dynamic, InputLayout::Separate, "dynamic-separate"),
        (AneMode::Static { every: 2 }, InputLayout::Separate, "static"),
    ] {
        let run = |dialect: Option<Dialect>, name: &str| {
            let dump = tmp.path().join(format!("{tag}-{name}"));
            let opts = MilOptions { layout, mode, dialect, dump: Some(dump.clone()), ..MilOptions::default() };
            (train(&opts, 4), dumped(&dump))
        };
        let (new, new_progs) = run(None, "auto");
        let (old, old_progs) = run(Some(Dialect::Ios16), "ios16");
        assert!(new.iter().zip(&old).all(|(a, b)| a.to_bits() == b.to_bits()), "{tag}: weights differ");
        assert_eq!(new_progs.len(), old_progs.len(), "{tag}: the same compiles");
        // dynamic: 11 kernels once; static: two weight-free kernels, then 8 per layer per bake
        let compiles = if matches!(mode, AneMode::Dynamic) { 11 } else { 2 + 2 * 8 * 2 };
        assert_eq!(new_progs.len(), compiles, "{tag}");
        for ((n16, m16), (n18, m18)) in old_progs.iter().zip(&new_progs) {
            assert_eq!(n16, n18);
            assert!(m18.starts_with("program(1.3)\n") && m18.contains("func main<ios18>("), "{tag} {n18}");
            assert!(m16.starts_with("program(1.0)\n") && m16.contains("func main<ios16>("), "{tag} {n16}:\n{m16}");
            assert!(!m16.contains("int32("), "{tag} {n16}: compact scalars left in the ios16 text");
        }
        if matches!(mode, AneMode::Static { .. }) {
            assert!(old_progs.iter().any(|(n, m)| n.contains("_static") && m.contains("BLOBFILE")), "{tag}");
        }
    }
    // an explicit dialect means MIL programs: the cpu backend refuses it in one sentence
    let opts = MilOptions { dialect: Some(Dialect::Ios16), ..MilOptions::default() };
    let e = build_mil(BackendKind::Cpu, &tiny("mha"), 1, 20, Par::seq(), &opts).err().unwrap().to_string();
    assert!(e.contains("--backend mil-sim or ane") && !e.contains('\n'), "{e}");
}

fn anetrain(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain")).args(args).output().expect("run anetrain");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The command line: `train --mil-dialect ios16` (dynamic and static) compiles ios16 programs,
/// says so, and ends with the same weights as `auto`; `bench step` takes the flag too.
#[test]
fn train_and_bench_step_take_mil_dialect() {
    let tmp = tempfile::Builder::new().prefix("anetrain-dialect-cli-").tempdir().unwrap();
    let base = [
        "train",
        "--model",
        "stories260k",
        "--data",
        "synthetic",
        "--steps",
        "3",
        "--seq",
        "32",
        "--batch",
        "2",
        "--eval-every",
        "0",
        "--no-peak",
        "--threads",
        "1",
        "--sample-tokens",
        "0",
        "--backend",
        "mil-sim",
    ];
    for (tag, extra) in [("dyn", &[][..]), ("static", &["--ane-mode", "static", "--recompile-every", "2"][..])] {
        let mut weights = Vec::new();
        for dialect in ["auto", "ios16"] {
            let dir = tmp.path().join(format!("{tag}-{dialect}"));
            let (ckpt, dump) = (dir.join("ckpt"), dir.join("dump"));
            let mut args = base.to_vec();
            args.extend(extra);
            args.extend(["--mil-dialect", dialect, "--ckpt-dir", ckpt.to_str().unwrap()]);
            args.extend(["--mil-dump", dump.to_str().unwrap()]);
            let (ok, out) = anetrain(&args);
            assert!(ok, "{out}");
            let (version, opset) = if dialect == "ios16" { ("1.0", "ios16") } else { ("1.3", "ios18") };
            assert!(out.contains(&format!("MIL dialect {opset} (")), "{out}");
            let progs = dumped(&dump);
            assert!(progs.len() >= 11, "{tag} {dialect}: {} programs", progs.len());
            for (name, mil) in &progs {
                assert!(mil.starts_with(&format!("program({version})\n")), "{tag} {dialect} {name}");
                assert!(mil.contains(&format!("func main<{opset}>(")), "{tag} {dialect} {name}");
            }
            let latest = std::fs::read_to_string(ckpt.join("latest")).unwrap();
            weights.push(std::fs::read(ckpt.join(latest.trim()).join("model.safetensors")).unwrap());
        }
        assert!(weights[0] == weights[1], "{tag}: the dialect changed the trained weights");
    }
    let (ok, out) = anetrain(&["train", "--mil-dialect", "ios16", "--steps", "1", "--data", "synthetic"]);
    assert!(!ok && out.contains("--backend mil-sim or ane"), "{out}");
    let (ok, out) = anetrain(&[
        "bench",
        "step",
        "--model",
        "stories260k",
        "--seq",
        "32",
        "--accum",
        "1",
        "--min-micro",
        "1",
        "--backend",
        "mil-sim",
        "--mil-dialect",
        "ios16",
        "--threads",
        "1",
    ]);
    assert!(ok && out.contains("MIL dialect ios16 (--mil-dialect)"), "{out}");
}
