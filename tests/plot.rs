//! `anetrain plot` and the checkpoint directory's loss.png, checked as a person would: the PNG
//! is decoded, has the documented size, and holds each run's curves (pixels of its color).

use anetrain::telemetry::LogReader;
use std::path::Path;
use std::process::Output;

#[path = "common/cli.rs"]
mod cli;
use cli::anetrain;

fn ok(out: Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    text
}

/// Width, height, and the count of pixels of each color in `colors`.
fn decode(path: &Path, colors: &[[u8; 3]]) -> (u32, u32, Vec<usize>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let pixels = &buf[..info.buffer_size()];
    let counts = colors.iter().map(|c| pixels.chunks_exact(3).filter(|p| *p == c).count()).collect();
    (info.width, info.height, counts)
}

const BLUE: [u8; 3] = [31, 119, 180];
const RED: [u8; 3] = [214, 39, 40];

fn train(log: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--model", "stories260k", "--data", "synthetic", "--batch", "2", "--seq", "32"];
    args.extend([
        "--no-peak",
        "--threads",
        "1",
        "--eval-every",
        "4",
        "--eval-tokens",
        "64",
        "--log",
        log.to_str().unwrap(),
    ]);
    args.extend(extra);
    ok(anetrain(&args));
}

#[test]
fn plots_overlay_runs_and_checkpoints_carry_loss_png() {
    let dir = std::env::temp_dir().join(format!("anetrain-plot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    let ckpt = dir.join("ckpt");
    train(&a, &["--steps", "12", "--lr", "3e-3", "--ckpt-dir", ckpt.to_str().unwrap(), "--ckpt-every", "6"]);
    train(&b, &["--steps", "8", "--lr", "1e-3", "--seed", "7"]);

    // Every checkpoint rewrote loss.png in the checkpoint directory.
    let (w, h, counts) = decode(&ckpt.join("loss.png"), &[BLUE]);
    assert_eq!((w, h), (1200, 900));
    assert!(counts[0] > 1000, "the run's curves are missing from loss.png ({} blue pixels)", counts[0]);

    let out = dir.join("both.png");
    let said = ok(anetrain(&["plot", a.to_str().unwrap(), b.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    assert!(said.contains("2 runs, 20 updates"), "{said}");
    let (w, h, counts) = decode(&out, &[BLUE, RED, [255, 255, 255]]);
    assert_eq!((w, h), (1200, 900));
    assert!(counts[0] > 1000 && counts[1] > 1000, "curves of both runs: {counts:?}");
    assert!(counts[2] < (w * h) as usize * 98 / 100, "the image is (nearly) blank: {counts:?}");

    let svg = dir.join("both.svg");
    ok(anetrain(&["plot", a.to_str().unwrap(), b.to_str().unwrap(), "--svg", "--out", svg.to_str().unwrap()]));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.contains("polyline") && text.contains("loss vs tokens"),
        "{}",
        &text[..200]
    );

    let csv = dir.join("a.csv");
    ok(anetrain(&["plot", a.to_str().unwrap(), "--csv", "--out", csv.to_str().unwrap()]));
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows[0][..5], ["run", "step", "tokens_seen", "loss", "val_loss"]);
    let (log, _) = LogReader::read_all(&a).unwrap();
    assert_eq!(rows.len(), 1 + log.updates.len());
    for (row, u) in rows[1..].iter().zip(&log.updates) {
        assert_eq!(row[1].parse::<usize>().unwrap(), u.step);
        assert_eq!(row[3].parse::<f64>().unwrap(), u.loss);
    }
    assert_eq!(rows[4][4].parse::<f64>().unwrap(), log.evals[0].val_loss);

    // A log without updates is refused, and a missing one named.
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "garbage\n").unwrap();
    let out = anetrain(&["plot", empty.to_str().unwrap(), "--out", dir.join("x.png").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("no updates to plot") && text.contains("skipped 1 line"), "{text}");
    let out = anetrain(&["plot", dir.join("missing.jsonl").to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    std::fs::remove_dir_all(&dir).unwrap();
}
