//! `anetrain dashboard`: a terminal view of a training run. `dashboard -- <train args>` runs
//! `anetrain train` as a child process (its output feeds the log panel) and follows its
//! telemetry log; `dashboard --attach run.jsonl` follows a running or finished run's log.
//! Keys: q stops the trainer gracefully (it checkpoints) and quits, g generates from the
//! latest checkpoint in a worker thread, r restarts from the latest checkpoint, p toggles
//! auto-scroll, arrows scroll the log, l switches the loss axis between linear and log.
//!
//! Cost: the loop wakes at most every 200 ms, reads only what the log appended, samples
//! /proc once a second, and redraws only when something changed; ratatui diffs the screen,
//! so a redraw writes only the changed cells (no clearing, no flicker on resize).

use super::dashboard_ui as ui;
use anetrain::sysstat::{ProcSample, Rapl};
use anetrain::telemetry::LogReader;
use anyhow::{Context, Result, bail};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

/// Lines of child output and notes kept for the log panel.
const LOG_LINES: usize = 2000;

pub enum Msg {
    Line(String),
    Generated(String),
}

/// Figures for the system panel; None shows as "n/a".
#[derive(Default)]
pub struct SysView {
    pub cpu_pct: Option<f64>,
    pub rss_mb: Option<f64>,
    /// Total and available system memory, MB.
    pub mem_mb: Option<(f64, f64)>,
    pub power_w: Option<f64>,
    pub power_note: &'static str,
    /// The dashboard's own CPU use, percent of one core.
    pub own_cpu_pct: f64,
}

pub struct App {
    pub reader: LogReader,
    /// `train` arguments (None when attached to a log).
    train_args: Option<Vec<String>>,
    child: Option<Child>,
    pub status: String,
    pub lines: VecDeque<String>,
    /// Lines scrolled up from the bottom of the log (0: the newest are shown).
    pub scroll: usize,
    pub auto_scroll: bool,
    pub log_scale: bool,
    pub sample: String,
    generating: bool,
    generation: u64,
    quit_after_child: bool,
    restart_after_child: bool,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    pub sys: SysView,
    proc_last: Option<(Instant, f64)>,
    own_last: (Instant, f64),
    rapl: Option<Rapl>,
}

/// The value of `--flag value` or `--flag=value` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter()
        .enumerate()
        .find_map(|(i, a)| if a == flag { args.get(i + 1).cloned() } else { a.strip_prefix(&eq).map(str::to_string) })
}

/// `args` without `--flag value` / `--flag=value`.
fn without_flag(args: &[String], flag: &str) -> Vec<String> {
    let eq = format!("{flag}=");
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == flag {
            skip = true;
        } else if !a.starts_with(&eq) {
            out.push(a.clone());
        }
    }
    out
}

impl App {
    fn new(log: &Path, train_args: Option<Vec<String>>) -> Self {
        let (tx, rx) = channel();
        let rapl = Rapl::open();
        let power_note = if rapl.is_some() { "" } else { "n/a" };
        App {
            reader: LogReader::new(log),
            train_args,
            child: None,
            status: String::new(),
            lines: VecDeque::new(),
            scroll: 0,
            auto_scroll: true,
            log_scale: false,
            sample: "press g to generate from the latest checkpoint".into(),
            generating: false,
            generation: 0,
            quit_after_child: false,
            restart_after_child: false,
            tx,
            rx,
            sys: SysView { power_note, ..Default::default() },
            proc_last: None,
            own_last: (Instant::now(), anetrain::sysstat::process_cpu_s()),
            rapl,
        }
    }

    pub fn attached(&self) -> bool {
        self.train_args.is_none()
    }

    pub fn push_line(&mut self, line: String) {
        if self.lines.len() == LOG_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
        if !self.auto_scroll && self.scroll > 0 {
            // Keep the view on the same lines while new ones arrive.
            self.scroll += 1;
        }
    }

    /// The checkpoint directory of the run (from the train arguments or the log's header).
    fn ckpt_dir(&self) -> Option<PathBuf> {
        match &self.train_args {
            Some(args) => flag_value(args, "--ckpt-dir").map(PathBuf::from),
            None => self.reader.log.header().and_then(|h| h.ckpt_dir.clone()).map(PathBuf::from),
        }
    }

    fn spawn_child(&mut self, args: &[String]) -> Result<()> {
        let exe = std::env::current_exe().context("cannot find the anetrain executable")?;
        let mut child = Command::new(exe)
            .arg("train")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start anetrain train")?;
        let stdout = child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>);
        let stderr = child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>);
        for out in [stdout, stderr].into_iter().flatten() {
            let tx = self.tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).split(b'\n').map_while(|l| l.ok()) {
                    if tx.send(Msg::Line(String::from_utf8_lossy(&line).trim_end().to_string())).is_err() {
                        break;
                    }
                }
            });
        }
        self.push_line(format!("[dashboard] started anetrain train (pid {})", child.id()));
        self.status = format!("training (pid {})", child.id());
        self.proc_last = None;
        self.child = Some(child);
        Ok(())
    }

    /// Asks the trainer to stop after its current update (it checkpoints); a second request
    /// makes it exit at once.
    fn stop_child(&mut self) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            self.status = "stopping: the trainer checkpoints after this update".into();
            self.push_line("[dashboard] asked the trainer to stop (SIGINT)".into());
        }
    }

    fn restart(&mut self) {
        let Some(args) = self.train_args.clone() else {
            self.push_line("[dashboard] r restarts a run started by the dashboard; this one is attached".into());
            return;
        };
        let Some(dir) = self.ckpt_dir() else {
            self.push_line("[dashboard] r needs --ckpt-dir in the train arguments".into());
            return;
        };
        if !dir.join("latest").exists() {
            self.push_line(format!("[dashboard] no checkpoint in {} yet", dir.display()));
            return;
        }
        if self.child.is_some() {
            self.restart_after_child = true;
            self.stop_child();
            return;
        }
        let mut resumed = without_flag(&args, "--resume");
        resumed.extend(["--resume".to_string(), "latest".to_string()]);
        self.push_line("[dashboard] restarting from the latest checkpoint".into());
        if let Err(e) = self.spawn_child(&resumed) {
            self.push_line(format!("[dashboard] {e:#}"));
        }
    }

    /// Generates from the latest checkpoint in a worker thread (a child `anetrain generate`),
    /// so the interface never waits for it.
    fn generate(&mut self) {
        if self.generating {
            return;
        }
        let Some(dir) = self.ckpt_dir() else {
            self.sample = "no checkpoint directory (train with --ckpt-dir)".into();
            return;
        };
        if !dir.join("latest").exists() {
            self.sample = format!("no checkpoint in {} yet", dir.display());
            return;
        }
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                self.sample = format!("cannot find the anetrain executable: {e}");
                return;
            }
        };
        self.generating = true;
        self.generation += 1;
        self.sample = "generating…".into();
        let (tx, seed) = (self.tx.clone(), self.generation.to_string());
        std::thread::spawn(move || {
            let mut cmd = Command::new(exe);
            cmd.args(["generate", "--model"]).arg(&dir);
            cmd.args(["--max-tokens", "64", "--threads", "1", "--seed", &seed]);
            // Checkpoints keep the tokenizer their tokens came from; synthetic data has none.
            let step_dir = anetrain::checkpoint::native::resolve(&dir).unwrap_or(dir.clone());
            if ["tokenizer.json", "tokenizer.bin"].iter().any(|f| step_dir.join(f).exists()) {
                cmd.args(["--prompt", "Once upon a time"]);
            } else {
                cmd.args(["--ids", "1"]);
            }
            let text = match cmd.stdin(Stdio::null()).output() {
                Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
                Ok(out) => format!("generate failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
                Err(e) => format!("cannot run generate: {e}"),
            };
            let _ = tx.send(Msg::Generated(text));
        });
    }

    /// Handles a key; returns true to quit now.
    fn key(&mut self, code: KeyCode, mods: KeyModifiers) -> bool {
        match code {
            KeyCode::Char('q') | KeyCode::Esc => {
                if self.child.is_none() {
                    return true;
                }
                self.quit_after_child = true;
                self.stop_child();
            }
            KeyCode::Char('c') if mods.contains(KeyModifiers::CONTROL) => {
                if self.child.is_none() {
                    return true;
                }
                self.quit_after_child = true;
                self.stop_child();
            }
            KeyCode::Char('g') => self.generate(),
            KeyCode::Char('r') => self.restart(),
            KeyCode::Char('p') => {
                self.auto_scroll = !self.auto_scroll;
                if self.auto_scroll {
                    self.scroll = 0;
                }
            }
            KeyCode::Char('l') => self.log_scale = !self.log_scale,
            KeyCode::Up => {
                self.auto_scroll = false;
                self.scroll = (self.scroll + 1).min(self.lines.len().saturating_sub(1));
            }
            KeyCode::Down => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::PageUp => {
                self.auto_scroll = false;
                self.scroll = (self.scroll + 10).min(self.lines.len().saturating_sub(1));
            }
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(10),
            KeyCode::End => {
                self.scroll = 0;
                self.auto_scroll = true;
            }
            _ => {}
        }
        false
    }

    /// The trainer's pid while it runs: our child, or the attached log's writer when its
    /// process still exists and is anetrain.
    fn watched_pid(&self) -> Option<u32> {
        if let Some(child) = &self.child {
            return Some(child.id());
        }
        let pid = self.reader.log.header()?.pid;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains("anetrain").then_some(pid)
    }

    /// Samples the system panel's figures (once a second).
    fn sample_system(&mut self) {
        let now = Instant::now();
        self.sys.cpu_pct = None;
        self.sys.rss_mb = None;
        if let Some(s) = self.watched_pid().and_then(ProcSample::read) {
            if let Some((t, cpu)) = self.proc_last {
                let dt = now.duration_since(t).as_secs_f64();
                self.sys.cpu_pct = (dt > 0.0).then(|| 100.0 * (s.cpu_s - cpu) / dt);
            }
            self.proc_last = Some((now, s.cpu_s));
            self.sys.rss_mb = Some(s.rss_mb);
        } else if let [.., a, b] = self.reader.log.updates.as_slice() {
            // No /proc (macOS) or the run has ended: the last two updates' own figures.
            let dt = b.elapsed_s - a.elapsed_s;
            self.sys.cpu_pct = (dt > 0.0 && b.cpu_s > 0.0).then(|| 100.0 * (b.cpu_s - a.cpu_s) / dt);
            self.sys.rss_mb = b.rss_mb.is_finite().then_some(b.rss_mb);
        }
        self.sys.mem_mb = anetrain::sysstat::system_memory_mb();
        self.sys.power_w = self.rapl.as_mut().and_then(Rapl::sample);
        let own = anetrain::sysstat::process_cpu_s();
        let dt = now.duration_since(self.own_last.0).as_secs_f64();
        if dt > 0.0 {
            self.sys.own_cpu_pct = 100.0 * (own - self.own_last.1) / dt;
        }
        self.own_last = (now, own);
    }

    /// Notices a finished child; returns true to quit.
    fn check_child(&mut self) -> bool {
        let Some(child) = &mut self.child else { return false };
        let Ok(Some(status)) = child.try_wait() else { return false };
        self.child = None;
        let how = match status.code() {
            Some(0) => "finished".to_string(),
            Some(130) | Some(143) => "stopped (checkpointed)".to_string(),
            Some(c) => format!("exited with status {c}"),
            None => "killed by a signal".to_string(),
        };
        self.status = format!("trainer {how}");
        self.push_line(format!("[dashboard] trainer {how}"));
        if self.quit_after_child {
            return true;
        }
        if std::mem::take(&mut self.restart_after_child) {
            self.restart();
        }
        false
    }
}

/// Runs the dashboard until the user quits. `train_args` are `train`'s arguments (after `--`).
pub fn dashboard(attach: Option<PathBuf>, mut train_args: Vec<String>) -> Result<()> {
    // `dashboard -- train --model …` reads as well as `dashboard -- --model …`.
    if train_args.first().is_some_and(|a| a == "train") {
        train_args.remove(0);
    }
    let (log, args) = match (attach, train_args.is_empty()) {
        (Some(log), true) => (log, None),
        (Some(_), false) => bail!("give either --attach LOG or `-- <train arguments>`, not both"),
        (None, true) => bail!("nothing to show: give `-- <train arguments>` or --attach run.jsonl"),
        (None, false) => match flag_value(&train_args, "--log") {
            Some(log) => (PathBuf::from(log), Some(train_args)),
            None => {
                let log = std::env::temp_dir().join(format!("anetrain-dashboard-{}.jsonl", std::process::id()));
                let mut args = train_args;
                args.extend(["--log".to_string(), log.display().to_string()]);
                (log, Some(args))
            }
        },
    };
    let mut app = App::new(&log, args.clone());
    if let Some(args) = &args {
        app.push_line(format!("[dashboard] telemetry: {}", log.display()));
        app.spawn_child(args)?;
    } else {
        app.status = format!("attached to {}", log.display());
    }
    let started = (Instant::now(), anetrain::sysstat::process_cpu_s());
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let result = event_loop(&mut terminal, &mut app);
    ratatui::restore();
    let cpu = anetrain::sysstat::process_cpu_s() - started.1;
    let wall = started.0.elapsed().as_secs_f64();
    // On stderr, so that it survives a redirect while the screen belongs to the interface.
    eprintln!(
        "dashboard: {cpu:.2} s of CPU over {wall:.1} s ({:.2}% of one core); telemetry in {}",
        100.0 * cpu / wall.max(1e-9),
        log.display()
    );
    result
}

fn event_loop(terminal: &mut ratatui::DefaultTerminal, app: &mut App) -> Result<()> {
    let mut dirty = true;
    let mut last_log_poll = Instant::now() - Duration::from_secs(1);
    let mut last_sys = Instant::now() - Duration::from_secs(2);
    loop {
        if dirty {
            terminal.draw(|f| ui::draw(f, app))?;
            dirty = false;
        }
        if event::poll(Duration::from_millis(200))? {
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    if app.key(k.code, k.modifiers) {
                        return Ok(());
                    }
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
        while let Ok(msg) = app.rx.try_recv() {
            match msg {
                Msg::Line(line) => app.push_line(line),
                Msg::Generated(text) => {
                    app.sample = text.trim().to_string();
                    app.generating = false;
                }
            }
            dirty = true;
        }
        if last_log_poll.elapsed() >= Duration::from_millis(500) {
            last_log_poll = Instant::now();
            match app.reader.poll() {
                Ok(changed) => dirty |= changed,
                Err(e) => {
                    app.status = format!("{e:#}");
                    dirty = true;
                }
            }
        }
        if last_sys.elapsed() >= Duration::from_secs(1) {
            last_sys = Instant::now();
            app.sample_system();
            dirty = true;
        }
        if app.check_child() {
            // Show the final state of the log once more, then quit.
            let _ = app.reader.poll();
            terminal.draw(|f| ui::draw(f, app))?;
            return Ok(());
        }
    }
}
