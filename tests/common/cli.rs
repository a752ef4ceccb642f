//! Running the built `anetrain` binary from integration tests. Included by path
//! (`#[path = "common/cli.rs"] mod cli;`), so one definition serves every test file; each file
//! uses only some of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The binary Cargo built for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_anetrain")
}

/// Runs `anetrain args…` to completion.
pub fn anetrain(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run anetrain")
}

/// stdout then stderr, for assertions and failure messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A fresh directory named after the test, removed when the guard drops.
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("anetrain-{name}-")).tempdir().expect("create a scratch directory")
}

/// A path as a command-line argument.
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Exit status 1 and an `error:` line containing `want`.
pub fn assert_error(args: &[&str], want: &str) {
    let out = anetrain(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{args:?}: no error: {err}"));
    assert!(line.contains(want), "{args:?}: wanted '{want}' in: {err}");
}
