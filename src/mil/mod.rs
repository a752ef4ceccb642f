//! The Neural Engine path, everything except the Apple runtime itself: MIL programs for the
//! kernel set (`emit`), their weight blob files (`blob`), a parser for the MIL subset we emit
//! (`parse`), the rules every program must meet (`rules`), an fp16 interpreter of it (`sim`),
//! and a `Backend` that runs the kernel set on any `KernelRunner` — the simulator here, the
//! hardware in `crate::ane` (which depends on this module, never the reverse).
//!
//! Layout on the accelerator side is the original system's: a tensor `[1, C, 1, W]` in fp16,
//! element (c, w) at `c·W + w`; activations occupy W = S positions (T padded to a multiple
//! of 32), one channel per feature.

use anyhow::Result;
use half::f16;

/// One function input or output: its MIL name and its `[1, C, 1, W]` shape (fp16).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSig {
    pub name: String,
    pub shape: [usize; 4],
}

impl TensorSig {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        2 * self.elems()
    }
}

/// One kernel as the runtime needs it: MIL text, the weight files it references, and its
/// signature. Input names are chosen so that their alphabetical order equals declaration
/// order (the hardware binds surfaces alphabetically by some accounts, by index by others;
/// with these names both agree). Every kernel has exactly one output.
#[derive(Clone, Debug)]
pub struct KernelProgram {
    pub name: String,
    pub mil: String,
    /// Weight files as `(path relative to the model directory, bytes)`, e.g.
    /// `("weights/mask.bin", …)`; the MIL refers to them as `@model_path/weights/mask.bin`.
    pub blobs: Vec<(String, Vec<u8>)>,
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
}

/// Something that can run compiled kernels: the fp16 simulator or the Neural Engine.
///
/// A kernel is loaded once and serves every layer: each of its `slots` (one per layer) owns
/// its own input buffers, so a layer's weights can stay staged between calls, while the
/// output buffer is shared by all slots.
pub trait KernelRunner: Send {
    fn name(&self) -> &'static str;

    /// Compiles and loads `program` with `slots` input sets; returns the kernel's handle.
    fn load(&mut self, program: &KernelProgram, slots: usize) -> Result<usize>;

    /// Gives `fill` the fp16 buffer of input `input` of `slot` (length `inputs[input].elems()`).
    fn write_input(&mut self, kernel: usize, slot: usize, input: usize, fill: &mut dyn FnMut(&mut [f16]))
    -> Result<()>;

    /// Runs the kernel on `slot`'s inputs into the shared output buffers.
    fn eval(&mut self, kernel: usize, slot: usize) -> Result<()>;

    /// Gives `read` the fp16 buffer of output `output` from the last `eval`.
    fn read_output(&mut self, kernel: usize, output: usize, read: &mut dyn FnMut(&[f16])) -> Result<()>;

    /// Kernels compiled by this process so far (the hardware allows about 119). Unloading
    /// does not lower it: the hardware's ceiling counts compiles, not loaded kernels.
    fn compiles(&self) -> usize;

    /// Unloads `kernel` and frees its buffers; its handle is invalid afterwards (every call
    /// with it fails). Static mode unloads each baked kernel before compiling its successor.
    fn unload(&mut self, kernel: usize) -> Result<()>;
}

/// What a [`Hooked`] runner does to each program before its inner runner loads it: return
/// the program to load instead (`None`: load the original).
pub trait LoadHook: Send {
    fn before_load(&mut self, program: &KernelProgram) -> Result<Option<KernelProgram>>;
}

/// A runner that passes every program through `hook` on its way to `inner` (the dialect
/// rewrite, `--mil-dump`) and forwards every other call unchanged.
pub struct Hooked<H> {
    inner: Box<dyn KernelRunner>,
    hook: H,
}

impl<H: LoadHook> Hooked<H> {
    pub fn new(inner: Box<dyn KernelRunner>, hook: H) -> Self {
        Hooked { inner, hook }
    }
}

impl<H: LoadHook> KernelRunner for Hooked<H> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn load(&mut self, program: &KernelProgram, slots: usize) -> Result<usize> {
        match self.hook.before_load(program)? {
            Some(p) => self.inner.load(&p, slots),
            None => self.inner.load(program, slots),
        }
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

pub mod ast;
pub mod backend;
pub mod bake;
pub mod benchprog;
pub mod blob;
pub mod check;
pub mod dialect;
pub mod dump;
pub mod emit;
pub mod export;
mod graph;
pub mod parse;
pub mod rules;
pub mod sim;
pub mod types;
pub mod w8a8;
