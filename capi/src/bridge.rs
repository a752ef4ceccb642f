//! The Neural Engine bridge: compile a MIL program from its text plus named weight blobs,
//! write its inputs, evaluate it, read its outputs, count compiles. A bridge is one
//! `KernelRunner`: on macOS the Neural Engine runtime (`anetrain::ane`), elsewhere — or when
//! asked — the fp16 MIL simulator (`mil-sim`), which applies the same program rules.

use crate::args::{out_ptr, slice, slice_mut, text, write};
use crate::error::{AnetrainStatus, Res, fail, guard, with_status};
use crate::handles::{self, Kind};
use anetrain::mil::ast::{DType, Type};
use anetrain::mil::{KernelProgram, KernelRunner, TensorSig};
use half::f16;
use std::ffi::c_char;
use std::sync::{Arc, Mutex};

/// A bridge opened by `anetrain_bridge_open`. The zero handle is never valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnetrainBridge {
    pub id: u64,
}

/// A program compiled by `anetrain_bridge_compile`. The zero handle is never valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnetrainProgram {
    pub id: u64,
}

/// Which runtime a bridge uses (the `kind` of `anetrain_bridge_open`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnetrainBridgeKind {
    /// The Neural Engine on macOS, the simulator everywhere else.
    Default = 0,
    /// The fp16 MIL simulator (every platform): each op computed in f32 and rounded to fp16.
    Simulator = 1,
    /// The Neural Engine (AppleNeuralEngine.framework, Apple silicon only; fails elsewhere).
    NeuralEngine = 2,
}

/// One named weight file of a program: `name` is its path relative to the program's model
/// directory, as the MIL refers to it (`BLOBFILE(path = string("@model_path/weights/w.bin"),
/// …)` is the weight named "weights/w.bin"); `data` holds `len` bytes in the blob format
/// `anetrain_bridge_weight_blob` writes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AnetrainWeight {
    pub name: *const c_char,
    pub data: *const u8,
    pub len: usize,
}

pub(crate) struct BridgeObj {
    runner: Box<dyn KernelRunner>,
    kind: AnetrainBridgeKind,
    /// Programs compiled so far, for their names.
    compiled: usize,
}

impl Kind for BridgeObj {
    const NAME: &'static str = "bridge";
}

pub(crate) struct ProgramObj {
    /// Keeps the runtime alive while the program is, even after its bridge is freed.
    bridge: Arc<Mutex<BridgeObj>>,
    kernel: usize,
    program: KernelProgram,
}

impl Kind for ProgramObj {
    const NAME: &'static str = "program";
}

impl Drop for ProgramObj {
    fn drop(&mut self) {
        // Runs in `anetrain_program_free`, never inside a bridge call, so waiting is safe; an
        // unload failure has no one to report to (the handle is gone either way).
        let mut b = self.bridge.lock().unwrap_or_else(|p| p.into_inner());
        let _ = b.runner.unload(self.kernel);
    }
}

/// Opens a bridge of `kind` (an `AnetrainBridgeKind` value). `ANETRAIN_BRIDGE_KIND_DEFAULT`
/// is the Neural Engine on macOS and the simulator elsewhere; asking for the Neural Engine
/// where there is none fails with `ANETRAIN_STATUS_FAILED`, saying why.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_bridge_open(kind: i32, out: *mut AnetrainBridge) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainBridge::default()) };
        let kind = match kind {
            0 if cfg!(target_os = "macos") => AnetrainBridgeKind::NeuralEngine,
            0 | 1 => AnetrainBridgeKind::Simulator,
            2 => AnetrainBridgeKind::NeuralEngine,
            k => return Err(fail(AnetrainStatus::BadArgument, format!("bridge kind {k} is not 0, 1 or 2"))),
        };
        let runner: Box<dyn KernelRunner> = match kind {
            AnetrainBridgeKind::NeuralEngine => {
                let ane = anetrain::ane::AneRunner::new(anetrain::ane::AneOptions::default()).map_err(|e| {
                    fail(
                        AnetrainStatus::Failed,
                        format!("{e:#} (in the C ABI: open the bridge with ANETRAIN_BRIDGE_KIND_SIMULATOR instead)"),
                    )
                })?;
                Box::new(ane)
            }
            _ => Box::new(anetrain::mil::sim::SimRunner::new(crate::runtime()?.0)),
        };
        let id = handles::insert(BridgeObj { runner, kind, compiled: 0 });
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainBridge { id }) };
        Ok(())
    })
}

/// The runtime a bridge uses: `ANETRAIN_BRIDGE_KIND_SIMULATOR` or
/// `ANETRAIN_BRIDGE_KIND_NEURAL_ENGINE`.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_bridge_kind(bridge: AnetrainBridge, out: *mut i32) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        let b = handles::get::<BridgeObj>(bridge.id)?;
        let kind = handles::lock(&b)?.kind;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, kind as i32) };
        Ok(())
    })
}

/// Frees a bridge. Programs compiled with it stay usable until they are freed.
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_bridge_free(bridge: AnetrainBridge) -> AnetrainStatus {
    guard(|| handles::remove::<BridgeObj>(bridge.id))
}

/// Programs this bridge's runtime has compiled (the Neural Engine allows about 119 per
/// process; freeing programs does not lower the count).
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_bridge_compile_count(bridge: AnetrainBridge, out: *mut usize) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        let b = handles::get::<BridgeObj>(bridge.id)?;
        let n = handles::lock(&b)?.runner.compiles();
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, n) };
        Ok(())
    })
}

/// A function input or output as a surface signature: fp16 `[1, C, H, W]`.
fn sig(name: &str, ty: &Type, what: &str) -> Res<TensorSig> {
    match (ty.dtype(), ty.shape()) {
        (DType::Fp16, &[a, b, c, d]) => Ok(TensorSig { name: name.to_string(), shape: [a, b, c, d] }),
        _ => Err(fail(
            AnetrainStatus::BadArgument,
            format!("{what} `{name}` is {}; the bridge passes fp16 [1, C, H, W] tensors only", ty.text()),
        )),
    }
}

/// Compiles and loads a MIL program (`mil`: its text, NUL-terminated) with `n_weights` weight
/// files. Its inputs and outputs are the function's, in declaration order; each must be an
/// fp16 `[1, C, H, W]` tensor, and their names must be in alphabetical order (the Neural
/// Engine may bind them alphabetically). The program is checked by the project's MIL parser
/// and type checker and by the rules the Neural Engine imposes, in both runtimes. On failure
/// `*out` is set to the zero handle.
///
/// # Safety
/// `mil` is NULL or NUL-terminated; `weights` is NULL or holds `n_weights` entries whose
/// `name` is NUL-terminated and whose `data` holds `len` bytes; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_bridge_compile(
    bridge: AnetrainBridge,
    mil: *const c_char,
    weights: *const AnetrainWeight,
    n_weights: usize,
    out: *mut AnetrainProgram,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(out, "out")?;
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainProgram::default()) };
        // SAFETY: the caller's contract.
        let mil = unsafe { text(mil, "mil") }?;
        // SAFETY: the caller's contract.
        let entries = unsafe { slice(weights, n_weights, "weights") }?;
        let mut blobs = Vec::with_capacity(entries.len());
        for (i, w) in entries.iter().enumerate() {
            // SAFETY: the caller's contract for each entry.
            let name = unsafe { text(w.name, &format!("weights[{i}].name")) }?;
            // SAFETY: the caller's contract for each entry.
            let data = unsafe { slice(w.data, w.len, &format!("weights[{i}].data")) }?;
            blobs.push((name.to_string(), data.to_vec()));
        }
        let parsed = anetrain::mil::parse::parse(mil).map_err(with_status(AnetrainStatus::BadArgument))?;
        let f = &parsed.func;
        let inputs = f.inputs.iter().map(|(n, t)| sig(n, t, "input")).collect::<Res<Vec<_>>>()?;
        let mut outputs = Vec::with_capacity(f.outputs.len());
        for name in &f.outputs {
            let st = f.body.iter().find(|s| &s.name == name).ok_or_else(|| {
                fail(AnetrainStatus::BadArgument, format!("output `{name}` is not computed by the program"))
            })?;
            outputs.push(sig(name, &st.ty, "output")?);
        }
        let b = handles::get::<BridgeObj>(bridge.id)?;
        let mut guard_b = handles::lock(&b)?;
        let name = format!("capi_{}", guard_b.compiled);
        let program = KernelProgram { name, mil: mil.to_string(), blobs, inputs, outputs };
        let (_, pool) = crate::runtime()?;
        let runner = &mut guard_b.runner;
        let kernel = pool.install(|| runner.load(&program, 1)).map_err(with_status(AnetrainStatus::Failed))?;
        guard_b.compiled += 1;
        drop(guard_b);
        let id = handles::insert(ProgramObj { bridge: b, kernel, program });
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out, AnetrainProgram { id }) };
        Ok(())
    })
}

/// Frees a program (unloading it from its runtime). Its handle is invalid afterwards.
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_program_free(program: AnetrainProgram) -> AnetrainStatus {
    guard(|| handles::remove::<ProgramObj>(program.id))
}

/// The number of inputs and outputs of a program.
///
/// # Safety
/// `n_inputs` and `n_outputs` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_program_io(
    program: AnetrainProgram,
    n_inputs: *mut usize,
    n_outputs: *mut usize,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(n_inputs, "n_inputs")?;
        out_ptr(n_outputs, "n_outputs")?;
        let p = handles::get::<ProgramObj>(program.id)?;
        let p = handles::lock(&p)?;
        // SAFETY: checked by `out_ptr`.
        unsafe {
            write(n_inputs, p.program.inputs.len());
            write(n_outputs, p.program.outputs.len());
        }
        Ok(())
    })
}

fn pick<'a>(sigs: &'a [TensorSig], index: usize, what: &str) -> Res<&'a TensorSig> {
    sigs.get(index).ok_or_else(|| {
        fail(AnetrainStatus::BadArgument, format!("the program has {} {what}s; there is no {what} {index}", sigs.len()))
    })
}

/// The shape `[1, C, H, W]` of input `index` (`output` 0) or output `index` (`output`
/// non-zero); its element count is the product.
///
/// # Safety
/// `shape` is NULL or has room for 4 values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_program_shape(
    program: AnetrainProgram,
    output: i32,
    index: usize,
    shape: *mut usize,
) -> AnetrainStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let dst = unsafe { slice_mut(shape, 4, "shape") }?;
        let p = handles::get::<ProgramObj>(program.id)?;
        let p = handles::lock(&p)?;
        let (sigs, what) = if output != 0 { (&p.program.outputs, "output") } else { (&p.program.inputs, "input") };
        dst.copy_from_slice(&pick(sigs, index, what)?.shape);
        Ok(())
    })
}

/// Runs `body` on a program's kernel with its bridge locked, checking that `n` is the
/// element count of input (`output` false) or output `index`.
fn with_kernel(
    program: AnetrainProgram,
    output: bool,
    index: usize,
    n: usize,
    body: impl FnOnce(&mut dyn KernelRunner, usize) -> anyhow::Result<()>,
) -> Res<()> {
    let p = handles::get::<ProgramObj>(program.id)?;
    let p = handles::lock(&p)?;
    let (sigs, what) = if output { (&p.program.outputs, "output") } else { (&p.program.inputs, "input") };
    let s = pick(sigs, index, what)?;
    if n != s.elems() {
        return Err(fail(
            AnetrainStatus::BadLength,
            format!("{what} {index} (`{}`, shape {:?}) holds {} values, not {n}", s.name, s.shape, s.elems()),
        ));
    }
    let mut b = handles::lock(&p.bridge)?;
    body(b.runner.as_mut(), p.kernel).map_err(with_status(AnetrainStatus::Failed))
}

/// Writes input `index` from `n` floats (its element count, row-major `[1, C, H, W]`),
/// rounded to fp16 (values beyond ±65504 become ±infinity, as on the hardware).
///
/// # Safety
/// `data` is NULL or holds `n` floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_program_write_input(
    program: AnetrainProgram,
    index: usize,
    data: *const f32,
    n: usize,
) -> AnetrainStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let src = unsafe { slice(data, n, "data") }?;
        with_kernel(program, false, index, n, |r, k| {
            r.write_input(k, 0, index, &mut |buf| buf.iter_mut().zip(src).for_each(|(d, &s)| *d = f16::from_f32(s)))
        })
    })
}

/// Writes input `index` from `n` raw IEEE fp16 values (bit patterns), unchanged.
///
/// # Safety
/// `data` is NULL or holds `n` values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_program_write_input_fp16(
    program: AnetrainProgram,
    index: usize,
    data: *const u16,
    n: usize,
) -> AnetrainStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let src = unsafe { slice(data, n, "data") }?;
        with_kernel(program, false, index, n, |r, k| {
            r.write_input(k, 0, index, &mut |buf| buf.iter_mut().zip(src).for_each(|(d, &s)| *d = f16::from_bits(s)))
        })
    })
}

/// Evaluates the program on the inputs written so far (inputs never written are zero).
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_program_eval(program: AnetrainProgram) -> AnetrainStatus {
    guard(|| {
        let p = handles::get::<ProgramObj>(program.id)?;
        let p = handles::lock(&p)?;
        let mut b = handles::lock(&p.bridge)?;
        let (_, pool) = crate::runtime()?;
        let (runner, kernel) = (&mut b.runner, p.kernel);
        pool.install(|| runner.eval(kernel, 0)).map_err(with_status(AnetrainStatus::Failed))
    })
}

/// Reads output `index` of the last evaluation into `n` floats (its element count).
///
/// # Safety
/// `data` is NULL or has room for `n` floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_program_read_output(
    program: AnetrainProgram,
    index: usize,
    data: *mut f32,
    n: usize,
) -> AnetrainStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let dst = unsafe { slice_mut(data, n, "data") }?;
        with_kernel(program, true, index, n, |r, k| {
            r.read_output(k, index, &mut |buf| dst.iter_mut().zip(buf).for_each(|(d, s)| *d = s.to_f32()))
        })
    })
}

/// Reads output `index` of the last evaluation as `n` raw IEEE fp16 values (bit patterns).
///
/// # Safety
/// `data` is NULL or has room for `n` values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_program_read_output_fp16(
    program: AnetrainProgram,
    index: usize,
    data: *mut u16,
    n: usize,
) -> AnetrainStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let dst = unsafe { slice_mut(data, n, "data") }?;
        with_kernel(program, true, index, n, |r, k| {
            r.read_output(k, index, &mut |buf| dst.iter_mut().zip(buf).for_each(|(d, s)| *d = s.to_bits()))
        })
    })
}

/// Builds a weight file for `anetrain_bridge_compile` from `n` floats (rounded to fp16, in
/// the order of the tensor the MIL declares for it): a 64-byte file header, a 64-byte chunk
/// header, then the data; the MIL refers to it with `offset = uint64(64)`. Writes it into
/// `out` (room for `cap` bytes); `*out_len` receives its size (128 + 2·n). Pass `out` NULL
/// and `cap` 0 to ask for the size only; a smaller `cap` is `ANETRAIN_STATUS_BAD_LENGTH`.
///
/// # Safety
/// `w` is NULL or holds `n` floats; `out` is NULL or has room for `cap` bytes; `out_len` is
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn anetrain_bridge_weight_blob(
    w: *const f32,
    n: usize,
    out: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> AnetrainStatus {
    guard(|| {
        out_ptr(out_len, "out_len")?;
        // SAFETY: the caller's contract.
        let w = unsafe { slice(w, n, "w") }?;
        if w.is_empty() || n > (u32::MAX / 2) as usize {
            return Err(fail(AnetrainStatus::BadLength, format!("a weight blob holds 1 to 2^31 - 1 values, not {n}")));
        }
        let h: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
        let file = anetrain::mil::blob::blob_file(&h);
        // SAFETY: checked by `out_ptr`.
        unsafe { write(out_len, file.len()) };
        if out.is_null() && cap == 0 {
            return Ok(());
        }
        if cap < file.len() {
            return Err(fail(
                AnetrainStatus::BadLength,
                format!("out holds {cap} bytes; the blob needs {}", file.len()),
            ));
        }
        // SAFETY: the caller's contract.
        unsafe { slice_mut(out, cap, "out") }?[..file.len()].copy_from_slice(&file);
        Ok(())
    })
}
