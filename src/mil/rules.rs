//! Rules every MIL program must meet before it runs, checked the same way by the fp16
//! simulator and by the Neural Engine runtime (so a program the hardware would refuse fails
//! in CI too): the signature, the per-dimension cap, surface binding order, and weight files
//! that stay inside the model directory.

use super::KernelProgram;
use super::emit::MAX_DIM;
use anyhow::{Result, bail, ensure};
use std::collections::HashSet;
use std::path::{Component, Path};

/// The MIL text's name at the root of a model directory.
pub const MIL_FILE: &str = "model.mil";
/// The runtime's owner marker in a model directory (not read by the framework).
pub const OWNER_FILE: &str = ".anetrain-owner";
/// Root names no weight file may take: ours, and `data`, which the framework writes itself
/// next to model.mil.
const RESERVED: [&str; 3] = [MIL_FILE, OWNER_FILE, "data"];

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
    ensure!(!RESERVED.contains(&path), "the name is reserved for the runtime's own file");
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mil::TensorSig;

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
}
