//! One run per checkpoint directory. `train --ckpt-dir` locks the directory for the whole run
//! (a second trainer is refused with the first one's PID); a fresh run refuses a directory
//! that already holds anything unless `--overwrite` (then the earlier checkpoints are
//! removed); a resume from a step earlier than the directory's newest moves the later steps
//! (and a later `best`) into `superseded-<UTC time>/` and points `latest` back, so that
//! `latest`, `--keep-last` and `best` describe one history.

use crate::fsio::{DirLock, LOCK_FILE};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Locks `dir` (creating it) for a training run; held until dropped.
pub fn lock(dir: &Path) -> Result<DirLock> {
    DirLock::acquire(dir, "checkpoint directory")
}

/// Entries of `dir` other than the lock file, sorted.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != LOCK_FILE)
        .collect();
    names.sort();
    Ok(names)
}

/// What this crate writes into a checkpoint directory.
fn is_ours(name: &str) -> bool {
    name == "latest"
        || name == "best"
        || name == "loss.png"
        || name.starts_with("step-")
        || name.starts_with("superseded-")
        || name.ends_with(".tmp")
        || name.ends_with(".old")
}

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Makes the locked `dir` ready for a run and returns what it did, one message per action.
/// `resumed` is the step directory a resume loaded and its step (None: a fresh run).
pub fn prepare(dir: &Path, resumed: Option<(&Path, usize)>, overwrite: bool) -> Result<Vec<String>> {
    let names = entries(dir)?;
    let inside = match resumed {
        Some((path, _)) => {
            let parent = path.canonicalize().ok().and_then(|p| p.parent().map(Path::to_path_buf));
            parent.is_some() && parent == dir.canonicalize().ok()
        }
        None => false,
    };
    if overwrite {
        if inside {
            bail!("--overwrite would delete the checkpoint being resumed ({}); leave out one of them", dir.display());
        }
        let ours: Vec<&String> = names.iter().filter(|n| is_ours(n)).collect();
        for name in &ours {
            let path = dir.join(name);
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("cannot remove {}", path.display()))?;
        }
        return Ok(if ours.is_empty() {
            vec![]
        } else {
            vec![format!("--overwrite: removed {} earlier entries of {}", ours.len(), dir.display())]
        });
    }
    if names.is_empty() {
        return Ok(vec![]);
    }
    let Some((_, step)) = resumed.filter(|_| inside) else {
        let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
        let more = if names.len() > 4 { ", …" } else { "" };
        bail!(
            "--ckpt-dir {} already holds {}{more}; a {} would mix two histories there. Continue that run with \
             --resume latest, replace it with --overwrite, or choose another directory",
            dir.display(),
            shown.join(", "),
            if resumed.is_some() { "resume from a checkpoint elsewhere" } else { "fresh run" }
        );
    };
    // A resume from inside the directory: steps after the resumed one belong to a history
    // this run replaces.
    let step = step as u64;
    let mut later: Vec<String> = names.iter().filter(|n| step_of(n).is_some_and(|s| s > step)).cloned().collect();
    if names.iter().any(|n| n == "best") {
        let best_step = super::native::read_state(&dir.join("best")).map(|s| s.step);
        if best_step.is_err() || best_step.as_ref().is_ok_and(|&s| s > step) {
            later.push("best".into());
        }
    }
    let mut notes = Vec::new();
    if !later.is_empty() {
        let aside = unique(dir, &format!("superseded-{}", utc_stamp()));
        std::fs::create_dir(&aside).with_context(|| format!("cannot create {}", aside.display()))?;
        for name in &later {
            std::fs::rename(dir.join(name), aside.join(name))
                .with_context(|| format!("cannot move {} into {}", name, aside.display()))?;
        }
        notes.push(format!("resuming at step {step}: moved the later {} into {}", later.join(", "), aside.display()));
    }
    // `latest` names the newest step left (the first save of this run replaces it).
    let newest = entries(dir)?.into_iter().filter_map(|n| Some((step_of(&n)?, n))).max();
    let latest = dir.join("latest");
    match newest {
        Some((_, name)) => {
            crate::fsio::write_atomically(&latest, |out| std::io::Write::write_all(out, name.as_bytes()))?
        }
        None if latest.exists() => {
            std::fs::remove_file(&latest).with_context(|| format!("cannot remove {}", latest.display()))?
        }
        None => {}
    }
    Ok(notes)
}

/// `base`, or `base-2`, `base-3`, … whichever does not exist in `dir`.
fn unique(dir: &Path, base: &str) -> PathBuf {
    let mut path = dir.join(base);
    let mut i = 2;
    while path.exists() {
        path = dir.join(format!("{base}-{i}"));
        i += 1;
    }
    path
}

/// The current UTC time as `YYYYMMDD-HHMMSS`.
fn utc_stamp() -> String {
    utc_stamp_at(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// `secs` since the Unix epoch as a UTC `YYYYMMDD-HHMMSS`.
fn utc_stamp_at(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_are_civil_dates() {
        assert_eq!(utc_stamp_at(0), "19700101-000000");
        assert_eq!(utc_stamp_at(951_782_400 + 3_661), "20000229-010101");
        assert_eq!(utc_stamp_at(1_798_761_599), "20261231-235959");
    }
}
