//! anetrain: train Llama-family decoder transformers with hand-written forward and backward
//! passes, on the CPU everywhere, and through generated MIL programs in an fp16 simulator or on
//! the Apple Neural Engine (that runtime is compiled and unit-tested but has not yet run on
//! Apple hardware). See docs/ARCHITECTURE.md for the map of the crate.

pub mod ane;
pub mod backend;
pub mod backends;
pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod compact;
pub mod config;
pub mod corpus;
pub mod data;
pub mod dist;
pub mod eval;
pub mod fsio;
pub mod generate;
pub mod hash;
pub mod lora;
pub mod memory;
pub mod mil;
pub mod model;
pub mod ops;
pub mod params;
pub mod plot;
pub mod prepare;
pub mod prof;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod serve;
#[cfg(test)]
#[path = "../tests/common/shared_data.rs"]
mod shared_data;
pub mod signals;
pub mod sysstat;
pub mod telemetry;
pub mod tokenizer;
pub mod train;

/// The dependency rules the module map relies on, checked on the source text: the layers
/// below must not name the layers above (a cycle would creep back in unnoticed otherwise).
#[cfg(test)]
mod layering {
    use std::path::Path;

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap().to_string_lossy().replace('\\', "/");
                // Code only: comments may name anything.
                let text = std::fs::read_to_string(&path).unwrap();
                let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
                out.push((rel, code.join("\n")));
            }
        }
    }

    #[test]
    fn lower_layers_do_not_name_upper_ones() {
        let mut files = Vec::new();
        sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        assert!(files.len() > 40, "found only {} source files", files.len());
        // (files under this prefix, must not contain this text, why)
        let rules = [
            ("src/backend/", "crate::mil", "backend construction lives in `backends`"),
            ("src/backend/", "crate::ane", "backend construction lives in `backends`"),
            ("src/mil/", "crate::ane", "`ane` builds on `mil`, not the reverse"),
            ("src/ane/layout.rs", "modeldir", "`modeldir` uses the shared path rules in `mil::rules`"),
        ];
        let mut broken = Vec::new();
        for (file, text) in &files {
            for (prefix, needle, why) in rules {
                if file.starts_with(prefix) && text.contains(needle) {
                    broken.push(format!("{file} names `{needle}` ({why})"));
                }
            }
            // The library takes plain enums; only the binary knows the command line.
            let binary = file == "src/main.rs" || file.starts_with("src/cli/");
            if !binary && text.contains(concat!("clap", "::")) {
                broken.push(format!("{file} mentions clap (the library must not depend on the command line)"));
            }
        }
        assert!(broken.is_empty(), "{broken:#?}");
    }
}
