//! Faults, through the binary: Ctrl-C (SIGINT) or SIGTERM writes a final checkpoint and exits
//! with the shell's status for the signal (130, 143); SIGKILL at
//! random moments (including mid-checkpoint) always leaves a loadable latest checkpoint that a
//! resume continues from; a write failing for lack of space leaves the previous checkpoint
//! intact and exits with a clear message.

use anetrain::checkpoint::native;
use anetrain::rng::Rng;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
use cli::{bin, scratch};

/// A long training run of the tiny default model that checkpoints after every update.
fn long_run(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args([
        "train",
        "--model",
        "stories260k",
        "--data",
        "synthetic",
        "--steps",
        "100000",
        "--batch",
        "2",
        "--seq",
        "16",
    ])
    .args(["--print-every", "100000", "--no-peak"])
    .args(["--threads", "1", "--ckpt-dir", dir.to_str().unwrap()])
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ctrl_c_and_sigterm_checkpoint_and_exit_with_the_signals_status() {
    for (signal, name, status) in [(libc::SIGINT, "sigint", 130), (libc::SIGTERM, "sigterm", 143)] {
        let tmp = scratch(name);
        let dir = tmp.path().to_path_buf();
        let log = dir.with_extension("jsonl");
        let mut cmd = long_run(&dir, &["--ckpt-every", "1000000", "--log", log.to_str().unwrap()]);
        let child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        // The handler is installed before the first update; once one is logged, it is in place.
        let start = Instant::now();
        let updates = |text: &str| text.lines().filter(|l| l.contains(r#""type":"update""#)).count();
        while std::fs::read_to_string(&log).map_or(true, |s| updates(&s) == 0) {
            assert!(start.elapsed() < Duration::from_secs(30), "training did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(status), "exit status after one {name}");
        let ckpt = native::load(&dir).unwrap();
        assert!(ckpt.step > 0 && ckpt.step < 100000, "checkpoint at step {}", ckpt.step);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(r#""kind":"stop""#), "no stop checkpoint event in the log");
        assert!(text.contains(r#""type":"report""#), "no report in the log");
        assert_eq!(updates(&text), ckpt.step, "the checkpoint is of the last completed update");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let said = format!("interrupted at step {}/100000; checkpoint in {}", ckpt.step, dir.display());
        assert!(stdout.contains(&said), "{stdout}");
        std::fs::remove_file(&log).unwrap();
    }
}

#[test]
fn sigkill_at_random_moments_leaves_a_loadable_checkpoint() {
    let tmp = scratch("sigkill");
    let dir = tmp.path().to_path_buf();
    let mut rng = Rng::new(2026);
    let mut last_step = 0;
    for trial in 0..6 {
        let resume: Vec<&str> =
            if trial == 0 { vec!["--ckpt-every", "1"] } else { vec!["--ckpt-every", "1", "--resume", "latest"] };
        let mut child = long_run(&dir, &resume).spawn().unwrap();
        wait_for(&dir.join("latest"), Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(200 + rng.below(400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let ckpt = native::load(&dir).unwrap_or_else(|e| panic!("trial {trial}: latest checkpoint unreadable: {e:#}"));
        assert!(ckpt.step >= last_step, "trial {trial}: checkpoint went back from {last_step} to {}", ckpt.step);
        last_step = ckpt.step;
    }
    // The run resumes from the last survivor and finishes cleanly.
    let out = Command::new(bin())
        .args(["train", "--model", "stories260k", "--data", "synthetic", "--batch", "2", "--seq", "16", "--no-peak"])
        .args(["--threads", "1", "--resume", "latest"])
        .args(["--steps", &(last_step + 3).to_string(), "--ckpt-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(native::load(&dir).unwrap().step, last_step + 3);
}

#[test]
fn a_full_disk_during_a_checkpoint_loses_nothing() {
    let tmp = scratch("diskfull");
    let dir = tmp.path().to_path_buf();
    let first = Command::new(bin())
        .args(["train", "--model", "stories260k", "--data", "synthetic", "--steps", "3", "--batch", "2", "--seq", "16"])
        .args(["--no-peak", "--threads", "1"])
        .args(["--ckpt-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // The same run resumed under a 1.5 MB file-size limit: the 1 MB weights file fits, the
    // 2 MB optimizer file does not (as on a disk that fills up mid-checkpoint).
    let script = format!(
        "ulimit -f 1500 2>/dev/null || exit 77; exec {} train --model stories260k --data synthetic --steps 6 --batch 2 \
         --seq 16 --no-peak --threads 1 --ckpt-dir {} --resume latest",
        bin(),
        dir.display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    if out.status.code() == Some(77) {
        eprintln!("skipping: this shell cannot set a file-size limit");
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the checkpoint write should have failed");
    assert!(err.contains("disk full?") && !err.contains("panicked"), "{err}");
    let ckpt = native::load(&dir).unwrap();
    assert_eq!(ckpt.step, 3, "the previous checkpoint must still be the latest, intact");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}
