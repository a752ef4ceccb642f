//! Pure rules the runtime applies before touching the framework: which programs it accepts,
//! how large each IOSurface is, what the surface properties say, and the compile budget.
//! Kept apart from the FFI so that all of it is unit-tested on any machine.

use crate::mil::{KernelProgram, TensorSig};
use anyhow::{Result, bail, ensure};
use std::collections::HashSet;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Apple silicon's page size. IOSurface allocations are page-granular, so rounding a surface up
/// to it costs no memory, and every multiple of it is also a multiple of the 128 bytes that M5
/// reportedly requires (constraints §1; facts §4.7, PR#35).
pub const SURFACE_GRANULE: usize = 16 * 1024;

/// Surfaces smaller than about 48 KB are reported to misbehave (Orion #4), so none is smaller.
pub const MIN_SURFACE_BYTES: usize = 3 * SURFACE_GRANULE;

/// The ANE's per-dimension cap (facts §5.3, ANEForge PR#51).
pub const MAX_DIM: usize = 65_536;

/// Byte size of every surface of a kernel — inputs and the output alike: the largest tensor of
/// its signature, rounded up to `SURFACE_GRANULE` and at least `MIN_SURFACE_BYTES`.
///
/// One size for all surfaces because multi-surface kernels are reported to corrupt data when
/// allocation sizes differ (Orion #2, #12); tensors are packed at the start of their surface
/// (Orion #14) and the rest is never read. Equal sizes also satisfy, trivially, the report that
/// input sizes must ascend and output sizes descend (maderix #47). The cost is memory: a kernel whose weights input is
/// much larger than its activations pays the weights size for every surface.
pub fn surface_bytes(sigs: &[TensorSig]) -> usize {
    let largest = sigs.iter().map(TensorSig::bytes).max().unwrap_or(0);
    largest.div_ceil(SURFACE_GRANULE).max(1).saturating_mul(SURFACE_GRANULE).max(MIN_SURFACE_BYTES)
}

/// `IOSurfaceCreate` properties for a flat byte buffer of `bytes` (facts §5.3): one row of
/// `bytes` one-byte elements, pixel format 0. Keys are the values of the `kIOSurface*` constants.
pub fn surface_properties(bytes: usize) -> [(&'static str, u64); 6] {
    let b = bytes as u64;
    [
        ("IOSurfaceWidth", b),
        ("IOSurfaceHeight", 1),
        ("IOSurfaceBytesPerElement", 1),
        ("IOSurfaceBytesPerRow", b),
        ("IOSurfaceAllocSize", b),
        ("IOSurfacePixelFormat", 0),
    ]
}

/// Rejects programs the hardware would run wrongly or not at all, before compiling them.
pub fn check_program(p: &KernelProgram, slots: usize) -> Result<()> {
    let name = &p.name;
    ensure!(slots >= 1, "kernel `{name}`: asked for 0 slots; every kernel needs at least one input set");
    ensure!(!p.mil.trim().is_empty(), "kernel `{name}`: the MIL text is empty");
    ensure!(!p.inputs.is_empty(), "kernel `{name}`: declares no inputs; the Neural Engine request needs at least one");
    ensure!(!p.outputs.is_empty(), "kernel `{name}`: declares no outputs");
    for (kind, sigs) in [("input", &p.inputs), ("output", &p.outputs)] {
        for s in sigs {
            ensure!(
                s.shape[0] == 1 && s.elems() > 0,
                "kernel `{name}`: {kind} `{}` has shape {:?}; surfaces hold one non-empty [1, C, H, W] tensor",
                s.name,
                s.shape
            );
            ensure!(
                s.shape.iter().all(|&d| d <= MAX_DIM),
                "kernel `{name}`: {kind} `{}` has shape {:?}; the Neural Engine caps every dimension at {MAX_DIM}, \
                 so split the tensor",
                s.name,
                s.shape
            );
        }
        // The hardware binds surfaces in alphabetical order of their MIL names by some
        // accounts (Orion #3, #13) and in declaration order by others; requests pass them in
        // declaration order, so the two orders must agree. Byte order, as strcmp sorts.
        for w in sigs.windows(2) {
            if w[0].name >= w[1].name {
                bail!(
                    "kernel `{name}`: {kind}s `{}` then `{}` are not in strictly alphabetical order; the Neural \
                     Engine may bind surfaces alphabetically, so rename them (e.g. with a numeric prefix) to make \
                     declaration order alphabetical",
                    w[0].name,
                    w[1].name
                );
            }
        }
    }
    let mut seen = HashSet::new();
    for (path, _) in &p.blobs {
        check_relative(path).map_err(|e| e.context(format!("kernel `{name}`: weight file {path:?}")))?;
        ensure!(seen.insert(path.as_str()), "kernel `{name}`: weight file {path:?} is listed twice");
    }
    Ok(())
}

/// A weight path must stay inside the model directory: relative, only plain components, and
/// not one of the names the runtime writes itself.
pub fn check_relative(path: &str) -> Result<&Path> {
    let p = Path::new(path);
    ensure!(!path.is_empty(), "the path is empty");
    ensure!(
        p.components().all(|c| matches!(c, Component::Normal(_))),
        "the path must be relative to the model directory, without `..`, `.` or a root (like `weights/w1.bin`)"
    );
    // `data` is written by the framework itself next to model.mil.
    ensure!(
        path != super::modeldir::MIL_FILE && path != super::modeldir::OWNER_FILE && path != "data",
        "the name is reserved for the runtime's own file"
    );
    Ok(p)
}

/// The framework's `hexStringIdentifier` names a directory; refuse anything that could walk out
/// of the temporary directory if a future framework changed its format.
pub fn check_model_id(id: &str) -> Result<&str> {
    ensure!(
        !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "the framework returned the model identifier {id:?}, which is not a plain directory name; this macOS \
         version is not supported by the `ane` backend, use --backend cpu or --backend mil-sim"
    );
    Ok(id)
}

/// Compiles per process after which AppleNeuralEngine.framework fails (facts §5.6).
pub const FRAMEWORK_COMPILE_CEILING: usize = 119;

/// Counts one compile against `limit`, or refuses it. Attempts count, not successes: the
/// ~119-compile ceiling comes from resources the compiler leaks per call (facts §5.6), and
/// failed compiles are not known to leak less. `counter` is process-wide because the ceiling
/// is. Returns the number of compiles including this one.
pub fn reserve_compile(counter: &AtomicUsize, limit: usize, kernel: &str) -> Result<usize> {
    match counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1)) {
        Ok(n) => Ok(n + 1),
        Err(n) => bail!(
            "kernel `{kernel}`: refusing to compile: this process has already compiled {n} kernels, the compile budget \
             is {limit}, and AppleNeuralEngine.framework fails after about {FRAMEWORK_COMPILE_CEILING} \
             compiles per process; compile fewer kernels per process or restart (`--resume latest` continues from the \
             last checkpoint)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(name: &str, shape: [usize; 4]) -> TensorSig {
        TensorSig { name: name.into(), shape }
    }

    fn program(inputs: Vec<TensorSig>, blobs: &[&str]) -> KernelProgram {
        KernelProgram {
            name: "k".into(),
            mil: "program(1.3)\n".into(),
            blobs: blobs.iter().map(|b| (b.to_string(), vec![1u8])).collect(),
            inputs,
            outputs: vec![sig("out", [1, 64, 1, 16])],
        }
    }

    #[test]
    fn surfaces_are_at_least_48k_and_page_multiples() {
        // 64·16 fp16 = 2 KiB → the 48 KiB floor
        assert_eq!(surface_bytes(&[sig("a", [1, 64, 1, 16])]), 49_152);
        // exactly 48 KiB + 2 bytes → next 16 KiB page: 64 KiB
        assert_eq!(surface_bytes(&[sig("a", [1, 1, 1, 24_577])]), 65_536);
        // exactly 64 KiB stays
        assert_eq!(surface_bytes(&[sig("a", [1, 2, 1, 16_384])]), 65_536);
        // the largest tensor decides for all: 768·256·2 = 393,216 = 24 pages
        let sigs = [sig("a", [1, 64, 1, 16]), sig("b", [1, 768, 1, 256]), sig("c", [1, 8, 1, 16])];
        let b = surface_bytes(&sigs);
        assert_eq!(b, 393_216);
        assert_eq!(b % 128, 0);
        assert_eq!(surface_bytes(&[]), MIN_SURFACE_BYTES);
    }

    #[test]
    fn properties_describe_one_flat_row() {
        let p = surface_properties(65_536);
        assert_eq!(
            p,
            [
                ("IOSurfaceWidth", 65_536),
                ("IOSurfaceHeight", 1),
                ("IOSurfaceBytesPerElement", 1),
                ("IOSurfaceBytesPerRow", 65_536),
                ("IOSurfaceAllocSize", 65_536),
                ("IOSurfacePixelFormat", 0),
            ]
        );
    }

    #[test]
    fn accepts_a_well_formed_program() {
        let p = program(vec![sig("a_x", [1, 64, 1, 16]), sig("b_w", [1, 64, 1, 64])], &["weights/mask.bin"]);
        check_program(&p, 4).unwrap();
    }

    #[test]
    fn rejects_inputs_out_of_alphabetical_order() {
        let p = program(vec![sig("x", [1, 64, 1, 16]), sig("w", [1, 64, 1, 16])], &[]);
        let e = check_program(&p, 1).unwrap_err().to_string();
        assert!(e.contains("`x` then `w`") && e.contains("alphabetical"), "{e}");
        // byte order: uppercase sorts before lowercase, as strcmp does
        let p = program(vec![sig("b", [1, 64, 1, 16]), sig("B", [1, 64, 1, 16])], &[]);
        assert!(check_program(&p, 1).is_err());
        let p = program(vec![sig("a", [1, 64, 1, 16]), sig("a", [1, 64, 1, 16])], &[]);
        assert!(check_program(&p, 1).is_err(), "duplicate names");
    }

    #[test]
    fn rejects_bad_shapes_slots_and_signatures() {
        let ok = vec![sig("a", [1, 64, 1, 16])];
        assert!(check_program(&program(ok.clone(), &[]), 0).unwrap_err().to_string().contains("0 slots"));
        assert!(check_program(&program(vec![sig("a", [2, 64, 1, 16])], &[]), 1).is_err());
        assert!(check_program(&program(vec![sig("a", [1, 0, 1, 16])], &[]), 1).is_err());
        let e = check_program(&program(vec![sig("a", [1, 65_537, 1, 16])], &[]), 1).unwrap_err().to_string();
        assert!(e.contains("65536"), "{e}");
        assert!(check_program(&program(vec![], &[]), 1).is_err());
        let mut p = program(ok.clone(), &[]);
        p.outputs.clear();
        assert!(check_program(&p, 1).is_err());
        let mut p = program(ok, &[]);
        p.mil = " \n".into();
        assert!(check_program(&p, 1).is_err());
    }

    #[test]
    fn rejects_escaping_reserved_and_duplicate_weight_paths() {
        let ok = || vec![sig("a", [1, 64, 1, 16])];
        for bad in ["../x.bin", "/etc/passwd", "weights/../../x", "./w.bin", "", "model.mil", ".anetrain-owner", "data"]
        {
            let e = check_program(&program(ok(), &[bad]), 1).unwrap_err();
            assert!(format!("{e:#}").contains("weight file"), "{bad}: {e:#}");
        }
        assert!(check_program(&program(ok(), &["weights/a.bin", "weights/a.bin"]), 1).is_err());
        check_program(&program(ok(), &["weights/a.bin", "weights/sub/b.bin", "c.bin"]), 1).unwrap();
    }

    #[test]
    fn model_ids_must_be_plain_names() {
        assert_eq!(check_model_id("0a1B2c_3-d").unwrap(), "0a1B2c_3-d");
        for bad in ["", "..", "a/b", "a b", "../../tmp", "x\0"] {
            assert!(check_model_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn budget_refuses_before_the_limit_is_passed() {
        let counter = AtomicUsize::new(0);
        assert_eq!(reserve_compile(&counter, 3, "a").unwrap(), 1);
        assert_eq!(reserve_compile(&counter, 3, "b").unwrap(), 2);
        assert_eq!(reserve_compile(&counter, 3, "c").unwrap(), 3);
        let e = reserve_compile(&counter, 3, "d").unwrap_err().to_string();
        assert!(e.contains("`d`") && e.contains("already compiled 3") && e.contains("--resume latest"), "{e}");
        assert_eq!(counter.load(Ordering::SeqCst), 3, "a refused compile is not counted");
        // a larger budget from another runner in the same process sees the same count
        assert_eq!(reserve_compile(&counter, 5, "e").unwrap(), 4);
    }
}
