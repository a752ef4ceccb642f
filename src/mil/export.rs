//! `anetrain mil emit`: the kernel set on disk, one directory per kernel laid out the way
//! the runtime pre-populates its model directory (`model.mil`, `weights/*.bin`), plus a
//! `manifest.json` saying where each tensor goes in each input.

use super::dialect::Dialect;
use super::emit::{InputLayout, KernelSet};
use crate::config::ModelConfig;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `manifest.json`: the kernel set's shapes and where each tensor goes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub model: String,
    pub seq: usize,
    pub padded_seq: usize,
    /// `packed` or `separate`.
    pub layout: String,
    /// `ios18` (program 1.3) or `ios16` (program 1.0); absent in manifests written before it existed
    #[serde(default)]
    pub dialect: Option<String>,
    pub element: String,
    pub classifier_chunks: Chunks,
    pub kernels: Vec<KernelEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Chunks {
    pub rows: usize,
    pub count: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KernelEntry {
    pub name: String,
    pub inputs: Vec<Signature>,
    pub outputs: Vec<OutputEntry>,
    pub pieces: Vec<PieceEntry>,
    /// Weight blob files, relative to the kernel's directory.
    pub weights: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Signature {
    pub name: String,
    pub shape: [usize; 4],
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OutputEntry {
    pub name: String,
    pub shape: [usize; 4],
    pub parts: Vec<Part>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Part {
    pub name: String,
    pub channels: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PieceEntry {
    pub name: String,
    pub input: usize,
    pub channel_offset: usize,
    pub column_offset: usize,
    pub channels: usize,
    pub width: usize,
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsio::write_atomically(path, |out| std::io::Write::write_all(out, bytes))
}

/// Writes every kernel of `cfg` at sequence length `t` under `out`, in MIL dialect
/// `dialect`; returns how many.
pub fn write_kernel_set(
    cfg: &ModelConfig,
    t: usize,
    layout: InputLayout,
    dialect: Dialect,
    out: &Path,
) -> Result<usize> {
    let set = KernelSet::new(cfg, t, layout)?;
    let mut kernels = Vec::new();
    for k in set.all().into_iter().chain([&set.classifier]) {
        let p = &super::dialect::convert(&k.program, dialect)?;
        let dir = out.join(&p.name);
        std::fs::create_dir_all(dir.join("weights")).with_context(|| format!("cannot create {}", dir.display()))?;
        write_file(&dir.join("model.mil"), p.mil.as_bytes())?;
        for (rel, bytes) in &p.blobs {
            write_file(&dir.join(rel), bytes)?;
        }
        let sig = |s: &super::TensorSig| Signature { name: s.name.clone(), shape: s.shape };
        kernels.push(KernelEntry {
            name: p.name.clone(),
            inputs: p.inputs.iter().map(sig).collect(),
            outputs: p
                .outputs
                .iter()
                .map(|s| OutputEntry {
                    name: s.name.clone(),
                    shape: s.shape,
                    parts: k.out_parts.iter().map(|(n, ch)| Part { name: n.clone(), channels: *ch }).collect(),
                })
                .collect(),
            pieces: k
                .pieces
                .iter()
                .map(|x| PieceEntry {
                    name: x.name.clone(),
                    input: x.input,
                    channel_offset: x.chan_off,
                    column_offset: x.col_off,
                    channels: x.ch,
                    width: x.width,
                })
                .collect(),
            weights: p.blobs.iter().map(|(rel, _)| rel.clone()).collect(),
        });
    }
    let manifest = Manifest {
        model: cfg.name.clone(),
        seq: t,
        padded_seq: set.dims.s,
        layout: format!("{layout:?}").to_lowercase(),
        dialect: Some(dialect.name().into()),
        element: "fp16, [1, C, 1, W], element (c, w) at c·W + w".into(),
        classifier_chunks: Chunks { rows: set.classifier_chunks.rows, count: set.classifier_chunks.count },
        kernels,
    };
    write_file(&out.join("manifest.json"), (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes())?;
    Ok(set.all().len() + 1)
}
