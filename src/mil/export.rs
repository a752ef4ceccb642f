//! `anetrain mil emit`: the kernel set on disk, one directory per kernel laid out the way
//! the runtime pre-populates its model directory (`model.mil`, `weights/*.bin`), plus a
//! `manifest.json` saying where each tensor goes in each input.

use super::emit::{InputLayout, KernelSet};
use crate::config::ModelConfig;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;

/// Writes every kernel of `cfg` at sequence length `t` under `out`; returns how many.
pub fn write_kernel_set(cfg: &ModelConfig, t: usize, layout: InputLayout, out: &Path) -> Result<usize> {
    let set = KernelSet::new(cfg, t, layout)?;
    let mut kernels = Vec::new();
    for k in set.all().into_iter().chain([&set.classifier]) {
        let p = &k.program;
        let dir = out.join(&p.name);
        std::fs::create_dir_all(dir.join("weights")).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("model.mil"), &p.mil).with_context(|| format!("cannot write {}", dir.display()))?;
        for (rel, bytes) in &p.blobs {
            std::fs::write(dir.join(rel), bytes).with_context(|| format!("cannot write {}/{rel}", dir.display()))?;
        }
        kernels.push(json!({
            "name": p.name,
            "inputs": p.inputs.iter().map(|s| json!({"name": s.name, "shape": s.shape})).collect::<Vec<_>>(),
            "outputs": p.outputs.iter().map(|s| json!({
                "name": s.name,
                "shape": s.shape,
                "parts": k.out_parts.iter().map(|(n, ch)| json!({"name": n, "channels": ch})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "pieces": k.pieces.iter().map(|x| json!({
                "name": x.name, "input": x.input, "channel_offset": x.chan_off,
                "column_offset": x.col_off, "channels": x.ch, "width": x.width,
            })).collect::<Vec<_>>(),
            "weights": p.blobs.iter().map(|(rel, _)| rel).collect::<Vec<_>>(),
        }));
    }
    let manifest = json!({
        "model": cfg.name,
        "seq": t,
        "padded_seq": set.dims.s,
        "layout": format!("{layout:?}").to_lowercase(),
        "element": "fp16, [1, C, 1, W], element (c, w) at c·W + w",
        "classifier_chunks": {"rows": set.classifier_chunks.rows, "count": set.classifier_chunks.count},
        "kernels": kernels,
    });
    std::fs::write(out.join("manifest.json"), serde_json::to_string_pretty(&manifest)? + "\n")
        .with_context(|| format!("cannot write {}/manifest.json", out.display()))?;
    Ok(set.all().len() + 1)
}
