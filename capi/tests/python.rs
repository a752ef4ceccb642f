//! examples/python/anetrain_demo.py drives the library through ctypes (when python3 exists;
//! CI has it, so there it must run).

mod common;

use common::{lib_dir, lib_file, root, scratch, tiny_model};
use std::process::Command;

#[test]
fn python_ctypes_example_runs() {
    if Command::new("python3").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "python3 is missing; CI must run the ctypes example");
        eprintln!("note: python3 not found; skipping examples/python/anetrain_demo.py");
        return;
    }
    let dir = scratch("python");
    let o = Command::new("python3")
        .arg(root().join("examples/python/anetrain_demo.py"))
        .arg(lib_dir().join(lib_file()))
        .arg(tiny_model())
        .arg(&dir)
        .env("ANETRAIN_THREADS", "2")
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "the ctypes example failed ({}):\n{out}\n{err}", o.status);
    assert!(out.contains("python example: ok"), "{out}\n{err}");
    // Each misuse printed its status and message.
    assert_eq!(out.matches("ANETRAIN_STATUS_BAD_HANDLE: ").count(), 5, "{out}");
}
