//! The C ABI of anetrain (`libanetrain_capi`, header `include/anetrain.h`, generated from this
//! crate by cbindgen).
//!
//! Every object — a model, a trainer, a Neural Engine bridge, a compiled program — is an
//! opaque handle kept in a registry (`handles`), so that a freed, never-issued or wrong-kind
//! handle gets `ANETRAIN_STATUS_BAD_HANDLE`. Every pointer and length is checked (`args`),
//! every entry point runs inside `error::guard` (errors become a status code plus a
//! thread-local message, and panics are caught, never unwinding into C).
//!
//! Modules: `model` (open, tokenize, generate, loss), `train` (trainer, update, checkpoint),
//! `bridge` (MIL programs on the Neural Engine, or on the fp16 simulator off macOS).

mod args;
pub mod bridge;
pub mod error;
mod handles;
pub mod model;
pub mod train;

pub use error::AnetrainStatus;

use anetrain::ops::{GemmImpl, Par};
use std::ffi::c_char;
use std::sync::OnceLock;

/// The version of the C ABI described by this header. Compare it with
/// `anetrain_abi_version()` to detect a header and library that do not match.
pub const ANETRAIN_ABI_VERSION: u32 = 1;

/// The library's version (the anetrain crate version), e.g. "0.1.0". Static; never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// `ANETRAIN_ABI_VERSION` of the library as built.
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_abi_version() -> u32 {
    ANETRAIN_ABI_VERSION
}

/// The thread pool every computation runs in, and the parallelism it gives the ops: one
/// worker per core, or `ANETRAIN_THREADS` workers when that variable is set when the
/// library first computes.
pub(crate) fn runtime() -> error::Res<&'static (Par, rayon::ThreadPool)> {
    static POOL: OnceLock<Result<(Par, rayon::ThreadPool), String>> = OnceLock::new();
    let made = POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = match std::env::var("ANETRAIN_THREADS") {
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=4 * cores).contains(&n) => n,
                _ => return Err(format!("ANETRAIN_THREADS={v} is not a thread count in 1..={}", 4 * cores)),
            },
            Err(_) => cores,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("anetrain-{i}"))
            .build()
            .map_err(|e| format!("cannot start the thread pool: {e}"))?;
        Ok((Par { threads, gemm: GemmImpl::Gemm }, pool))
    });
    made.as_ref().map_err(|e| error::fail(AnetrainStatus::Failed, e.clone()))
}
