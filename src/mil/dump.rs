//! `--mil-dump DIR`: every program a run compiles, written as the runner received it (after
//! the dialect rewrite), so that what reached the simulator or the Neural Engine can be read,
//! checked with `mil check`, or attached to a bug report. Program n goes to
//! `DIR/NNNN-<kernel>/` as `model.mil` and `weights/*.bin`, the layout of `mil emit`;
//! static mode recompiles, so its baked kernels appear once per compile.

use super::{KernelProgram, KernelRunner};
use anyhow::{Context, Result};
use half::f16;
use std::path::{Path, PathBuf};

/// A runner that writes each program it loads under a directory, then hands it on.
pub struct DumpRunner {
    inner: Box<dyn KernelRunner>,
    dir: PathBuf,
    written: usize,
}

impl DumpRunner {
    /// Creates `dir` if needed. Numbering continues after the entries already there, so a
    /// run that resumes (or restarts itself past its compile budget) appends its programs.
    pub fn new(inner: Box<dyn KernelRunner>, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create --mil-dump {}", dir.display()))?;
        let written =
            std::fs::read_dir(dir).with_context(|| format!("cannot read --mil-dump {}", dir.display()))?.count();
        Ok(DumpRunner { inner, dir: dir.to_path_buf(), written })
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

impl KernelRunner for DumpRunner {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn load(&mut self, program: &KernelProgram, slots: usize) -> Result<usize> {
        self.write(program).with_context(|| format!("--mil-dump: writing kernel {}", program.name))?;
        self.inner.load(program, slots)
    }

    fn write_input(
        &mut self,
        kernel: usize,
        slot: usize,
        input: usize,
        fill: &mut dyn FnMut(&mut [f16]),
    ) -> Result<()> {
        self.inner.write_input(kernel, slot, input, fill)
    }

    fn eval(&mut self, kernel: usize, slot: usize) -> Result<()> {
        self.inner.eval(kernel, slot)
    }

    fn read_output(&mut self, kernel: usize, output: usize, read: &mut dyn FnMut(&[f16])) -> Result<()> {
        self.inner.read_output(kernel, output, read)
    }

    fn compiles(&self) -> usize {
        self.inner.compiles()
    }

    fn unload(&mut self, kernel: usize) -> Result<()> {
        self.inner.unload(kernel)
    }
}
