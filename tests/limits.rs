//! Inputs that ask for more memory, threads or data than a machine has: each is refused in one
//! sentence that names the estimate and the available memory, with exit status 1 — never an
//! abort (134) or a hang. Runs under `ulimit -v` (RLIMIT_AS, set in the child) where the
//! outcome would otherwise depend on this machine's memory.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_anetrain"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anetrain-limits-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs with the address space limited to `limit` bytes (as `ulimit -v` does).
fn run_limited(args: &[&str], limit: u64) -> Output {
    let mut cmd = bin();
    cmd.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run anetrain")
}

const GB: u64 = 1_000_000_000;

/// Exit status 1 (not a signal), and stderr ends in the single line `error: …` containing `want`.
fn assert_refused(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), None, "killed by a signal: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "the error is the last line: {stderr}");
    assert!(errors[0].contains(want), "wanted '{want}' in: {stderr}");
}

#[test]
fn training_activations_are_estimated_before_allocating() {
    // stories260k at B=2048, T=512: ~100 GB of attention probabilities and activations, while
    // its weights and optimizer state alone (the only thing sized before) are 4 MB.
    let out = run_limited(
        &["train", "--model", "stories260k", "--data", "synthetic", "--batch", "2048", "--seq", "512"],
        8 * GB,
    );
    assert_refused(&out, "training stories260k with --batch 2048 --seq 512 needs about ");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attention probabilities") && err.contains("(ulimit -v); lower --batch or --seq"), "{err}");
}

#[test]
fn a_600m_model_under_a_memory_limit_is_refused_before_adamw() {
    // 596M parameters: 9.5 GB of weights, gradients and AdamW moments against a 4 GB limit.
    let out = run_limited(&["train", "--model", "qwen3-0.6b", "--batch", "1", "--seq", "16"], 4 * GB);
    assert_refused(&out, "training qwen3-0.6b with --batch 1 --seq 16 needs about 9.6 GB");
    assert!(String::from_utf8_lossy(&out.stderr).contains("weights, gradients and AdamW state 9.5 GB"));
}

#[test]
fn eval_batch_and_bench_and_mil_sequence_lengths_are_bounded() {
    let dir = scratch("eval");
    let ckpt = dir.join("ckpt");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let out = bin()
        .args(["train", "--model", "stories260k", "--data", "synthetic", "--steps", "1", "--batch", "1"])
        .args(["--seq", "16", "--no-peak", "--threads", "1", "--ckpt-dir", &s(&ckpt)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let data = dir.join("tokens.bin");
    let ids: Vec<u32> = (0..3_300_000u32).map(|i| i % 512).collect();
    anetrain::data::TokenData::write(&data, &ids, 512, "test").unwrap();
    let out =
        run_limited(&["eval", "--model", &s(&ckpt), "--data", &s(&data), "--seq", "32", "--batch", "100000"], 8 * GB);
    assert_refused(&out, "with --batch 100000 --seq 32 needs about ");

    let out = bin().args(["bench", "step", "--model", "stories260k", "--seq", "100000"]).output().unwrap();
    assert_refused(&out, "--seq 100000 exceeds the model's max_position_embeddings (512)");
    let out = run_limited(&["bench", "step", "--model", "stories260k", "--batch", "2000", "--seq", "512"], 8 * GB);
    assert_refused(&out, "training stories260k with --batch 2000 --seq 512 needs about ");

    let emit = |seq: &str| {
        bin().args(["mil", "emit", "--model", "stories260k", "--seq", seq, "--out", &s(&dir.join("mil"))]).output()
    };
    assert_refused(&emit("100000000").unwrap(), "sequence length 100000000 exceeds the model's");
    assert_refused(&emit("513").unwrap(), "sequence length 513 exceeds the model's max_position_embeddings (512)");
    assert!(emit("512").unwrap().status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prepare_refuses_absurd_vocabularies_corpora_and_devices() {
    let dir = scratch("prepare");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let run = |args: &[&str]| bin().args(["prepare", "--out", out]).args(args).output().unwrap();
    let r = run(&["--input", "builtin:stories:50", "--tokenizer", "bpe:4000000000"]);
    assert_refused(&r, "training a BPE of 4000000000 entries needs about 512.0 GB");
    assert_refused(
        &run(&["--input", "builtin:stories:99999999999999"]),
        "generating 99999999999999 stories needs about 102.4 PB",
    );
    assert_refused(&run(&["--input", "/dev/zero"]), "/dev/zero is not a regular file");
    // A vocabulary bigger than the text can yield is trained as far as the text allows.
    let r = run(&["--input", "builtin:stories:30", "--tokenizer", "bpe:1000000"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn absurd_thread_counts_are_capped_with_a_note() {
    let dir = scratch("threads");
    let mut child = bin()
        .args(["prepare", "--input", "builtin:stories:20", "--tokenizer", "bpe:300", "--threads", "100000"])
        .args(["--out", dir.join("out").to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("--threads 100000 hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let cores = std::thread::available_parallelism().unwrap().get();
    let note =
        format!("note: --threads 100000 is more than 4 per core on this {cores}-core machine; using {}", 4 * cores);
    assert!(err.contains(&note), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
