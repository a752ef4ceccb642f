//! File-system helpers every output goes through: atomic file writes (temporary sibling,
//! fsync, rename, fsync of the directory), whole-directory replacement, and an exclusive
//! directory lock.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Runs `fill` on a temporary sibling of `path` (`<name>.tmp`), then fsyncs it, renames it
/// into place and fsyncs the directory. A failure at any point leaves an existing file at
/// `path` untouched and removes the temporary file.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let mut tmp_name = path.file_name().context("atomic write needs a file name")?.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
        fill(&mut out).with_context(|| format!("cannot write {} (disk full?)", tmp.display()))?;
        out.flush().with_context(|| format!("cannot write {} (disk full?)", tmp.display()))?;
        drop(out);
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        sync_parent(path);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fsyncs the directory holding `path` (best effort: a rename is durable only once its
/// directory is).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// Puts the directory `new` in place of `target` (which may not exist). On Linux the two are
/// exchanged in one atomic step (renameat2 RENAME_EXCHANGE), so `target` is at every moment
/// either wholly old or wholly new; elsewhere the old one is moved aside first. The old
/// contents are removed afterwards.
pub fn replace_dir(new: &Path, target: &Path) -> Result<()> {
    let mut old_name = target.file_name().context("directory name")?.to_os_string();
    old_name.push(format!(".old-{}", std::process::id()));
    let old = target.with_file_name(old_name);
    if !target.exists() {
        std::fs::rename(new, target)
            .with_context(|| format!("cannot rename {} to {}", new.display(), target.display()))?;
    } else if !exchange(new, target)? {
        std::fs::rename(target, &old).with_context(|| format!("cannot move {} aside", target.display()))?;
        std::fs::rename(new, target)
            .with_context(|| format!("cannot rename {} to {}", new.display(), target.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    } else {
        // `new` now holds the old contents.
        std::fs::remove_dir_all(new).with_context(|| format!("cannot remove {}", new.display()))?;
    }
    sync_parent(target);
    Ok(())
}

/// Exchanges two paths atomically; `Ok(false)` where the system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).context("path contains a NUL byte");
    let (ca, cb) = (cstr(a)?, cstr(b)?);
    // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Old kernels and file systems without support fall back to two renames.
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(err).with_context(|| format!("cannot exchange {} and {}", a.display(), b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

/// An exclusive advisory lock on a directory, held until dropped (or the process exits, even
/// by SIGKILL: the kernel releases `flock` locks with the last descriptor). The lock file
/// (`<dir>/.lock`) holds the owner's PID, so a refused process can say who holds it.
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".lock";

impl DirLock {
    /// Creates `dir` if needed and locks it; refuses with the holder's PID if another
    /// process holds the lock.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        use std::os::unix::io::AsRawFd;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {what} {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot create the lock file {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
                bail!(
                    "{what} {} is in use by {who} (it holds {}); wait for it to finish, or use another directory",
                    dir.display(),
                    path.display()
                );
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        file.set_len(0)
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .and_then(|_| file.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(DirLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_whole_directories() {
        let base = std::env::temp_dir().join(format!("anetrain-fsio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (new, target) = (base.join("new"), base.join("target"));
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("a"), "1").unwrap();
        replace_dir(&new, &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "1");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("b"), "2").unwrap();
        replace_dir(&new, &target).unwrap();
        assert!(!target.join("a").exists(), "the old contents must go");
        assert_eq!(std::fs::read_to_string(target.join("b")).unwrap(), "2");
        let left: Vec<_> = std::fs::read_dir(&base).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["target"]);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("anetrain-lock-{}", std::process::id()));
        let first = DirLock::acquire(&dir, "checkpoint directory").unwrap();
        // flock locks belong to open file descriptions, so a second open in this process
        // conflicts just as another process's would (tests/faults.rs covers two processes).
        let err = format!("{:#}", DirLock::acquire(&dir, "checkpoint directory").err().unwrap());
        assert!(err.contains(&format!("in use by process {}", std::process::id())), "{err}");
        drop(first);
        DirLock::acquire(&dir, "checkpoint directory").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
