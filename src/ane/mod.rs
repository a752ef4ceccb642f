//! The `ane` runner: MIL kernels compiled and run on the Apple Neural Engine through the private
//! AppleNeuralEngine.framework, behind `crate::mil::KernelRunner`.
//!
//! Status, plainly: this module is compiled and unit-tested on Linux, and type-checked and
//! linted for aarch64-apple-darwin (no Apple linker, so never linked there); its authors have
//! never run it on Apple hardware. On a machine without the framework `AneRunner::new` fails
//! with one sentence naming the missing library and the alternatives. The hardware-facing code
//! follows the call sequence in the project's reference notes on the original Objective-C
//! system, `ane-seed-facts.md` (shared reference material, not in this repository):
//! - §5.1 loading (dlopen paths, class names, typed `objc_msgSend`) → `ffi`;
//! - §5.2 descriptor → model → `hexStringIdentifier` → pre-populated temp dir → compile → load
//!   (retried once after 100 ms) → count; §4.6 the weights dictionary → `AneRunner::load`;
//! - §5.3 flat IOSurfaces, `_ANEIOSurfaceObject`, one reusable `_ANERequest` per slot → `surface`;
//! - §5.4 evaluate/unload with QoS 21 and empty options; §5.5 every NO is an error carrying the
//!   NSError (the original ignored eval failures, §7.1 item 9);
//! - §5.6 the ~119-compile ceiling → `AneOptions::compile_budget`;
//! - §7.1 item 17 shared content-hashed temp dirs → `modeldir`; item 18 multi-input requests,
//!   which work per the tests it cites; constraints §1 layout rules → `layout`.
//!
//! Pure logic (surface sizes, properties, program checks, budget, temp-dir policy) lives in
//! `layout` and `modeldir` and is tested everywhere; `ffi` and `surface` are thin wrappers.
//! Not handled: Objective-C exceptions thrown by the framework abort the process (they cannot
//! unwind through Rust); methods are checked with `respondsToSelector:` at load to avoid the
//! commonest one, an unknown selector.

pub mod bench;
pub mod chips;
mod ffi;
pub mod layout;
mod modeldir;
pub mod probe;
mod surface;

use crate::mil::{KernelProgram, KernelRunner, TensorSig};
use anyhow::{Context, Result, anyhow, bail, ensure};
use ffi::{Api, Id, Obj};
use half::f16;
use modeldir::{Claim, OwnedDir, Owner};
use std::path::PathBuf;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicUsize, Ordering};
use surface::Surface;

/// Compiles by this process, all runners together: the framework's ceiling is per process.
static PROCESS_COMPILES: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Debug)]
pub struct AneOptions {
    /// Quality of service passed to compile, load, evaluate and unload. 21 is Darwin's
    /// QOS_CLASS_DEFAULT and what the original system used everywhere (facts §5.4); values
    /// 0–63 were all accepted on M5 with no latency effect.
    pub qos: u32,
    /// Compiles this process may make before `load` refuses. AppleNeuralEngine.framework fails
    /// after about 119 compiles per process (facts §5.6), so the default of 100 refuses first,
    /// with an error saying to compile fewer kernels or restart; the checkpoint lets
    /// `--resume latest` continue in a new process.
    pub compile_budget: usize,
}

impl Default for AneOptions {
    fn default() -> Self {
        AneOptions { qos: 21, compile_budget: 100 }
    }
}

/// One slot: its own input surfaces and the request binding them to the shared outputs.
struct Slot {
    request: Obj,
    inputs: Vec<Surface>,
}

/// A compiled, loaded kernel. Field order is drop order after `Drop::drop` unloads the model:
/// requests before the surfaces they reference, the model last.
struct Kernel {
    name: String,
    inputs: Vec<TensorSig>,
    outputs: Vec<TensorSig>,
    slots: Vec<Slot>,
    out_surfaces: Vec<Surface>,
    model: Obj,
    loaded: bool,
    qos: u32,
    api: &'static Api,
}

impl Kernel {
    /// `unloadWithQoS:error:` once; later calls are no-ops.
    fn unload(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.loaded) {
            return Ok(());
        }
        let api = self.api;
        let _pool = api.pool();
        let mut err: Id = null_mut();
        // SAFETY: a loaded _ANEInMemoryModel; `err` receives an autoreleased NSError, read
        // inside the pool.
        let ok = unsafe { api.send_bool_qos_err(self.model.ptr(), api.sel.unload, self.qos, &mut err) };
        ensure!(ok, "kernel `{}`: unloadWithQoS failed: {}", self.name, unsafe { api.describe(err) });
        Ok(())
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // A failure here has no one to report to; `AneRunner::close` reports it instead.
        let _ = self.unload();
    }
}

/// The Neural Engine behind `KernelRunner`. Kernel handles index `kernels`.
pub struct AneRunner {
    api: &'static Api,
    opts: AneOptions,
    /// `NSTemporaryDirectory()`, where the framework looks for `<hexStringIdentifier>/`.
    tmp_root: PathBuf,
    owner: Owner,
    /// An empty NSDictionary, the `options:` of every call (facts §5.4), made once so that
    /// `eval` builds nothing.
    no_options: Obj,
    /// `None` once unloaded (handles are never reused).
    kernels: Vec<Option<Kernel>>,
    /// Declared after `kernels`: directories go only once every model is unloaded.
    dirs: Vec<OwnedDir>,
}

impl AneRunner {
    /// Loads the frameworks (once per process) and prepares an empty runner. Fails on any
    /// machine without AppleNeuralEngine.framework, naming the library that failed.
    pub fn new(opts: AneOptions) -> Result<Self> {
        let api = ffi::api()?;
        ensure!(
            cfg!(target_arch = "aarch64"),
            "the `ane` backend needs Apple silicon: this Mac has no Neural Engine. Use --backend cpu or --backend mil-sim"
        );
        ensure!(opts.qos <= 63, "ANE QoS {} is out of range; use a value in 0..=63 (21 is the default)", opts.qos);
        ensure!(opts.compile_budget >= 1, "the ANE compile budget is 0, so no kernel could be compiled; use 100");
        let tmp_root = api.temporary_directory()?;
        let no_options = {
            let _pool = api.pool();
            // SAFETY: an empty dictionary from empty slices; retained past the pool.
            unsafe { api.retain(api.dictionary(&[], &[])?, "NSDictionary")? }
        };
        Ok(AneRunner {
            api,
            opts,
            tmp_root,
            owner: Owner::new_runner(),
            no_options,
            kernels: Vec::new(),
            dirs: Vec::new(),
        })
    }

    /// `+[_ANEDeviceInfo aneSubType]` (e.g. "h16g" on M4) for a probe banner, or None where the
    /// class or method is absent. Unverified: the return type is assumed to be an object.
    pub fn device_info(&self) -> Option<String> {
        self.sub_type().map(|s| format!("aneSubType={s}"))
    }

    /// The raw `aneSubType` string, which `chips::lookup` maps to a generation.
    pub fn sub_type(&self) -> Option<String> {
        let api = self.api;
        let cls = api.cls.device_info?;
        let _pool = api.pool();
        // SAFETY: classes answer respondsToSelector:; aneSubType is sent only if implemented.
        let sub = unsafe {
            if !api.send_bool_sel(cls, api.sel.responds, api.sel.ane_sub_type) {
                return None;
            }
            api.send_id(cls, api.sel.ane_sub_type)
        };
        (!sub.is_null()).then(|| unsafe { api.describe(sub) })
    }

    /// Unloads every kernel and removes this runner's directories, reporting the first unload
    /// failure (dropping the runner does the same silently).
    pub fn close(mut self) -> Result<()> {
        let mut first = Ok(());
        for k in self.kernels.iter_mut().flatten() {
            let r = k.unload();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn kernel(&self, kernel: usize) -> Result<&Kernel> {
        self.kernels
            .get(kernel)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("ANE kernel handle {kernel} was never returned by load, or was unloaded"))
    }

    /// `{"@model_path/<path>": {"offset": 0, "data": <bytes>}}` (facts §4.6, §5.2 step 2). The
    /// offset is 0 as in the training code; the compiler reads locations from the MIL.
    fn weights_dictionary(&self, p: &KernelProgram) -> Result<Id> {
        let api = self.api;
        let (offset_key, data_key, zero) = (api.string("offset")?, api.string("data")?, api.number_i32(0)?);
        let mut keys = Vec::with_capacity(p.blobs.len());
        let mut values = Vec::with_capacity(p.blobs.len());
        for (path, bytes) in &p.blobs {
            keys.push(api.string(&format!("@model_path/{path}"))?);
            // SAFETY: live autoreleased objects, inside the caller's pool.
            let entry = unsafe { api.dictionary(&[offset_key, data_key], &[zero, api.data(bytes)?])? };
            // The framework reads each entry's first value as the file's bytes (it sends it
            // -bytes); that holds while NSDictionary enumerates "data" before "offset", as it
            // does for the original's literal. Refuse, rather than abort in an Objective-C
            // exception, if this Foundation orders them otherwise.
            // SAFETY: public NSDictionary/NSArray methods on live objects.
            let first_is_data = unsafe {
                let first = api.send_id(api.send_id(entry, api.sel.all_values), api.sel.first_object);
                !first.is_null() && api.send_bool_sel(first, api.sel.responds, api.sel.bytes)
            };
            ensure!(
                first_is_data,
                "this macOS orders weight-file entries differently from the framework's expectation; the `ane` \
                 backend cannot pass weights safely here (please report the macOS version)"
            );
            values.push(entry);
        }
        // SAFETY: as above.
        unsafe { api.dictionary(&keys, &values) }
    }

    /// compile or load: `BOOL (id, SEL, unsigned qos, NSDictionary *options, NSError **)`.
    fn call_qos(&self, model: &Obj, sel: ffi::Sel) -> Result<(), String> {
        let mut err: Id = null_mut();
        // SAFETY: a live model and one of the two selectors with this signature (checked at
        // load time); the NSError is read inside the caller's pool.
        let ok = unsafe {
            self.api.send_bool_qos_opts_err(model.ptr(), sel, self.opts.qos, self.no_options.ptr(), &mut err)
        };
        if ok { Ok(()) } else { Err(unsafe { self.api.describe(err) }) }
    }

    fn build_kernel(&mut self, p: &KernelProgram, slots: usize) -> Result<Kernel> {
        let (api, name) = (self.api, &p.name);
        // Before any file is written: a refused compile should cost nothing.
        layout::reserve_compile(&PROCESS_COMPILES, self.opts.compile_budget, name)?;
        let _pool = api.pool();
        let mil = api.data(p.mil.as_bytes())?;
        let weights = self.weights_dictionary(p)?;
        // SAFETY: class methods checked at load time; arguments are live objects or nil.
        let desc = unsafe { api.send_id_3id(api.cls.descriptor, api.sel.model_with_mil, mil, weights, null_mut()) };
        ensure!(
            !desc.is_null(),
            "kernel `{name}`: _ANEInMemoryModelDescriptor rejected the MIL text (nil descriptor, no reason given); \
             check it with --backend mil-sim, which parses the same MIL"
        );
        // SAFETY: as above; the model is retained past the pool.
        let model = unsafe {
            let m = api.send_id_id(api.cls.model, api.sel.in_memory_model, desc);
            api.retain(m, "_ANEInMemoryModel").with_context(|| format!("kernel `{name}`: no in-memory model"))?
        };
        // SAFETY: an instance method checked at load time, returning an NSString.
        let id = unsafe { api.text(api.send_id(model.ptr(), api.sel.hex_id)) };
        let dir = self.tmp_root.join(layout::check_model_id(&id).with_context(|| format!("kernel `{name}`"))?);
        match modeldir::claim(&dir, self.owner, &modeldir::pid_alive).with_context(|| format!("kernel `{name}`"))? {
            Claim::Created(owned) => self.dirs.push(owned),
            Claim::Reused => {}
        }
        modeldir::populate(&dir, &p.mil, &p.blobs).with_context(|| format!("kernel `{name}`"))?;

        self.call_qos(&model, api.sel.compile).map_err(|e| {
            // The model directory goes away with the runner, so keep a copy of the program.
            let kept = std::env::temp_dir().join(format!("anetrain-failed-{name}-{}.mil", std::process::id()));
            let where_ = match std::fs::write(&kept, &p.mil) {
                Ok(()) => format!("the MIL is saved in {}", kept.display()),
                Err(_) => "`anetrain mil emit` writes the same MIL".to_string(),
            };
            anyhow!(
                "kernel `{name}`: the Neural Engine compiler failed: {e}; {where_} — check it with \
                 `anetrain mil check`, or try a smaller sequence length"
            )
        })?;
        // The bridge retried a failed load once after 100 ms (facts §5.2 step 6).
        if let Err(first) = self.call_qos(&model, api.sel.load) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            self.call_qos(&model, api.sel.load).map_err(|e| {
                anyhow!(
                    "kernel `{name}`: compiled but could not be loaded, twice: {first}; then: {e}; too many models \
                     may be loaded at once, so load fewer kernels or restart"
                )
            })?;
        }
        let mut k = Kernel {
            name: name.clone(),
            inputs: p.inputs.clone(),
            outputs: p.outputs.clone(),
            slots: Vec::with_capacity(slots),
            out_surfaces: Vec::new(),
            model,
            loaded: true,
            qos: self.opts.qos,
            api,
        };
        // Surfaces from here: any failure drops `k`, which unloads the model.
        let all: Vec<TensorSig> = p.inputs.iter().chain(&p.outputs).cloned().collect();
        let bytes = layout::surface_bytes(&all);
        let surfaces = |n: usize| (0..n).map(|_| Surface::new(api, bytes)).collect::<Result<Vec<_>>>();
        k.out_surfaces = surfaces(p.outputs.len()).with_context(|| format!("kernel `{name}` outputs"))?;
        let indices = |n: usize| (0..n).map(|i| api.number_i32(i as i32)).collect::<Result<Vec<Id>>>();
        let (in_idx, out_idx) = (indices(p.inputs.len())?, indices(p.outputs.len())?);
        let outs: Vec<Id> = k.out_surfaces.iter().map(|s| s.object().ptr()).collect();
        for slot in 0..slots {
            let inputs = surfaces(p.inputs.len()).with_context(|| format!("kernel `{name}` slot {slot} inputs"))?;
            let ins: Vec<Id> = inputs.iter().map(|s| s.object().ptr()).collect();
            // SAFETY: arrays of live objects; requestWithInputs… checked at load time; the
            // request holds references to its surfaces, and we keep ours too.
            let request = unsafe {
                let args = [
                    api.array(&ins)?,
                    api.array(&in_idx)?,
                    api.array(&outs)?,
                    api.array(&out_idx)?,
                    null_mut(),         // weightsBuffer: unused (weights are inputs or baked, facts §5.7)
                    null_mut(),         // perfStats
                    api.number_i32(0)?, // procedureIndex: the MIL's only function
                ];
                let request = if api.has_request7() {
                    api.send_id_7id(api.cls.request, api.sel.request, args)
                } else {
                    api.send_id_5id(api.cls.request, api.sel.request5, [args[0], args[1], args[2], args[3], args[6]])
                };
                api.retain(request, "_ANERequest")
                    .with_context(|| format!("kernel `{name}` slot {slot}: the framework built no request"))?
            };
            k.slots.push(Slot { request, inputs });
        }
        Ok(k)
    }
}

impl KernelRunner for AneRunner {
    fn name(&self) -> &'static str {
        "ane"
    }

    fn load(&mut self, program: &KernelProgram, slots: usize) -> Result<usize> {
        crate::mil::rules::check_program(program, slots)?;
        let k = self.build_kernel(program, slots)?;
        self.kernels.push(Some(k));
        Ok(self.kernels.len() - 1)
    }

    fn unload(&mut self, kernel: usize) -> Result<()> {
        let Some(mut k) = self.kernels.get_mut(kernel).and_then(Option::take) else {
            bail!("ANE kernel handle {kernel} was never returned by load, or was already unloaded")
        };
        k.unload()
    }

    fn write_input(
        &mut self,
        kernel: usize,
        slot: usize,
        input: usize,
        fill: &mut dyn FnMut(&mut [f16]),
    ) -> Result<()> {
        let k = self.kernel(kernel)?;
        let (Some(s), Some(sig)) = (k.slots.get(slot), k.inputs.get(input)) else {
            bail!(
                "kernel `{}` has {} slots and {} inputs; asked for slot {slot} input {input}",
                k.name,
                k.slots.len(),
                k.inputs.len()
            )
        };
        s.inputs[input].write(sig.elems(), fill).with_context(|| format!("kernel `{}` input `{}`", k.name, sig.name))
    }

    fn eval(&mut self, kernel: usize, slot: usize) -> Result<()> {
        let (api, k) = (self.api, self.kernel(kernel)?);
        let Some(s) = k.slots.get(slot) else {
            bail!("kernel `{}` has {} slots; asked for {slot}", k.name, k.slots.len())
        };
        let _pool = api.pool();
        let mut err: Id = null_mut();
        // SAFETY: a loaded model, a request built for it, the retained empty options; the
        // NSError is read inside the pool.
        let ok = unsafe {
            api.send_bool_qos_opts_req_err(
                k.model.ptr(),
                api.sel.evaluate,
                self.opts.qos,
                self.no_options.ptr(),
                s.request.ptr(),
                &mut err,
            )
        };
        if !ok {
            bail!(
                "kernel `{}` slot {slot}: the Neural Engine failed to evaluate: {}; compare the kernel with \
                 --backend mil-sim, or fall back to --backend cpu",
                k.name,
                unsafe { api.describe(err) }
            );
        }
        Ok(())
    }

    fn read_output(&mut self, kernel: usize, output: usize, read: &mut dyn FnMut(&[f16])) -> Result<()> {
        let k = self.kernel(kernel)?;
        let Some(sig) = k.outputs.get(output) else {
            bail!("kernel `{}` has {} outputs; asked for {output}", k.name, k.outputs.len())
        };
        k.out_surfaces[output]
            .read(sig.elems(), read)
            .with_context(|| format!("kernel `{}` output `{}`", k.name, sig.name))
    }

    fn compiles(&self) -> usize {
        PROCESS_COMPILES.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(target_os = "macos", ignore = "needs a machine without AppleNeuralEngine.framework")]
    fn new_fails_with_one_sentence_naming_the_library() {
        let Err(e) = AneRunner::new(AneOptions::default()) else { panic!("the ANE framework loaded on this machine") };
        let msg = e.to_string();
        assert!(msg.starts_with("the `ane` backend needs macOS on Apple silicon"), "{msg}");
        assert!(msg.contains("could not load /usr/lib/libobjc.A.dylib: "), "{msg}");
        assert!(msg.ends_with("Use --backend cpu or --backend mil-sim on this machine."), "{msg}");
        assert!(!msg.contains('\n'));
        // dlerror's reason is kept, its repetition of the path is not
        let reason = msg.split("libobjc.A.dylib: ").nth(1).unwrap();
        assert!(reason.len() > ". Use --backend".len() && !reason.contains("libobjc"), "{msg}");
        // the same sentence every time (the load is attempted once per process)
        assert_eq!(AneRunner::new(AneOptions::default()).err().unwrap().to_string(), msg);
    }

    #[test]
    fn load_error_keeps_the_reason_once() {
        let m = ffi::load_error("/x/lib.dylib", "/x/lib.dylib: cannot open shared object file: No such file");
        assert_eq!(
            m,
            "the `ane` backend needs macOS on Apple silicon with AppleNeuralEngine.framework; could not load \
             /x/lib.dylib: cannot open shared object file: No such file. Use --backend cpu or --backend mil-sim \
             on this machine."
        );
        let m = ffi::load_error("/x/lib.dylib", "dlopen(/x/lib.dylib, 0x0002): tried: '/x/lib.dylib' (no such file)");
        assert!(m.contains("could not load /x/lib.dylib: dlopen(/x/lib.dylib, 0x0002): tried:"), "{m}");
    }

    /// The default budget must refuse before the framework's own ceiling does, and still let
    /// one process compile a whole kernel set (10 per-layer kernels and the classifier).
    #[test]
    fn default_compile_budget_fits_a_kernel_set_below_the_framework_ceiling() {
        let budget = AneOptions::default().compile_budget;
        assert!(budget < layout::FRAMEWORK_COMPILE_CEILING);
        let cfg = crate::config::ModelConfig::preset("stories110m").unwrap();
        let set = crate::mil::emit::KernelSet::new(&cfg, 256, crate::mil::emit::InputLayout::Packed).unwrap();
        assert!(budget > set.all().len(), "budget {budget}");
    }
}
