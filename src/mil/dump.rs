//! `--mil-dump DIR`: every program a run compiles, written as the runner received it (after
//! the dialect rewrite), so that what reached the simulator or the Neural Engine can be read,
//! checked with `mil check`, or attached to a bug report. Program n goes to
//! `DIR/NNNN-<kernel>/` as `model.mil` and `weights/*.bin`, the layout of `mil emit`;
//! static mode recompiles, so its baked kernels appear once per compile.

use super::{KernelProgram, LoadHook};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Writes each program a [`super::Hooked`] runner loads under a directory.
pub struct MilDump {
    dir: PathBuf,
    written: usize,
}

impl MilDump {
    /// Creates `dir` if needed. Numbering continues after the entries already there, so a
    /// run that resumes (or restarts itself past its compile budget) appends its programs.
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create --mil-dump {}", dir.display()))?;
        let written =
            std::fs::read_dir(dir).with_context(|| format!("cannot read --mil-dump {}", dir.display()))?.count();
        Ok(MilDump { dir: dir.to_path_buf(), written })
    }

    fn write(&mut self, p: &KernelProgram) -> Result<()> {
        let dir = self.dir.join(format!("{:04}-{}", self.written, p.name));
        std::fs::create_dir_all(dir.join("weights")).with_context(|| format!("cannot create {}", dir.display()))?;
        let put = |path: &Path, bytes: &[u8]| {
            crate::fsio::write_atomically(path, |out| std::io::Write::write_all(out, bytes))
        };
        put(&dir.join("model.mil"), p.mil.as_bytes())?;
        for (rel, bytes) in &p.blobs {
            put(&dir.join(rel), bytes)?;
        }
        self.written += 1;
        Ok(())
    }
}

impl LoadHook for MilDump {
    fn before_load(&mut self, program: &KernelProgram) -> Result<Option<KernelProgram>> {
        self.write(program).with_context(|| format!("--mil-dump: writing kernel {}", program.name))?;
        Ok(None)
    }
}
