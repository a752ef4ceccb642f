//! The compile-budget restart: the Neural Engine framework fails after about 119 compiles
//! in one process (facts §5.6), so a run that keeps recompiling (static mode) checkpoints
//! and replaces itself with a fresh process running the same command plus
//! `--resume latest` (`exec`, so the process id, terminal and parent stay the same).
//! Restarts are counted in the environment variable `ANETRAIN_RESTARTS`, which the new
//! process inherits, and capped by `--max-restarts`.

use anyhow::{Context, Result, bail};
use std::ffi::OsString;

/// The environment variable carrying the number of restarts so far.
pub const RESTARTS_VAR: &str = "ANETRAIN_RESTARTS";

/// Restarts made before this process (0 for a run started by hand).
pub fn restarts_so_far() -> Result<usize> {
    match std::env::var(RESTARTS_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(0),
        Ok(v) => v.trim().parse().with_context(|| {
            format!("{RESTARTS_VAR}={v:?} is not a count of restarts; unset it to start counting from 0")
        }),
        Err(e) => bail!("{RESTARTS_VAR} is not valid: {e}; unset it to start counting from 0"),
    }
}

/// `args` (without the program) with any `--resume X` / `--resume=X` replaced by
/// `--resume latest` at the end.
pub fn resume_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--resume" {
            skip_value = true;
        } else if !s.starts_with("--resume=") {
            out.push(a.clone());
        }
    }
    out.extend(["--resume".into(), "latest".into()]);
    out
}

/// Replaces this process with `current_exe` run with `resume_args`, counting the restart.
/// Returns only on failure. Everything that must survive (checkpoint, log) must be written
/// and closed before: `exec` runs no destructors.
#[cfg(unix)]
pub fn exec_resume(max_restarts: usize) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let done = restarts_so_far()?;
    if done >= max_restarts {
        bail!(
            "the compile budget asks for restart {} but --max-restarts is {max_restarts}; the checkpoint is \
             saved: continue with --resume latest (and a higher --max-restarts or --compile-budget)",
            done + 1
        );
    }
    let exe = std::env::current_exe().context("cannot find this program's path to restart it")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err =
        std::process::Command::new(&exe).args(resume_args(&args)).env(RESTARTS_VAR, (done + 1).to_string()).exec();
    Err(err).with_context(|| format!("cannot re-execute {} to continue past the compile budget", exe.display()))
}

#[cfg(not(unix))]
pub fn exec_resume(_max_restarts: usize) -> Result<std::convert::Infallible> {
    bail!("restarting past the compile budget needs a Unix exec; continue with --resume latest")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn resume_replaces_any_earlier_resume() {
        let args: Vec<OsString> =
            ["train", "--steps", "8", "--resume", "ckpt/step-1", "--seed", "3"].iter().map(OsString::from).collect();
        assert_eq!(strs(&resume_args(&args)), ["train", "--steps", "8", "--seed", "3", "--resume", "latest"]);
        let args: Vec<OsString> = ["train", "--resume=latest", "--x"].iter().map(OsString::from).collect();
        assert_eq!(strs(&resume_args(&args)), ["train", "--x", "--resume", "latest"]);
    }
}
