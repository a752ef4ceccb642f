//! Phase timers for taking a training step apart (`ANETRAIN_PROFILE=1 anetrain train ...`):
//! each instrumented GEMM or op adds its wall time (and, for a GEMM, its 2·m·n·k FLOPs) to a
//! table keyed by its label and shape; `train` prints the table per micro-step at the end.
//! Timed regions never nest, so the rows add up to the step minus what no row covers.
//!
//! Off (the default) a timer costs one load of a flag set once from the environment; no
//! clock is read and nothing is recorded. On, each timer takes a lock at its end: fine for
//! the ~50 regions per layer of a step, which last tens of microseconds and up.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The environment variable that turns the timers on (any value but `0`).
pub const VAR: &str = "ANETRAIN_PROFILE";

/// Whether the timers are on (read once per process).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(VAR).is_some_and(|v| v != "0"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    label: &'static str,
    /// (m, n, k) of a GEMM; zeros for other ops.
    mnk: (usize, usize, usize),
}

#[derive(Clone, Copy)]
struct Row {
    key: Key,
    calls: u64,
    secs: f64,
}

struct State {
    rows: Vec<Row>,
    /// Updates ended (`end_update`), ever.
    updates: usize,
    /// Micro-steps and their updates' wall time since the table was last emptied.
    micros: usize,
    update_ms: f64,
}

static STATE: Mutex<State> = Mutex::new(State { rows: Vec::new(), updates: 0, micros: 0, update_ms: 0.0 });

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running timer; records when dropped.
#[must_use = "the region is timed until this is dropped"]
pub struct Timer {
    key: Key,
    start: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        let mut st = state();
        match st.rows.iter_mut().find(|r| r.key == self.key) {
            Some(row) => {
                row.calls += 1;
                row.secs += secs;
            }
            None => st.rows.push(Row { key: self.key, calls: 1, secs }),
        }
    }
}

/// Times a GEMM `[m, k]·[k, n]` under `label` until the result is dropped.
pub fn gemm(label: &'static str, m: usize, n: usize, k: usize) -> Option<Timer> {
    enabled().then(|| Timer { key: Key { label, mnk: (m, n, k) }, start: Instant::now() })
}

/// Times a non-GEMM op under `label` until the result is dropped.
pub fn op(label: &'static str) -> Option<Timer> {
    gemm(label, 0, 0, 0)
}

/// The trainer ends an update of `micro_steps` micro-steps that took `ms` in all. The first
/// update's rows are dropped: its page faults and first-touch packing are not the steady
/// state.
pub fn end_update(micro_steps: usize, ms: f64) {
    if !enabled() {
        return;
    }
    let mut st = state();
    st.updates += 1;
    if st.updates == 1 {
        st.rows.clear();
    } else {
        st.micros += micro_steps;
        st.update_ms += ms;
    }
}

/// Micro-steps in the table (`end_update`).
pub fn micro_steps() -> usize {
    state().micros
}

/// The table per micro-step, slowest row first: ms, share of the mean micro-step (its update's
/// wall time, optimizer included, over its micro-steps), calls, and GFLOP/s for GEMM rows;
/// then what no row covers.
pub fn report() -> String {
    let st = state();
    let per = st.micros.max(1) as f64;
    let step_ms = st.update_ms / per;
    let mut rows = st.rows.clone();
    rows.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    let mut out = format!("--- profile ({VAR}): mean micro-step {step_ms:.1} ms over {} ---\n", st.micros);
    out += &format!("{:>9} {:>6} {:>6} {:>8}  region\n", "ms", "share", "calls", "GFLOP/s");
    let mut covered = 0.0;
    for r in &rows {
        let ms = r.secs * 1e3 / per;
        covered += ms;
        let (m, n, k) = r.key.mnk;
        let (rate, shape) = if m * n * k > 0 {
            let flops = 2.0 * (m * n * k) as f64 * r.calls as f64;
            (format!("{:.1}", flops / r.secs / 1e9), format!(" [{m}x{k}]·[{k}x{n}]"))
        } else {
            (String::new(), String::new())
        };
        out += &format!(
            "{ms:>9.2} {:>5.1}% {:>6} {rate:>8}  {}{shape}\n",
            100.0 * ms / step_ms,
            r.calls as f64 / per,
            r.key.label
        );
    }
    let rest = step_ms - covered;
    out += &format!("{rest:>9.2} {:>5.1}%  (not covered by any row)\n", 100.0 * rest / step_ms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows are keyed by label and shape, summed over calls, and the GEMM rate is the
    /// FLOPs over the recorded time. (Records directly: the environment switch is read once
    /// per process, and no other test records.)
    #[test]
    fn rows_accumulate_by_label_and_shape() {
        let key = Key { label: "t", mnk: (10, 20, 30) };
        for _ in 0..3 {
            drop(Timer { key, start: Instant::now() - std::time::Duration::from_millis(2) });
        }
        drop(Timer { key: Key { label: "t", mnk: (1, 2, 3) }, start: Instant::now() });
        let st = state();
        let row = st.rows.iter().find(|r| r.key == key).unwrap();
        assert_eq!(row.calls, 3);
        assert!(row.secs >= 0.006, "{}", row.secs);
        assert_eq!(st.rows.len(), 2);
        drop(st);
        let text = report();
        assert!(text.contains("[10x30]·[30x20]"), "{text}");
    }
}
