//! The compile-budget restart (`--compile-budget`, `--ane-mode static`): a run whose
//! recompiles pass the budget checkpoints and re-executes itself with `--resume latest`, as
//! many times as needed, and ends with weights bit-identical to an uninterrupted run. Runs
//! the real binary on `mil-sim`; the budget is tiny so that restarts happen every 2 updates.

use std::path::Path;
use std::process::Command;

/// `train` on stories260k in static mode, rebaking every 2 updates: 5 layers × 8 baked
/// kernels = 40 compiles per bake, plus the 2 weight-free kernels per process.
fn train(dir: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "train",
        "--backend",
        "mil-sim",
        "--ane-mode",
        "static",
        "--recompile-every",
        "2",
        "--model",
        "stories260k",
        "--data",
        "synthetic",
        "--steps",
        "8",
        "--seq",
        "32",
        "--batch",
        "2",
        "--eval-every",
        "0",
        "--no-peak",
        "--threads",
        "2",
        "--sample-tokens",
        "0",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(&args)
        .current_dir(dir)
        .env_remove("ANETRAIN_RESTARTS")
        .output()
        .expect("run anetrain");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("step-00000008/model.safetensors")).unwrap()
}

#[test]
fn restarts_past_the_compile_budget_end_bit_identical() {
    let tmp = tempfile::Builder::new().prefix("anetrain-restart-").tempdir().unwrap();
    let dir = tmp.path();
    let (ok, whole) = train(dir, &["--ckpt-dir", "whole", "--log", "whole.jsonl"]);
    assert!(ok, "{whole}");
    assert!(!whole.contains("restart"), "{whole}");
    // 42 compiles fit a budget of 50; the next bake (82) does not: a restart before
    // updates 3, 5 and 7.
    let (ok, split) = train(dir, &["--ckpt-dir", "split", "--compile-budget", "50", "--log", "split.jsonl"]);
    assert!(ok, "{split}");
    for k in 1..=3 {
        assert!(split.contains(&format!("after {} updates (compile-budget restart {k})", 2 * k)), "{split}");
    }
    assert!(!split.contains("restart 4"), "{split}");
    assert_eq!(weights(&dir.join("whole")), weights(&dir.join("split")), "final weights differ");
    // The log of the restarted run is one history: 8 updates, three restart checkpoints.
    let read = |name: &str| anetrain::telemetry::LogReader::read_all(&dir.join(name)).unwrap().0;
    let (log, whole_log) = (read("split.jsonl"), read("whole.jsonl"));
    let losses = |l: &anetrain::telemetry::RunLog| l.updates.iter().map(|u| u.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&log).len(), 8);
    assert_eq!(losses(&log), losses(&whole_log), "every update's loss, bit for bit");
    assert_eq!(log.headers.len(), 4);
    assert_eq!(log.checkpoints.iter().filter(|c| c.kind == "restart").count(), 3);
}

#[test]
fn restart_limits_and_a_too_small_budget_are_refused() {
    let tmp = tempfile::Builder::new().prefix("anetrain-restart-bad-").tempdir().unwrap();
    let dir = tmp.path();
    // Past --max-restarts: the checkpoint is kept and the message says how to continue.
    let (ok, out) = train(dir, &["--ckpt-dir", "max", "--compile-budget", "50", "--max-restarts", "1"]);
    assert!(!ok, "{out}");
    assert!(out.contains("--max-restarts is 1") && out.contains("--resume latest"), "{out}");
    assert_eq!(std::fs::read_to_string(dir.join("max/latest")).unwrap(), "step-00000004");
    // One bake (42 compiles) cannot fit 30.
    let (ok, out) = train(dir, &["--ckpt-dir", "small", "--compile-budget", "30"]);
    assert!(!ok && out.contains("--compile-budget 30 is too small"), "{out}");
    // A run that would need a restart has to have a checkpoint directory, checked up front.
    let (ok, out) = train(dir, &["--compile-budget", "50"]);
    assert!(!ok && out.contains("give --ckpt-dir"), "{out}");
    assert!(!out.contains("step "), "refused before training: {out}");
    // Static mode is for the MIL backends.
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["train", "--backend", "cpu", "--ane-mode", "static", "--model", "stories260k", "--data", "synthetic"])
        .args(["--steps", "1", "--no-peak", "--sample-tokens", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("use it with --backend mil-sim or ane"), "{text}");
}
