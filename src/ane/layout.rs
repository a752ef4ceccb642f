//! Pure rules the runtime applies before touching the framework: how large each IOSurface is,
//! what the surface properties say, which model identifiers it accepts, and the compile
//! budget (the rules every program must meet are `crate::mil::rules`, shared with the
//! simulator).
//! Kept apart from the FFI so that all of it is unit-tested on any machine.

use crate::mil::TensorSig;
use anyhow::{Result, bail, ensure};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Apple silicon's page size. IOSurface allocations are page-granular, so rounding a surface up
/// to it costs no memory, and every multiple of it is also a multiple of the 128 bytes that M5
/// reportedly requires (constraints §1; facts §4.7, PR#35).
pub const SURFACE_GRANULE: usize = 16 * 1024;

/// Surfaces smaller than about 48 KB are reported to misbehave (Orion #4), so none is smaller.
pub const MIN_SURFACE_BYTES: usize = 3 * SURFACE_GRANULE;

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
