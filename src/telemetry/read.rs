//! Reading logs as far as they are valid: a file that is missing, empty, cut off mid-line,
//! from another program, or still being written gives what it holds plus one note saying what
//! was skipped. `LogReader::poll` reads only what was appended since the last call, so the
//! dashboard can follow a live run cheaply.

use super::{CheckpointEvent, EvalEvent, Header, LossScaleEvent, Record, Report, SCHEMA, SCHEMA_VERSION, StepEvent};
use anyhow::Result;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A line longer than this is not telemetry (an update is a few hundred bytes); reading it
/// whole would let a foreign file without newlines grow the buffer without bound.
const MAX_LINE: usize = 1 << 20;

/// Everything a log says, with later parts superseding earlier ones after a resume.
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    /// One per process that wrote to the log (a fresh run, then each resume).
    pub headers: Vec<Header>,
    /// In step order; a resume from an earlier step drops the updates after it.
    pub updates: Vec<StepEvent>,
    pub evals: Vec<EvalEvent>,
    pub checkpoints: Vec<CheckpointEvent>,
    pub loss_scales: Vec<LossScaleEvent>,
    /// The last process's report, if it finished.
    pub report: Option<Report>,
    /// Lines that are not telemetry records (foreign, corrupt, or from a newer writer).
    pub bad_lines: usize,
    /// 1-based number of the first such line.
    pub first_bad_line: Option<usize>,
    /// Update lines in the format written before the schema had a `type` tag.
    pub legacy_lines: usize,
}

impl RunLog {
    /// The latest header (the configuration now in force).
    pub fn header(&self) -> Option<&Header> {
        self.headers.last()
    }

    /// Adds one record. A header starting at step s drops every later update and event:
    /// the resumed process redoes them.
    pub fn push(&mut self, record: Record) {
        match record {
            Record::Header(h) => {
                let s = h.start_step;
                self.updates.retain(|u| u.step <= s);
                self.evals.retain(|e| e.step <= s);
                self.checkpoints.retain(|c| c.step <= s);
                self.loss_scales.retain(|e| e.step <= s);
                self.report = None;
                self.headers.push(*h);
            }
            Record::Update(u) => self.updates.push(u),
            Record::Eval(e) => self.evals.push(e),
            Record::Checkpoint(c) => self.checkpoints.push(c),
            Record::LossScale(e) => self.loss_scales.push(e),
            Record::Report(r) => self.report = Some(r),
        }
    }

    /// Parses one line and adds it; `line_no` is 1-based.
    fn push_line(&mut self, line: &[u8], line_no: usize) {
        let text = match std::str::from_utf8(line) {
            Ok(t) => t.trim(),
            Err(_) => return self.bad(line_no),
        };
        if text.is_empty() {
            return;
        }
        match serde_json::from_str::<Record>(text) {
            Ok(Record::Header(h)) if h.schema != SCHEMA || h.version > SCHEMA_VERSION => self.bad(line_no),
            Ok(record) => self.push(record),
            Err(_) => match serde_json::from_str::<StepEvent>(text) {
                // Logs written before the `type` tag held only update lines.
                Ok(update) if !text.contains("\"type\"") => {
                    self.legacy_lines += 1;
                    self.updates.push(update);
                }
                _ => self.bad(line_no),
            },
        }
    }

    fn bad(&mut self, line_no: usize) {
        self.bad_lines += 1;
        self.first_bad_line.get_or_insert(line_no);
    }

    /// Validation losses as (step, loss): from eval events, or from updates that carry one
    /// (logs written before eval events existed).
    pub fn val_points(&self) -> Vec<(usize, f64)> {
        if !self.evals.is_empty() {
            return self.evals.iter().map(|e| (e.step, e.val_loss)).collect();
        }
        self.updates.iter().filter_map(|u| u.val_loss.map(|v| (u.step, v))).collect()
    }

    /// Tokens seen after update `step` (legacy lines lack `tokens_seen`: step × tokens).
    pub fn tokens_at(u: &StepEvent) -> usize {
        if u.tokens_seen > 0 { u.tokens_seen } else { u.step * u.tokens }
    }
}

/// Follows a log file: each `poll` reads the bytes appended since the last one.
pub struct LogReader {
    pub path: PathBuf,
    pub log: RunLog,
    offset: u64,
    partial: Vec<u8>,
    /// Skipping the rest of an over-long line.
    skipping: bool,
    lines: usize,
    /// The file exists (as of the last poll).
    pub exists: bool,
}

impl LogReader {
    pub fn new(path: &Path) -> Self {
        LogReader {
            path: path.to_path_buf(),
            log: RunLog::default(),
            offset: 0,
            partial: Vec::new(),
            skipping: false,
            lines: 0,
            exists: false,
        }
    }

    /// Reads a whole log once.
    pub fn read_all(path: &Path) -> Result<(RunLog, Option<String>)> {
        let mut reader = LogReader::new(path);
        reader.poll()?;
        anyhow::ensure!(reader.exists, "telemetry log {} does not exist", path.display());
        let note = reader.note();
        Ok((reader.log, note))
    }

    /// Reads what was appended; returns whether anything new arrived. A file that shrank was
    /// rewritten (a fresh run): it is read again from the start. A missing file is not an
    /// error (a run may not have created it yet).
    pub fn poll(&mut self) -> Result<bool> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.exists = false;
                return Ok(false);
            }
            Err(e) => return Err(anyhow::anyhow!("cannot open {}: {e}", self.path.display())),
        };
        let meta = file.metadata()?;
        anyhow::ensure!(meta.is_file(), "{} is not a regular file", self.path.display());
        self.exists = true;
        let len = meta.len();
        if len < self.offset {
            *self = LogReader::new(&self.path);
            self.exists = true;
        }
        if len == self.offset {
            return Ok(false);
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        // Bounded by what the file held when polled, so a writer cannot keep us here.
        (&mut file).take(len - self.offset).read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        let mut rest = &buf[..];
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(nl);
            rest = &after[1..];
            self.lines += 1;
            if self.skipping {
                self.skipping = false;
                self.partial.clear();
                continue;
            }
            if self.partial.is_empty() {
                self.log.push_line(line, self.lines);
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                self.log.push_line(&whole, self.lines);
            }
        }
        if !self.skipping {
            self.partial.extend_from_slice(rest);
            if self.partial.len() > MAX_LINE {
                self.log.bad(self.lines + 1);
                self.partial = Vec::new();
                self.skipping = true;
            }
        }
        Ok(true)
    }

    /// One line saying what was skipped or is missing, or None when the log is clean.
    pub fn note(&self) -> Option<String> {
        let name = self.path.display();
        if !self.exists {
            return Some(format!("{name} does not exist (yet)"));
        }
        if self.offset == 0 {
            return Some(format!("{name} is empty"));
        }
        let log = &self.log;
        let mut parts = Vec::new();
        if log.bad_lines > 0 {
            parts.push(format!(
                "skipped {} line{} that {} not anetrain telemetry (first: line {})",
                log.bad_lines,
                if log.bad_lines == 1 { "" } else { "s" },
                if log.bad_lines == 1 { "is" } else { "are" },
                log.first_bad_line.unwrap_or(0)
            ));
        }
        if !self.partial.is_empty() || self.skipping {
            parts.push("the last line is incomplete (cut off, or still being written)".to_string());
        }
        if log.headers.is_empty() && log.updates.is_empty() && log.bad_lines > 0 {
            parts.insert(0, "no telemetry found".to_string());
        }
        if parts.is_empty() { None } else { Some(format!("{name}: {}", parts.join("; "))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Header, Record, StepEvent};
    use std::io::Write;

    fn update_line(step: usize) -> String {
        let u = StepEvent { step, loss: 5.0 - step as f64 * 0.1, tokens: 8, ..Default::default() };
        serde_json::to_string(&Record::Update(u)).unwrap()
    }

    fn header_line(start_step: usize) -> String {
        serde_json::to_string(&Record::Header(Box::new(Header { start_step, ..Header::new() }))).unwrap()
    }

    #[test]
    fn damaged_and_growing_logs_are_read_as_far_as_valid() {
        let dir = std::env::temp_dir().join(format!("anetrain-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut r = LogReader::new(&path);
        assert!(!r.poll().unwrap());
        assert!(r.note().unwrap().contains("does not exist"));
        std::fs::write(&path, "").unwrap();
        r.poll().unwrap();
        assert!(r.note().unwrap().contains("is empty"), "{:?}", r.note());
        // A writer mid-line: the complete lines are read, the partial one waits.
        let (l1, l2) = (update_line(1), update_line(2));
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{}\n{}\n{}", header_line(0), l1, &l2[..10]).unwrap();
        assert!(r.poll().unwrap());
        assert_eq!(r.log.updates.len(), 1);
        assert!(r.note().unwrap().contains("incomplete"), "{:?}", r.note());
        // The rest of the line arrives, then a foreign line and an old-style update.
        write!(f, "{}\nnot json at all\n{{\"step\": 3, \"loss\": 4.0, \"lr\": 0.1, \"grad_norm\": null, \"skipped\": false, \"loss_scale\": 1.0, \"val_loss\": null, \"tokens\": 8, \"tokens_per_s\": 1.0, \"ms_step\": 1.0, \"ms_forward\": 1.0, \"ms_backward\": 1.0, \"ms_optimizer\": 1.0}}\n", &l2[10..]).unwrap();
        r.poll().unwrap();
        assert_eq!(r.log.updates.iter().map(|u| u.step).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(r.log.updates[2].grad_norm.is_nan());
        assert_eq!(r.log.legacy_lines, 1);
        assert_eq!(
            r.note().unwrap(),
            format!("{}: skipped 1 line that is not anetrain telemetry (first: line 4)", path.display())
        );
        // A resume from step 1 supersedes the later updates.
        writeln!(f, "{}\n{}", header_line(1), update_line(2)).unwrap();
        r.poll().unwrap();
        assert_eq!(r.log.updates.iter().map(|u| u.step).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(r.log.headers.len(), 2);
        // A rewritten (shorter) file is read from the start.
        std::fs::write(&path, format!("{}\n", header_line(0))).unwrap();
        r.poll().unwrap();
        assert_eq!((r.log.headers.len(), r.log.updates.len()), (1, 0));
        // A foreign binary file without newlines: nothing, one note, bounded memory.
        std::fs::write(&path, vec![0xffu8; MAX_LINE + 10]).unwrap();
        let (log, note) = LogReader::read_all(&path).unwrap();
        assert!(log.updates.is_empty());
        let note = note.unwrap();
        assert!(note.contains("no telemetry found") && note.contains("incomplete"), "{note}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn appending_after_a_cut_off_line_keeps_the_next_record_whole() {
        let dir = std::env::temp_dir().join(format!("anetrain-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.jsonl");
        let l1 = update_line(1);
        std::fs::write(&path, format!("{}\n{}\n{}", header_line(0), l1, &update_line(2)[..20])).unwrap();
        let mut t = crate::telemetry::Telemetry::append_to_file(&path).unwrap();
        assert_eq!(t.history.updates.len(), 1);
        t.record(Record::Header(Box::new(Header { start_step: 1, ..Header::new() }))).unwrap();
        t.record(Record::Update(StepEvent { step: 2, ..Default::default() })).unwrap();
        drop(t);
        let (log, note) = LogReader::read_all(&path).unwrap();
        assert_eq!(log.updates.iter().map(|u| u.step).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(log.headers.len(), 2);
        assert!(note.unwrap().contains("skipped 1 line"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
