//! Model and checkpoint files: safetensors, HF model directories.

pub mod hf;
pub mod llama2c;
pub mod native;
pub mod rundir;
pub mod safetensors;
pub mod state;

use crate::config::ModelConfig;
use crate::params::ParamLayout;
use anyhow::{Result, bail};
use std::path::Path;

/// What a model file or directory is, judged from its shape on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// A directory with config.json and safetensors weights.
    Hf,
    /// A llama2.c `.bin`.
    Llama2c,
    /// A training checkpoint (a step directory, or a checkpoint directory with `latest`).
    Native,
}

impl ModelFormat {
    /// A directory with `state.json` or `latest` (or a `latest` file) is a checkpoint, another directory an HF
    /// model; a file ending in `.bin` is llama2.c.
    pub fn of_path(path: &Path) -> Result<Self> {
        if path.join("state.json").is_file() || path.join("latest").is_file() || native::is_latest_file(path) {
            Ok(ModelFormat::Native)
        } else if path.is_dir() || path.extension().is_none() {
            Ok(ModelFormat::Hf)
        } else if path.extension().is_some_and(|e| e == "bin") {
            Ok(ModelFormat::Llama2c)
        } else {
            bail!("{}: expected an HF model directory or a llama2.c .bin file", path.display())
        }
    }
}

/// Loads weights from an HF directory, a llama2.c file or a training checkpoint.
pub fn load_model(path: &Path) -> Result<(ModelConfig, Vec<f32>)> {
    anyhow::ensure!(path.exists(), "model {} does not exist", path.display());
    match ModelFormat::of_path(path)? {
        ModelFormat::Hf => hf::load(path),
        ModelFormat::Llama2c => {
            let m = llama2c::load(path)?;
            Ok((m.cfg, m.params))
        }
        ModelFormat::Native => {
            let c = native::load(path)?;
            Ok((c.cfg, c.params))
        }
    }
}

/// Converts between formats: `to` ending in `.bin` is written as llama2.c in `format`, anything
/// else as an HF directory in `dtype`. A llama2.c source converted to its own format keeps the
/// RoPE tables its file carried, so the output is byte-identical to the input.
pub fn convert(from: &Path, to: &Path, dtype: safetensors::Dtype, format: llama2c::Format) -> Result<ModelConfig> {
    // Writing into a training checkpoint would replace its weights under its state.
    let inside = [Some(to), to.parent()]
        .into_iter()
        .flatten()
        .find(|d| ModelFormat::of_path(d).ok() == Some(ModelFormat::Native));
    if let Some(ckpt) = inside {
        bail!(
            "--to {} is inside the training checkpoint {}; convert writes a new model, choose a path outside it",
            to.display(),
            ckpt.display()
        );
    }
    let (cfg, params, rope_tables) = match ModelFormat::of_path(from)? {
        ModelFormat::Llama2c => {
            let m = llama2c::load(from)?;
            let tables = if m.format == format { m.rope_tables } else { None };
            (m.cfg, m.params, tables)
        }
        ModelFormat::Hf | ModelFormat::Native => {
            let (cfg, params) = load_model(from)?;
            (cfg, params, None)
        }
    };
    if to.extension().is_some_and(|e| e == "bin") {
        llama2c::save(to, &llama2c::Llama2c { cfg: cfg.clone(), params, format, rope_tables })?;
    } else {
        hf::save(to, &cfg, &params, dtype)?;
    }
    Ok(cfg)
}

/// Every tensor of an arena as safetensors output, named `<prefix><HF name>`, encoded to
/// `dtype` while it is written.
pub fn arena_tensors<'a>(
    layout: &ParamLayout,
    buf: &'a [f32],
    prefix: &str,
    dtype: safetensors::Dtype,
) -> Vec<safetensors::TensorOut<'a>> {
    layout
        .tensors
        .iter()
        .map(|t| safetensors::TensorOut {
            name: format!("{prefix}{}", t.name),
            dtype,
            shape: t.shape.clone(),
            data: safetensors::TensorData::F32(&buf[t.range()]),
        })
        .collect()
}

/// Reads an arena of `layout` from safetensors: tensor `<prefix><name>` from the file `file_of`
/// names for it. Every shape is checked before the arena is allocated, so a config that claims
/// a huge model is refused by its files, not by the allocator.
pub fn read_arena<'a>(
    layout: &ParamLayout,
    prefix: &str,
    file_of: impl Fn(&str) -> &'a safetensors::SafeTensors,
) -> Result<Vec<f32>> {
    for t in &layout.tensors {
        let st = file_of(&t.name);
        let info = st.info(&format!("{prefix}{}", t.name))?;
        anyhow::ensure!(
            info.shape == t.shape,
            "{}: '{prefix}{}' has shape {:?}, the config implies {:?}",
            st.path.display(),
            t.name,
            info.shape,
            t.shape
        );
    }
    let mut buf = vec![0.0f32; layout.total];
    for t in &layout.tensors {
        file_of(&t.name).read_f32(&format!("{prefix}{}", t.name), &mut buf[t.range()])?;
    }
    Ok(buf)
}
