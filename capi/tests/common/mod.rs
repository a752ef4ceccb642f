//! What the C and Python tests share: the built library, a tiny model with a tokenizer, and
//! scratch directories.

#![allow(dead_code)]

#[path = "../../../tests/common/chat_model.rs"]
pub mod chat_model;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The shared library's file name on this platform.
pub fn lib_file() -> &'static str {
    if cfg!(target_os = "macos") { "libanetrain_capi.dylib" } else { "libanetrain_capi.so" }
}

/// The directory holding the library cargo built with this test (`target/<profile>`, or
/// its `deps/`): the test binary lives in `target/<profile>/deps/`.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let profile = deps.parent().unwrap();
    for dir in [profile, deps] {
        if dir.join(lib_file()).is_file() {
            return dir.to_path_buf();
        }
    }
    panic!("{} is in neither {} nor {}: build the workspace first", lib_file(), profile.display(), deps.display());
}

/// A scratch directory unique to this process and `name`, empty.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anetrain-capi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny HF model directory (2 layers, width 32, a 320-token BPE tokenizer, random
/// weights), written once per test process.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("model");
        chat_model::write_tiny_chat_model(&dir, 32, 256, 11, true);
        dir
    })
}
