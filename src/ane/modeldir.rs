//! The directory the framework compiles from, `NSTemporaryDirectory()/<hexStringIdentifier>/`.
//!
//! The in-memory model is a wrapper that saves files there and compiles from disk, and it does
//! not save all of them correctly, so the MIL text and every weight file must already be in
//! place (facts §5.2 step 4). The identifier is a content hash: two processes compiling the
//! same program get the same directory, and the original system deleted it on free while the
//! other might still be compiling from it (facts §7.1 item 17).
//!
//! Policy here: a runner claims a directory by creating it (`create_dir` is atomic) and writing
//! an owner marker (pid and runner number). A directory claimed by a live owner, or one
//! without a marker (another program's), is refused rather than shared. A marker whose
//! process is dead is stale and taken over. On drop, a runner deletes the directory only if
//! the marker still names it: the framework itself deletes the directory when a model is
//! unloaded (`unloadWithQoS:` removes its `localModelPath`), after which another process may
//! have claimed the same name, and that claim must survive us.
//! Limitations: a recycled pid makes a stale directory look live (the error names the
//! directory so that the user can delete it); another program compiling an identical kernel
//! through the framework deletes the directory when it unloads, which nothing here prevents.

use crate::mil::rules::check_relative;
use crate::mil::rules::{MIL_FILE, OWNER_FILE};
use anyhow::{Context, Result, bail};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Who claimed a directory: a process and one runner within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub runner: u64,
}

impl Owner {
    /// A new identity for a runner of this process.
    pub fn new_runner() -> Owner {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Owner { pid: std::process::id(), runner: NEXT.fetch_add(1, Ordering::Relaxed) }
    }

    fn line(&self) -> String {
        format!("anetrain pid={} runner={}\n", self.pid, self.runner)
    }

    fn parse(text: &str) -> Option<Owner> {
        let mut words = text.split_whitespace();
        (words.next()? == "anetrain").then_some(())?;
        let pid = words.next()?.strip_prefix("pid=")?.parse().ok()?;
        let runner = words.next()?.strip_prefix("runner=")?.parse().ok()?;
        Some(Owner { pid, runner })
    }
}

/// Whether process `pid` exists (signal 0 probes without sending; EPERM means it exists but
/// belongs to someone else).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A directory this runner created; removed with everything in it on drop, if the owner
/// marker still names this runner (usually the framework has removed it already).
#[derive(Debug)]
pub struct OwnedDir {
    path: PathBuf,
    owner: Owner,
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        let marker = fs::read_to_string(self.path.join(OWNER_FILE)).ok().and_then(|t| Owner::parse(&t));
        if marker == Some(self.owner) {
            // Nothing useful to do on failure: the directory is in the temporary directory,
            // and a later claim finds its marker stale.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[derive(Debug)]
pub enum Claim {
    /// Created now by `me`: the caller keeps the `OwnedDir` until its models are unloaded.
    Created(OwnedDir),
    /// Already claimed by `me` (the same program loaded twice): nothing more to own.
    Reused,
}

/// Claims `dir` for `me` under the policy in the module comment.
pub fn claim(dir: &Path, me: Owner, alive: &dyn Fn(u32) -> bool) -> Result<Claim> {
    let shown = dir.display();
    match fs::create_dir(dir) {
        Ok(()) => return mark(dir, me),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("could not create the model directory {shown}; check that the temporary directory is writable")
            });
        }
    }
    let owner = fs::read_to_string(dir.join(OWNER_FILE)).ok().and_then(|t| Owner::parse(&t));
    match owner {
        Some(o) if o == me => Ok(Claim::Reused),
        Some(o) if !alive(o.pid) => {
            fs::remove_dir_all(dir).with_context(|| format!("could not remove the stale model directory {shown}"))?;
            match fs::create_dir(dir) {
                Ok(()) => mark(dir, me),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    bail!("another process claimed the model directory {shown} just now; run one trainer at a time")
                }
                Err(e) => Err(e).with_context(|| format!("could not create the model directory {shown}")),
            }
        }
        Some(o) if o.pid == me.pid => bail!(
            "the model directory {shown} belongs to another `ane` runner in this process; use one runner per \
             process (the framework names directories by content, so identical kernels would share it)"
        ),
        Some(o) => bail!(
            "the model directory {shown} is in use by process {} compiling the same kernel; run one trainer at a \
             time, or delete the directory if that process is not anetrain",
            o.pid
        ),
        None => bail!(
            "the model directory {shown} exists and was not made by anetrain; another program may be compiling \
             the same kernel from it — if none is running, delete it and retry"
        ),
    }
}

/// Writes the owner marker into a directory just created.
fn mark(dir: &Path, me: Owner) -> Result<Claim> {
    // Owned from here on, so that a failure below still removes it.
    let owned = OwnedDir { path: dir.to_path_buf(), owner: me };
    let marker = dir.join(OWNER_FILE);
    fs::write(&marker, me.line()).with_context(|| format!("could not write {}", marker.display()))?;
    Ok(Claim::Created(owned))
}

/// Writes `model.mil` and every weight file at its relative path under `dir`. Every path is
/// checked before anything is written.
pub fn populate(dir: &Path, mil: &str, blobs: &[(String, Vec<u8>)]) -> Result<()> {
    let rel: Vec<&Path> = blobs
        .iter()
        .map(|(p, _)| check_relative(p).with_context(|| format!("weight file {p:?}")))
        .collect::<Result<_>>()?;
    let write = |path: &Path, bytes: &[u8]| -> Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
        }
        fs::write(path, bytes)
            .with_context(|| format!("could not write {}; check free space in the temporary directory", path.display()))
    };
    // The framework expects `weights/` to exist even for a kernel without weight files.
    fs::create_dir_all(dir.join("weights")).with_context(|| format!("could not create {}/weights", dir.display()))?;
    write(&dir.join(MIL_FILE), mil.as_bytes())?;
    for (r, (_, bytes)) in rel.iter().zip(blobs) {
        write(&dir.join(r), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A fresh scratch directory, removed on drop.
    fn scratch(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("anetrain-ane-test-{tag}-")).tempdir().unwrap()
    }

    /// Every file under `dir` as (relative path, contents).
    fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                    out.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    const ME: Owner = Owner { pid: 4242, runner: 7 };

    #[test]
    fn populate_writes_exactly_the_program_files() {
        let s = scratch("pop");
        let blobs =
            vec![("weights/mask.bin".to_string(), vec![1, 2, 3]), ("weights/l0/w1.bin".to_string(), vec![9; 130])];
        populate(s.path(), "program(1.3)\n", &blobs).unwrap();
        let expect: BTreeMap<String, Vec<u8>> = [
            ("model.mil".to_string(), b"program(1.3)\n".to_vec()),
            ("weights/mask.bin".to_string(), vec![1, 2, 3]),
            ("weights/l0/w1.bin".to_string(), vec![9; 130]),
        ]
        .into();
        assert_eq!(tree(s.path()), expect);
        // a second population overwrites in place
        populate(s.path(), "program(1.3) v2\n", &blobs[..1]).unwrap();
        assert_eq!(fs::read(s.path().join("model.mil")).unwrap(), b"program(1.3) v2\n");
    }

    #[test]
    fn populate_refuses_escaping_paths_before_writing() {
        let s = scratch("esc");
        let inner = s.path().join("model");
        fs::create_dir(&inner).unwrap();
        for bad in ["../x.bin", "/tmp/x.bin", "weights/../../x.bin", "model.mil"] {
            let blobs = vec![("weights/ok.bin".to_string(), vec![1]), (bad.to_string(), vec![2])];
            let e = populate(&inner, "p", &blobs).unwrap_err();
            assert!(format!("{e:#}").contains(bad), "{bad}: {e:#}");
            assert!(tree(s.path()).is_empty(), "{bad}: wrote {:?}", tree(s.path()).keys());
        }
    }

    #[test]
    fn owner_marker_round_trips() {
        assert_eq!(Owner::parse(&ME.line()), Some(ME));
        assert_eq!(Owner::parse("anetrain pid=1"), None);
        assert_eq!(Owner::parse("other pid=1 runner=2"), None);
        assert_ne!(Owner::new_runner(), Owner::new_runner());
    }

    #[test]
    fn a_fresh_directory_is_created_marked_and_removed_on_drop() {
        let s = scratch("fresh");
        let dir = s.path().join("abc123");
        let Claim::Created(owned) = claim(&dir, ME, &|_| panic!("no owner to probe")).unwrap() else {
            panic!("expected a new claim")
        };
        assert_eq!(owned.path, dir);
        assert_eq!(Owner::parse(&fs::read_to_string(dir.join(OWNER_FILE)).unwrap()), Some(ME));
        // the same runner loading the same program again shares it without owning it twice
        assert!(matches!(claim(&dir, ME, &|_| true).unwrap(), Claim::Reused));
        drop(owned);
        assert!(!dir.exists());
    }

    /// The framework deletes the directory on unload; if another process then claims the same
    /// name before our runner is dropped, our drop must leave its directory alone.
    #[test]
    fn a_directory_reclaimed_by_another_process_survives_our_drop() {
        let s = scratch("reclaimed");
        let dir = s.path().join("abc123");
        let Claim::Created(owned) = claim(&dir, ME, &|_| panic!("no owner to probe")).unwrap() else {
            panic!("expected a new claim")
        };
        fs::remove_dir_all(&dir).unwrap(); // what unloadWithQoS: does
        let other = Owner { pid: ME.pid + 1, runner: 0 };
        let Claim::Created(theirs) = claim(&dir, other, &|_| true).unwrap() else { panic!("expected a new claim") };
        drop(owned);
        assert!(dir.join(OWNER_FILE).exists(), "our drop removed another process's directory");
        drop(theirs);
        assert!(!dir.exists());
    }

    #[test]
    fn live_owners_and_foreign_directories_are_refused_untouched() {
        let s = scratch("live");
        let dir = s.path().join("abc123");
        let Claim::Created(owned) = claim(&dir, ME, &|_| true).unwrap() else { panic!() };
        fs::write(dir.join(MIL_FILE), "theirs").unwrap();

        let other_process = Owner { pid: 999, runner: 0 };
        let e = claim(&dir, other_process, &|_| true).unwrap_err().to_string();
        assert!(e.contains("in use by process 4242"), "{e}");
        let same_process = Owner { pid: ME.pid, runner: 8 };
        let e = claim(&dir, same_process, &|_| true).unwrap_err().to_string();
        assert!(e.contains("another `ane` runner in this process"), "{e}");
        assert_eq!(fs::read_to_string(dir.join(MIL_FILE)).unwrap(), "theirs");
        std::mem::forget(owned); // still the first runner's; the scratch dir cleans up

        let foreign = s.path().join("def456");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join(MIL_FILE), "x").unwrap();
        let e = claim(&foreign, ME, &|_| false).unwrap_err().to_string();
        assert!(e.contains("not made by anetrain") && e.contains("def456"), "{e}");
        assert!(foreign.join(MIL_FILE).exists());
    }

    #[test]
    fn a_dead_owners_directory_is_taken_over() {
        let s = scratch("stale");
        let dir = s.path().join("abc123");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(OWNER_FILE), Owner { pid: 999, runner: 3 }.line()).unwrap();
        fs::write(dir.join("leftover.bin"), "old").unwrap();
        let Claim::Created(owned) = claim(&dir, ME, &|pid| pid != 999).unwrap() else { panic!() };
        assert!(!dir.join("leftover.bin").exists(), "stale contents are removed");
        assert_eq!(Owner::parse(&fs::read_to_string(dir.join(OWNER_FILE)).unwrap()), Some(ME));
        drop(owned);
        assert!(!dir.exists());
    }

    #[test]
    fn pid_probe_sees_this_process_and_not_a_reaped_child() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!pid_alive(pid));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }
}
