//! The telemetry log as a person gets it from `anetrain train --log`: a header, one line per
//! update, eval/checkpoint/report events, all in the documented schema; a resumed run
//! appends to the same log; and the trainer's loss-scale events.

use anetrain::telemetry::{LogReader, Record, SCHEMA, SCHEMA_VERSION};
use std::path::Path;
use std::process::Command;

fn train(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain")).arg("train").args(args).output().expect("run anetrain");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
}

fn records(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l}: {e}")))
        .collect()
}

fn tiny_run<'a>(log: &'a str, ckpt: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "--model",
        "stories260k",
        "--data",
        "synthetic",
        "--seq",
        "32",
        "--batch",
        "2",
        "--steps",
        steps,
        "--eval-every",
        "3",
        "--eval-tokens",
        "64",
        "--ckpt-dir",
        ckpt,
        "--ckpt-every",
        "3",
        "--no-peak",
        "--threads",
        "1",
        "--log",
        log,
    ]
}

#[test]
fn log_follows_the_schema_and_a_resume_appends() {
    let dir = std::env::temp_dir().join(format!("anetrain-telemetry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("run.jsonl");
    let ckpt = dir.join("ckpt");
    let (log_s, ckpt_s) = (log.to_str().unwrap(), ckpt.to_str().unwrap());
    train(&tiny_run(log_s, ckpt_s, "6"));
    let first = records(&log);
    let Record::Header(h) = &first[0] else { panic!("first line is not a header: {:?}", first[0]) };
    assert_eq!((h.schema.as_str(), h.version), (SCHEMA, SCHEMA_VERSION));
    assert_eq!((h.model.as_str(), h.batch, h.seq, h.steps, h.start_step), ("stories260k", 2, 32, 6, 0));
    assert!(h.params > 200_000 && h.flops_per_token > 0.0 && h.resumed_from.is_none());
    let updates: Vec<_> = first.iter().filter_map(|r| if let Record::Update(u) = r { Some(u) } else { None }).collect();
    assert_eq!(updates.iter().map(|u| u.step).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    for u in &updates {
        assert!(u.rss_mb > 1.0 && u.cpu_s > 0.0 && u.elapsed_s > 0.0, "{u:?}");
        assert_eq!(u.tokens_seen, u.step * 64);
    }
    assert!(updates.windows(2).all(|w| w[1].cpu_s >= w[0].cpu_s));
    let kinds = |recs: &[Record]| {
        recs.iter()
            .map(|r| match r {
                Record::Header(_) => "header".to_string(),
                Record::Update(u) => format!("u{}", u.step),
                Record::Eval(e) => format!("eval{}", e.step),
                Record::Checkpoint(c) => format!("{}{}", c.kind, c.step),
                Record::LossScale(_) => "scale".to_string(),
                Record::Report(_) => "report".to_string(),
            })
            .collect::<Vec<_>>()
    };
    let expected = "header u1 u2 u3 eval3 periodic3 best3 u4 u5 u6 eval6 final6";
    let got = kinds(&first);
    assert!(got.join(" ").starts_with(expected), "{got:?}");
    assert_eq!(got.last().unwrap(), "report");
    let Record::Eval(e) = &first[4] else { unreachable!() };
    assert_eq!(Some(e.val_loss), updates[2].val_loss);
    assert_eq!(e.tokens, 64);

    // Resume to 9 updates with the same log: the first run's lines stay, a second header
    // marks the resume, and the steps continue.
    let mut args = tiny_run(log_s, ckpt_s, "9");
    args.extend(["--resume", "latest"]);
    train(&args);
    let all = records(&log);
    assert_eq!(kinds(&all[..first.len()]), got, "the first run's lines changed");
    let Record::Header(h2) = &all[first.len()] else { panic!("no header after the resume") };
    assert_eq!(h2.start_step, 6);
    assert!(h2.resumed_from.as_deref().unwrap().contains("step-00000006"), "{h2:?}");
    let (log_read, note) = LogReader::read_all(&log).unwrap();
    assert_eq!(note, None);
    assert_eq!(log_read.headers.len(), 2);
    assert_eq!(log_read.updates.iter().map(|u| u.step).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    assert_eq!(log_read.updates[8].tokens_seen, 9 * 64);
    assert_eq!(log_read.report.as_ref().unwrap().step, 9);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loss_scale_changes_are_events() {
    use anetrain::backend::cpu::CpuBackend;
    use anetrain::config::ModelConfig;
    use anetrain::data::{TokenData, synthetic_tokens};
    use anetrain::ops::{GemmImpl, Par};
    use anetrain::telemetry::Telemetry;
    use anetrain::train::{TrainOptions, Trainer};
    let cfg = ModelConfig { n_layers: 1, vocab_size: 64, ..ModelConfig::preset("stories260k").unwrap() };
    let par = Par { threads: 1, gemm: GemmImpl::Gemm };
    let mut t =
        Trainer::new(&cfg, TrainOptions::new(4, 2, 16), par, Box::new(CpuBackend::new(&cfg, 2, 16, par))).unwrap();
    t.inject_nonfinite_at = Some(1);
    let data = TokenData::from_vec(synthetic_tokens(64, 5_000, 3), 64, "synthetic").unwrap();
    let mut telemetry = Telemetry::none();
    t.run(&data, &mut telemetry, None, |_| {}).unwrap();
    let h = &telemetry.history;
    assert_eq!(h.updates.len(), 4);
    assert!(h.updates[1].skipped);
    assert_eq!(h.loss_scales.len(), 1, "{:?}", h.loss_scales);
    let e = &h.loss_scales[0];
    assert_eq!((e.step, e.from, e.to, e.reason.as_str()), (2, 65536.0, 32768.0, "overflow"));
}
