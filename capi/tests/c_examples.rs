//! Compiles every `examples/c/*.c` with the system C compiler against the built
//! `libanetrain_capi` and runs it: generation with a streaming callback (checked against the
//! library's own greedy decoding), training with a checkpoint the CLI reads, the Neural Engine
//! bridge on the MIL simulator (checked against a C reference), and the misuse cases.

mod common;

use common::{lib_dir, root, scratch, tiny_model};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Compiles `examples/c/<name>.c` into `out` with warnings as errors, from the repository
/// root with the README's relative `-Iinclude examples/c/<name>.c` (the examples' shared
/// `common.h` is found next to them).
fn compile(name: &str, out: &Path) -> PathBuf {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let src = format!("examples/c/{name}.c");
    let exe = out.join(name);
    let lib = lib_dir();
    let o = Command::new(&cc)
        .current_dir(root())
        .args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Iinclude"])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lanetrain_capi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lm")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` ({e}); install one (e.g. gcc) or set CC"));
    assert!(o.status.success(), "{cc} failed on {src}:\n{}", String::from_utf8_lossy(&o.stderr));
    exe
}

fn run(exe: &Path, args: &[&std::ffi::OsStr]) -> Output {
    let o = Command::new(exe).args(args).env("ANETRAIN_THREADS", "2").output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{} failed ({}):\n{out}\n{err}", exe.display(), o.status);
    o
}

#[test]
fn every_c_example_is_tested() {
    let mut names: Vec<String> = std::fs::read_dir(root().join("examples/c"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".c").map(str::to_string))
        .collect();
    names.sort();
    assert_eq!(names, ["bad_input", "bridge", "generate", "train"], "add a test for each new example");
}

/// One CHECK for all examples: `common.h` defines it, and every example that calls it includes
/// `common.h` rather than defining its own copy.
#[test]
fn the_examples_share_one_check_macro() {
    let dir = root().join("examples/c");
    let common = std::fs::read_to_string(dir.join("common.h")).unwrap();
    assert_eq!(common.matches("#define CHECK(").count(), 1);
    for name in ["bad_input", "bridge", "generate", "train"] {
        let src = std::fs::read_to_string(dir.join(format!("{name}.c"))).unwrap();
        assert!(!src.contains("#define CHECK"), "{name}.c defines its own CHECK; include \"common.h\"");
        if src.contains("CHECK(") {
            assert!(src.contains("#include \"common.h\""), "{name}.c uses CHECK without common.h");
        }
    }
}

#[test]
fn generate_streams_the_librarys_greedy_tokens() {
    let dir = scratch("c-generate");
    let exe = compile("generate", &dir);
    let model = tiny_model();
    let prompt = "Once upon a time";
    let o = run(&exe, &[model.as_os_str(), prompt.as_ref(), "12".as_ref()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("generate example: ok"), "{out}");
    let ids: Vec<u32> = out
        .lines()
        .find_map(|l| l.strip_prefix("ids:"))
        .unwrap()
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    // The same prompt through the library directly: same greedy tokens.
    let m = anetrain::checkpoint::load(model).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    // As `anetrain generate --prompt`: a model whose files declare BOS/EOS (this one declares
    // an EOS only) starts with its BOS where it asks for one, and stops at its EOS.
    assert!(m.eos.is_some() && m.bos.is_none());
    let prompt_ids = tok.encode(prompt).unwrap();
    let greedy = anetrain::generate::Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 1 };
    let mut want = Vec::new();
    anetrain::generate::generate(
        &m.cfg,
        &m.params,
        None,
        &prompt_ids,
        12,
        greedy,
        m.eos,
        anetrain::ops::Par::seq(),
        |t| want.push(t),
    )
    .unwrap();
    assert!(!want.is_empty());
    assert_eq!(ids, want, "{out}");
    assert!(out.contains("stopped after 3 tokens"), "{out}");
}

#[test]
fn train_updates_lower_the_loss_and_the_checkpoint_loads() {
    let dir = scratch("c-train");
    let exe = compile("train", &dir);
    let ckpt = dir.join("ckpt");
    let o = run(&exe, &[tiny_model().as_os_str(), ckpt.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("train example: ok"), "{out}");
    assert!(ckpt.join("latest").is_file() && ckpt.join("step-00000008/state.json").is_file(), "{out}");
    // The CLI reads it: the checkpoint carries the model's tokenizer, so a text prompt works.
    // The binary is built by the workspace's `cargo test`; alone (`-p anetrain-capi`), the
    // library's loader (what the CLI calls) stands in, unless in CI.
    // Cargo puts binaries in the profile directory (target/release), the parent of the deps
    // directory this test runs from, whichever of the two holds the library.
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let cli = profile.join(format!("anetrain{}", std::env::consts::EXE_SUFFIX));
    if cli.is_file() {
        let o = Command::new(&cli)
            .args(["generate", "--model"])
            .arg(&ckpt)
            .args(["--prompt", "Once upon a time", "--max-tokens", "8", "--threads", "2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "anetrain generate on the checkpoint failed:\n{err}");
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("Once upon a time"), "{err}");
    } else {
        assert!(std::env::var_os("CI").is_none(), "{} is missing: CI runs the workspace's tests", cli.display());
        eprintln!("note: {} is not built (run the workspace's tests); checking with the loader", cli.display());
    }
    let m = anetrain::checkpoint::load(&ckpt).unwrap();
    assert!(m.tokenizer.is_some(), "the checkpoint lost the tokenizer");
}

#[test]
fn bridge_program_matches_the_c_reference_on_the_simulator() {
    let dir = scratch("c-bridge");
    let exe = compile("bridge", &dir);
    // The default runtime: the simulator here (the Neural Engine on macOS).
    let o = run(&exe, &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("bridge example: ok"), "{out}");
    if !cfg!(target_os = "macos") {
        assert!(out.contains("runtime: MIL simulator"), "{out}");
    }
    let o = run(&exe, &["1".as_ref()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("bridge example: ok"));
}

#[test]
fn bad_input_gets_the_documented_status_and_a_message() {
    let dir = scratch("c-bad-input");
    let exe = compile("bad_input", &dir);
    let o = run(&exe, &[tiny_model().as_os_str(), dir.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("bad input example: ok") && !out.lines().any(|l| l.starts_with("FAIL")), "{out}");
    // Every case printed its line (a case that crashed would cut the output short): one per
    // `expect(` in the source, the Neural Engine one only off macOS, plus the callback's.
    let src = std::fs::read_to_string(root().join("examples/c/bad_input.c")).unwrap();
    let cases = src.matches("    expect(\"").count() - usize::from(cfg!(target_os = "macos")) + 1;
    assert_eq!(out.lines().filter(|l| l.starts_with("ok  ")).count(), cases, "{out}");
}

/// The README's C snippet compiles and links against the library as written.
#[test]
fn readme_snippet_compiles() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme.find("## C and Python").expect("README has a \"C and Python\" section");
    let block = &readme[start..];
    let code = block.split("```c\n").nth(1).and_then(|b| b.split("```").next()).expect("a ```c block");
    let dir = scratch("c-readme");
    std::fs::write(dir.join("readme.c"), code).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(dir.join("readme.c"))
        .arg("-o")
        .arg(dir.join("readme"))
        .arg("-L")
        .arg(lib_dir())
        .arg("-lanetrain_capi")
        .output()
        .unwrap();
    assert!(o.status.success(), "the README's C snippet does not compile:\n{}", String::from_utf8_lossy(&o.stderr));
}
