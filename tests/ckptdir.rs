//! Checkpoint directories through the binary: one run per directory (a lock against a second
//! trainer, a fresh run refused unless --overwrite, a resume from an earlier step moving the
//! later ones aside), validated state.json values, checksums of every file, `convert`
//! refusing to write into a checkpoint, and the tokenizer saved beside the weights.

use anetrain::checkpoint::native;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
use cli::{anetrain, scratch, text};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `train` of the tiny model on synthetic data into `dir`, plus `extra`.
fn train(dir: &Path, steps: usize, extra: &[&str]) -> Output {
    let steps = steps.to_string();
    let mut args = vec!["train", "--model", "stories260k", "--data", "synthetic", "--batch", "2", "--seq", "16"];
    args.extend(["--no-peak", "--threads", "1", "--eval-every", "0", "--steps", &steps, "--ckpt-dir", s(dir)]);
    args.extend(extra);
    anetrain(&args)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn a_second_trainer_on_the_same_directory_is_refused_with_the_first_ones_pid() {
    let tmp = scratch("ckptdir-lock");
    let dir = tmp.path().join("run");
    let mut first = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["train", "--model", "stories260k", "--data", "synthetic", "--batch", "2", "--seq", "16"])
        .args(["--steps", "1000000", "--ckpt-every", "1", "--no-peak", "--threads", "1", "--ckpt-dir", s(&dir)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !dir.join("latest").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "the first trainer did not checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    for extra in [&["--resume", "latest"][..], &[][..], &["--overwrite"][..]] {
        let out = train(&dir, 5, extra);
        let all = text(&out);
        assert!(!out.status.success(), "{extra:?}: a second trainer ran: {all}");
        assert!(all.contains(&format!("is in use by process {}", first.id())), "{extra:?}: {all}");
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // The kernel released the lock with the process: a resume now works.
    let step = native::load(&dir).unwrap().step;
    let out = train(&dir, step + 2, &["--resume", "latest"]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_history_per_directory() {
    let tmp = scratch("ckptdir-history");
    let dir = tmp.path().join("run");
    let out = train(&dir, 4, &["--ckpt-every", "1", "--keep-last", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(names(&dir), [".lock", "latest", "loss.png", "step-00000002", "step-00000003", "step-00000004"]);

    // A fresh run into it is refused, and nothing is touched.
    let out = train(&dir, 4, &[]);
    assert!(
        !out.status.success() && text(&out).contains("already holds latest, loss.png, step-00000002"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("--overwrite"), "{}", text(&out));
    assert_eq!(native::load(&dir).unwrap().step, 4);

    // Already at --steps: nothing to do, said so, exit 0, nothing written.
    let out = train(&dir, 4, &["--resume", "latest"]);
    assert!(out.status.success() && text(&out).contains("nothing to do: already at step 4"), "{}", text(&out));
    assert!(!text(&out).contains("--- efficiency"), "{}", text(&out));

    // A resume from step 2 moves steps 3 and 4 aside and points `latest` back; the run then
    // continues one history (and --keep-last counts only it).
    let out = train(&dir, 6, &["--ckpt-every", "1", "--keep-last", "3", "--resume", s(&dir.join("step-00000002"))]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("resuming at step 2: moved the later step-00000003, step-00000004 into"), "{all}");
    let listing = names(&dir);
    let aside = listing.iter().find(|n| n.starts_with("superseded-")).expect("a superseded directory");
    assert_eq!(names(&dir.join(aside)), ["step-00000003", "step-00000004"]);
    assert_eq!(
        listing.iter().filter(|n| n.starts_with("step-")).collect::<Vec<_>>(),
        ["step-00000004", "step-00000005", "step-00000006"]
    );
    assert_eq!(std::fs::read_to_string(dir.join("latest")).unwrap(), "step-00000006");
    // The new step 4 is the resumed history's, not the superseded one.
    let (new4, old4) = (
        native::load(&dir.join("step-00000004")).unwrap(),
        native::load(&dir.join(aside).join("step-00000004")).unwrap(),
    );
    assert_eq!((new4.step, old4.step), (4, 4));

    // --overwrite starts afresh: the earlier entries go.
    let out = train(&dir, 2, &["--overwrite"]);
    assert!(out.status.success() && text(&out).contains("--overwrite: removed"), "{}", text(&out));
    assert_eq!(names(&dir), [".lock", "latest", "loss.png", "step-00000002"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoints_are_verified_and_validated() {
    let tmp = scratch("ckptdir-verify");
    let dir = tmp.path().join("run");
    let out = train(&dir, 3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let step = dir.join("step-00000003");

    // convert refuses to write into a checkpoint (its step directory, or the directory).
    for to in [step.clone(), dir.clone(), step.join("model.bin")] {
        let out = anetrain(&["convert", "--from", s(&dir), "--to", s(&to)]);
        assert!(!out.status.success() && text(&out).contains("inside the training checkpoint"), "{}", text(&out));
    }
    assert!(!step.join("config.json").exists() && !step.join("model.bin").exists());

    // One flipped bit in any tensor file is caught by its checksum, naming the file.
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let path = step.join(file);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        let at = bad.len() - 5;
        bad[at] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let out = train(&dir, 5, &["--resume", "latest"]);
        let all = text(&out);
        assert!(!out.status.success() && all.contains(&format!("{file} is corrupt: its checksum")), "{all}");
        std::fs::write(&path, &good).unwrap();
    }

    // Edited state.json values are refused with what is wrong.
    let state_path = step.join("state.json");
    let good = std::fs::read_to_string(&state_path).unwrap();
    let edit = |from: &str, to: &str| {
        assert!(good.contains(from), "state.json lacks {from}");
        std::fs::write(&state_path, good.replace(from, to)).unwrap();
        text(&train(&dir, 5, &["--resume", "latest"]))
    };
    let err = edit("\"adam_step\": 3", "\"adam_step\": 7");
    assert!(err.contains("adam_step 7 exceeds step 3"), "{err}");
    let err = edit("\"scale\": 65536.0", "\"scale\": 3.0");
    assert!(err.contains("not a power of two"), "{err}");
    let err = edit("\"mode\": \"dynamic\"", "\"mode\": \"sometimes\"");
    assert!(err.contains("corrupt") && !err.contains("panicked"), "{err}");
    std::fs::write(&state_path, &good).unwrap();

    // A version-1 checkpoint (no checksums, the mode as Debug text) still resumes, with a note.
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["version"] = 1.into();
    v["loss_scale"]["mode"] = "Dynamic".into();
    v.as_object_mut().unwrap().remove("files");
    std::fs::write(&state_path, serde_json::to_string(&v).unwrap()).unwrap();
    let out = train(&dir, 4, &["--resume", "latest"]);
    let all = text(&out);
    assert!(out.status.success() && all.contains("version-1 checkpoint without checksums"), "{all}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoints_carry_the_tokenizer_they_were_trained_with() {
    let tmp = scratch("ckptdir-tokenizer");
    let base = tmp.path().join("run");
    let (data, other, ckpt) = (base.join("data"), base.join("other"), base.join("ckpt"));
    for (out, input) in [(&data, "builtin:stories:300"), (&other, "builtin:stories:301")] {
        let made = anetrain(&["prepare", "--input", input, "--tokenizer", "bpe:512", "--out", s(out)]);
        assert!(made.status.success(), "{}", text(&made));
    }
    let mut args = vec!["train", "--model", "stories260k", "--data", s(&data), "--steps", "3", "--seq", "32"];
    args.extend(["--batch", "2", "--no-peak", "--eval-every", "0", "--ckpt-dir", s(&ckpt)]);
    let out = anetrain(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(ckpt.join("step-00000003/tokenizer.json").is_file());

    // `generate --model <dir>/latest --prompt` needs no --tokenizer.
    let latest = ckpt.join("latest");
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", s(&latest), "--prompt", "Once upon a time", "--max-tokens", "5"];
        args.extend(extra);
        anetrain(&args)
    };
    let out = generate(&[]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("Once upon a time"),
        "{}",
        text(&out)
    );
    // Another tokenizer given explicitly is refused (for generate and, via its tokens, eval).
    let err = text(&generate(&["--tokenizer", s(&other)]));
    assert!(err.contains("was trained with hf:") && err.contains("leave out --tokenizer"), "{err}");
    let out = anetrain(&["eval", "--model", s(&ckpt), "--data", s(&other.join("val.tok")), "--seq", "32"]);
    assert!(!out.status.success() && text(&out).contains("made with tokenizer"), "{}", text(&out));
    let out = anetrain(&["eval", "--model", s(&ckpt), "--data", s(&data.join("val.tok")), "--seq", "32"]);
    assert!(out.status.success(), "{}", text(&out));

    // A model without a tokenizer says how to give one.
    let bare = base.join("bare");
    assert!(train(&bare, 1, &[]).status.success());
    let err = text(&anetrain(&["generate", "--model", s(&bare), "--prompt", "Hi"]));
    assert!(err.contains("--prompt needs --tokenizer") && err.contains("has no tokenizer saved"), "{err}");
    std::fs::remove_dir_all(&base).unwrap();
}
