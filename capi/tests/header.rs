//! include/anetrain.h must be what cbindgen generates from capi/src today.

use std::path::Path;

fn generate() -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    // cbindgen follows lib.rs's `mod` declarations to every module.
    let builder = cbindgen::Builder::new().with_config(config).with_src(dir.join("src/lib.rs"));
    let mut out = Vec::new();
    builder.generate().expect("cbindgen failed on capi/src").write(&mut out);
    out
}

#[test]
fn header_matches_the_source() {
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("../include/anetrain.h");
    let want = generate();
    if std::env::var_os("ANETRAIN_UPDATE_HEADER").is_some() {
        std::fs::write(&header, &want).unwrap();
        eprintln!("wrote {}", header.display());
    }
    let have = std::fs::read(&header).unwrap_or_default();
    if have != want {
        let (have, want) = (String::from_utf8_lossy(&have), String::from_utf8_lossy(&want));
        let first = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(have.lines().count().min(want.lines().count()));
        panic!(
            "include/anetrain.h is out of date with capi/src (first difference at line {}: have {:?}, cbindgen gives {:?}).\n\
             Regenerate it with\n    ANETRAIN_UPDATE_HEADER=1 cargo test --release -p anetrain-capi --test header\nand commit it.",
            first + 1,
            have.lines().nth(first).unwrap_or("<end of file>"),
            want.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
    // The generated text carries every entry point (a cbindgen that silently skipped a module
    // would still match a header generated the same way).
    let want = String::from_utf8(want).unwrap();
    for f in [
        "anetrain_model_open",
        "anetrain_generate",
        "anetrain_trainer_update",
        "anetrain_trainer_save",
        "anetrain_bridge_compile",
        "anetrain_program_eval",
        "anetrain_last_error",
    ] {
        assert!(want.contains(&format!("{f}(")), "the header lacks {f}");
    }
}
