//! The dashboard as a person uses it: under tmux, on short training runs. Each test runs its
//! own tmux server, reads the screen with capture-pane and types with send-keys.

use anetrain::telemetry::LogReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A private tmux server, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// None (the test skips) where tmux is missing, except under CI, which installs it.
    fn start(name: &str, width: u16, height: u16, command: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(std::env::var_os("CI").is_none(), "tmux is missing (.ci/run installs it)");
            eprintln!("skipping: tmux is not installed");
            return None;
        }
        let t = Tmux { socket: format!("anetrain-{name}-{}", std::process::id()) };
        let (w, h) = (width.to_string(), height.to_string());
        let out = t.run(&["new-session", "-d", "-s", "main", "-x", &w, "-y", &h, command]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        Some(t)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").args(["-L", &self.socket, "-f", "/dev/null"]).args(args).output().expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "main"]).stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        assert!(self.run(&["send-keys", "-t", "main", keys]).status.success());
    }

    /// Polls the screen until `ok` holds; panics with the last screen after `limit`.
    fn wait_for(&self, what: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(start.elapsed() < limit, "timed out waiting for {what}; screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_anetrain")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anetrain-dash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for a file that is written whole with a final newline.
fn wait_file(path: &Path, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s;
        }
        assert!(start.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number right after `word` on the screen (e.g. `step 12/…` → 12).
fn number_after(screen: &str, word: &str) -> Option<f64> {
    let at = screen.find(word)? + word.len();
    let text: String = screen[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    text.parse().ok()
}

const TINY: &str = "--model stories260k --data synthetic --batch 2 --seq 32 --no-peak --threads 1";

#[test]
fn dashboard_shows_the_run_and_q_stops_it_with_a_checkpoint() {
    let dir = scratch("run");
    let (log, ckpt, exit, stderr) = (dir.join("run.jsonl"), dir.join("ckpt"), dir.join("exit"), dir.join("stderr"));
    let cmd = format!(
        "'{}' dashboard -- train {TINY} --steps 100000 --eval-every 4 --eval-tokens 64 --print-every 1 \
         --ckpt-dir '{}' --log '{}' 2> '{}'; echo $? > '{}'",
        bin(),
        ckpt.display(),
        log.display(),
        stderr.display(),
        exit.display()
    );
    let Some(tmux) = Tmux::start("run", 80, 24, &cmd) else { return };
    let screen = tmux.wait_for("updates, an evaluation and CPU figures", Duration::from_secs(90), |s| {
        number_after(s, "step ").is_some_and(|n| n >= 5.0)
            && s.contains("eval val")
            && number_after(s, "│cpu ").is_some()
    });
    for panel in ["loss", "throughput", "learning rate", "system", "events", "log", "sample", "stories260k"] {
        assert!(screen.contains(panel), "no '{panel}' on the screen:\n{screen}");
    }
    // The numbers on the screen are the log's.
    let (run, _) = LogReader::read_all(&log).unwrap();
    let step = number_after(&screen, "step ").unwrap() as usize;
    let update = run.updates.iter().find(|u| u.step == step).expect("the shown step is in the log");
    let loss = number_after(&screen, "│loss ").expect("a loss line");
    assert_eq!(format!("{loss:.4}"), format!("{:.4}", update.loss), "screen:\n{screen}");
    assert_eq!(number_after(&screen, "tok/s "), Some(update.tokens_per_s.round()), "screen:\n{screen}");
    let shown = screen.lines().find(|l| l.contains(" eval val ")).expect("an evaluation event");
    let eval_step: usize = shown.trim_start_matches('│').split_whitespace().next().unwrap().parse().unwrap();
    let eval = run.evals.iter().find(|e| e.step == eval_step).expect("the shown evaluation is in the log");
    assert!(shown.contains(&format!("{:>6} eval val {:.4}", eval.step, eval.val_loss)), "screen:\n{screen}");
    assert!(number_after(&screen, "│cpu ").unwrap() > 0.0, "screen:\n{screen}");

    // q: the trainer checkpoints and the dashboard quits.
    tmux.keys("q");
    let code = wait_file(&exit, Duration::from_secs(60));
    let cost = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(code.trim(), "0", "dashboard exit status; stderr: {cost}");
    eprintln!("{}", cost.trim());
    assert!(cost.contains("% of one core"), "{cost}");
    let saved = anetrain::checkpoint::native::load(&ckpt).expect("a checkpoint after q");
    let (run, note) = LogReader::read_all(&log).unwrap();
    assert_eq!(note, None);
    assert_eq!(run.updates.last().unwrap().step, saved.step);
    assert!(run.checkpoints.iter().any(|c| c.kind == "stop" && c.step == saved.step), "{:?}", run.checkpoints);
    // And it resumes.
    let more = (saved.step + 2).to_string();
    let out = Command::new(bin())
        .arg("train")
        .args(TINY.split(' '))
        .args(["--steps", &more, "--ckpt-dir", ckpt.to_str().unwrap(), "--resume", "latest"])
        .args(["--log", log.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(anetrain::checkpoint::native::load(&ckpt).unwrap().step, saved.step + 2);
    drop(tmux);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn attached_to_a_damaged_log_it_shows_what_is_valid_and_generates() {
    let dir = scratch("attach");
    let (log, ckpt) = (dir.join("run.jsonl"), dir.join("ckpt"));
    let out = Command::new(bin())
        .arg("train")
        .args(TINY.split(' '))
        .args(["--steps", "6", "--eval-every", "3", "--eval-tokens", "64"])
        .args(["--ckpt-dir", ckpt.to_str().unwrap(), "--log", log.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let valid_lines = std::fs::read_to_string(&log).unwrap().lines().count();
    // Another program's line, then a line cut off mid-way.
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("2026-12-04 INFO something else entirely\n{\"type\":\"update\",\"step\":7,\"lo");
    std::fs::write(&log, text).unwrap();
    let cmd = format!("'{}' dashboard --attach '{}' 2> '{}'", bin(), log.display(), dir.join("stderr").display());
    // Too small first: it says so.
    let Some(tmux) = Tmux::start("attach", 60, 20, &cmd) else { return };
    tmux.wait_for("the too-small message", Duration::from_secs(20), |s| s.contains("terminal too small: 60×20"));
    // Grown to 80×24, it draws the panels, with one line about what was skipped.
    assert!(tmux.run(&["resize-window", "-t", "main", "-x", "80", "-y", "24"]).status.success());
    // "finished" comes from the log's last line, which may be drawn a frame after "step 6/6".
    let screen = tmux.wait_for("the panels and the note", Duration::from_secs(20), |s| {
        s.contains("throughput") && s.contains("step 6/6") && s.contains("skipped 1 line") && s.contains("finished")
    });
    let note = format!("skipped 1 line that is not anetrain telemetry (first: line {})", valid_lines + 1);
    let flat: String = screen.lines().map(str::trim_end).collect::<Vec<_>>().join("");
    assert!(flat.contains(&note[..40]), "{screen}");
    // g generates from the latest checkpoint in a worker thread.
    tmux.keys("g");
    let screen = tmux.wait_for("generated text", Duration::from_secs(60), |s| {
        !s.contains("generating…") && !s.contains("press g to generate")
    });
    assert!(!screen.contains("generate failed") && !screen.contains("no checkpoint"), "{screen}");
    tmux.keys("q");
    let start = Instant::now();
    while tmux.run(&["has-session", "-t", "main"]).status.success() {
        assert!(start.elapsed() < Duration::from_secs(20), "q did not quit: {}", tmux.screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(tmux);
    std::fs::remove_dir_all(&dir).unwrap();
}
