//! Static (baked-weight) kernels: a separate-layout kernel whose weight inputs become
//! BLOBFILE constants, as the original system's large-model pipeline compiled them (facts
//! §3.7). The program is rewritten, not re-emitted: each baked input keeps its MIL name, now
//! defined by a `const` at the top of the body, so every op that read the input reads the
//! constant, and the program's arithmetic is exactly the dynamic kernel's.
//!
//! A baked kernel holds one layer's weights as of its compile; `MilBackend` recompiles it
//! every `--recompile-every` updates (see its static-mode notes).

use super::ast::{Literal, Stmt, Type};
use super::blob::{CHUNK_OFFSET, blob_file};
use super::emit::{InputLayout, Kernel};
use super::parse::parse;
use anyhow::{Context, Result, ensure};
use half::f16;

/// `kernel` (separate layout) with the pieces named in `baked` turned into constants.
/// `fill(name, buf)` writes piece `name`'s values into `buf`, the fp16 buffer of its whole
/// input (`[1, ch, 1, padded width]`, zero-initialised), exactly as staging would.
pub fn bake(kernel: &Kernel, baked: &[&str], fill: &mut dyn FnMut(&str, &mut [f16])) -> Result<Kernel> {
    let name = &kernel.program.name;
    ensure!(
        kernel.pieces.iter().all(|p| p.chan_off == 0 && p.col_off == 0)
            && kernel.pieces.iter().map(|p| p.input).collect::<Vec<_>>()
                == (0..kernel.pieces.len()).collect::<Vec<_>>(),
        "kernel {name}: only a separate-layout kernel (one input per piece) can be baked"
    );
    let mut program = parse(&kernel.program.mil).with_context(|| format!("kernel {name}: re-reading its MIL"))?;
    let mut out = kernel.clone();
    out.program.name = format!("{name}_static");
    let mut consts = Vec::new();
    let mut keep = Vec::new();
    for (i, sig) in kernel.program.inputs.iter().enumerate() {
        let piece = &kernel.pieces[i];
        if !baked.contains(&piece.name.as_str()) {
            keep.push(i);
            continue;
        }
        let mut buf = vec![f16::ZERO; sig.elems()];
        fill(&piece.name, &mut buf);
        let path = format!("weights/{}.bin", sig.name);
        out.program.blobs.push((path.clone(), blob_file(&buf)));
        let ty = Type::fp16(&sig.shape);
        let lit = Literal::Blob { ty: ty.clone(), path: format!("@model_path/{path}"), offset: CHUNK_OFFSET };
        consts.push(Stmt {
            ty,
            name: sig.name.clone(),
            op: "const".into(),
            args: vec![],
            val: Some(lit),
            attrs: vec![],
        });
    }
    ensure!(
        consts.len() == baked.len(),
        "kernel {name}: asked to bake {baked:?}, but its pieces are {:?}",
        kernel.pieces.iter().map(|p| &p.name).collect::<Vec<_>>()
    );
    ensure!(!keep.is_empty(), "kernel {name}: baking every input leaves the kernel no input");
    program.func.inputs.retain(|(n, _)| !consts.iter().any(|c| &c.name == n));
    program.func.body.splice(0..0, consts);
    out.program.mil = program.text();
    out.program.inputs = keep.iter().map(|&i| kernel.program.inputs[i].clone()).collect();
    out.pieces = keep
        .iter()
        .enumerate()
        .map(|(new, &old)| super::emit::Piece { input: new, ..kernel.pieces[old].clone() })
        .collect();
    Ok(out)
}

/// Whether `layout` allows baking (the packed layout mixes weights and activations in one
/// input).
pub fn bakeable(layout: InputLayout) -> bool {
    layout == InputLayout::Separate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::mil::KernelRunner;
    use crate::mil::emit::{Dims, ffn_fwd};
    use crate::mil::sim::SimRunner;
    use crate::ops::Par;

    fn rand_fill(seed: u64) -> impl FnMut(&mut [f16]) {
        let mut rng = crate::rng::Rng::new(seed);
        move |buf: &mut [f16]| buf.iter_mut().for_each(|x| *x = f16::from_f32(rng.uniform() as f32 - 0.5))
    }

    /// A baked kernel computes bit for bit what the dynamic kernel computes with the same
    /// weights written into its inputs.
    #[test]
    fn baked_kernel_equals_the_dynamic_kernel() {
        let cfg = ModelConfig { n_layers: 1, ..ModelConfig::preset("stories260k").unwrap() };
        let dm = Dims::new(&cfg, 16).unwrap();
        let k = ffn_fwd(&dm, InputLayout::Separate).unwrap();
        let mut runner = SimRunner::new(Par::seq());
        let dynamic = runner.load(&k.program, 1).unwrap();
        let mut inputs: Vec<Vec<f16>> = k.program.inputs.iter().map(|s| vec![f16::ZERO; s.elems()]).collect();
        for (i, buf) in inputs.iter_mut().enumerate() {
            rand_fill(i as u64 + 1)(buf);
            runner.write_input(dynamic, 0, i, &mut |b| b.copy_from_slice(buf)).unwrap();
        }
        runner.eval(dynamic, 0).unwrap();
        let mut want = Vec::new();
        runner.read_output(dynamic, 0, &mut |o| want = o.to_vec()).unwrap();

        let weights = ["w1", "w3", "w2"];
        let baked = bake(&k, &weights, &mut |name, buf| {
            let i = k.piece(name).input;
            buf.copy_from_slice(&inputs[i]);
        })
        .unwrap();
        assert_eq!(baked.program.inputs.len(), 1);
        assert_eq!(baked.program.blobs.len(), k.program.blobs.len() + 3);
        parse(&baked.program.mil).unwrap();
        let id = runner.load(&baked.program, 1).unwrap();
        let xn = baked.piece("xn").input;
        runner.write_input(id, 0, xn, &mut |b| b.copy_from_slice(&inputs[0])).unwrap();
        runner.eval(id, 0).unwrap();
        let mut got = Vec::new();
        runner.read_output(id, 0, &mut |o| got = o.to_vec()).unwrap();
        assert!(want.iter().any(|x| x.to_f32() != 0.0));
        assert_eq!(got, want);
        assert_eq!(runner.compiles(), 2);

        // Packed kernels and unknown names are refused.
        let packed = ffn_fwd(&dm, InputLayout::Packed).unwrap();
        assert!(bake(&packed, &weights, &mut |_, _| {}).unwrap_err().to_string().contains("separate-layout"));
        assert!(bake(&k, &["w9"], &mut |_, _| {}).unwrap_err().to_string().contains("asked to bake"));
    }
}
