//! Model and checkpoint files: safetensors, HF model directories, llama2.c files, GGUF, and
//! training checkpoints. [`load`] reads any of them into a [`LoadedModel`].

pub mod gguf;
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
    /// A GGUF file (llama.cpp).
    Gguf,
}

impl ModelFormat {
    /// A `.gguf` file is GGUF; a directory with `state.json` or `latest` (or a `latest` file) is
    /// a checkpoint, another directory an HF model; a file ending in `.bin` is llama2.c.
    pub fn of_path(path: &Path) -> Result<Self> {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            Ok(ModelFormat::Gguf)
        } else if path.join("state.json").is_file() || path.join("latest").is_file() || native::is_latest_file(path) {
            Ok(ModelFormat::Native)
        } else if path.is_dir() || path.extension().is_none() {
            Ok(ModelFormat::Hf)
        } else if path.extension().is_some_and(|e| e == "bin") {
            Ok(ModelFormat::Llama2c)
        } else {
            bail!("{}: expected an HF model directory, a llama2.c .bin file or a .gguf file", path.display())
        }
    }
}

/// A model read from disk, with what its files say about its tokenizer.
pub struct LoadedModel {
    pub cfg: ModelConfig,
    /// The parameter arena (`ParamLayout::new(&cfg)`).
    pub params: Vec<f32>,
    /// The tokenizer shipped with the model (GGUF metadata, an HF directory's tokenizer.json,
    /// a checkpoint's saved tokenizer); `None` for llama2.c files and bare weights.
    pub tokenizer: Option<crate::tokenizer::Tokenizer>,
    /// Beginning- and end-of-sequence ids the model's files declare.
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// The Jinja chat template (GGUF `tokenizer.chat_template`, HF `tokenizer_config.json`).
    pub chat_template: Option<String>,
    /// GGUF `tokenizer.ggml.pre` (the pre-tokenizer's llama.cpp name), kept for re-export.
    pub pre_tokenizer: Option<String>,
    /// Whether text starts with `bos` (GGUF `tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

impl LoadedModel {
    fn bare(cfg: ModelConfig, params: Vec<f32>) -> Self {
        LoadedModel {
            cfg,
            params,
            tokenizer: None,
            bos: None,
            eos: None,
            chat_template: None,
            pre_tokenizer: None,
            add_bos: false,
        }
    }
}

/// Loads a model — HF directory, llama2.c `.bin`, `.gguf`, or training checkpoint — with its
/// tokenizer, special ids and chat template when its files carry them.
pub fn load(path: &Path) -> Result<LoadedModel> {
    anyhow::ensure!(path.exists(), "model {} does not exist", path.display());
    match ModelFormat::of_path(path)? {
        ModelFormat::Hf => {
            let (cfg, params) = hf::load(path)?;
            let mut m = LoadedModel::bare(cfg, params);
            hf::read_tokenizer_files(path, &mut m)?;
            Ok(m)
        }
        ModelFormat::Llama2c => {
            let m = llama2c::load(path)?;
            Ok(LoadedModel::bare(m.cfg, m.params))
        }
        ModelFormat::Native => {
            let c = native::load(path)?;
            if c.lora.is_some() {
                bail!(
                    "{} holds LoRA adapters only (a PEFT adapter directory); use it with `--model BASE --lora {}`, \
                     or merge it into its base with `convert --from BASE --lora {} --to OUT`",
                    c.path.display(),
                    c.path.display(),
                    c.path.display()
                );
            }
            let mut m = LoadedModel::bare(c.cfg, c.params);
            m.tokenizer = native::saved_tokenizer(path)?;
            m.chat_template = native::saved_chat_template(path)?;
            Ok(m)
        }
        ModelFormat::Gguf => {
            let g = gguf::load(path)?;
            Ok(LoadedModel {
                cfg: g.cfg,
                params: g.params,
                tokenizer: g.tokenizer,
                bos: g.bos,
                eos: g.eos,
                chat_template: g.chat_template,
                pre_tokenizer: g.pre_tokenizer,
                add_bos: g.add_bos,
            })
        }
    }
}

/// Merges the LoRA adapters in `dir` (a PEFT adapter directory or a LoRA checkpoint) into
/// `model`'s weights, checking that they fit its shapes; prints what it merged to stderr.
pub fn apply_lora(model: &mut LoadedModel, dir: &Path) -> Result<()> {
    let layout = crate::lora::peft::merge_dir(dir, &model.cfg, &mut model.params, crate::ops::Par::seq())?;
    eprintln!(
        "merged LoRA adapters from {} (rank {}, alpha {}, {} projections per layer)",
        dir.display(),
        layout.cfg.rank,
        layout.cfg.alpha,
        layout.cfg.targets.len()
    );
    Ok(())
}

/// `load`, with the LoRA adapters in `lora` merged in when given.
pub fn load_with_lora(path: &Path, lora: Option<&Path>) -> Result<LoadedModel> {
    let mut model = load(path)?;
    if let Some(dir) = lora {
        apply_lora(&mut model, dir)?;
    }
    Ok(model)
}

/// Loads weights from an HF directory, a llama2.c file, a GGUF file or a training checkpoint.
pub fn load_model(path: &Path) -> Result<(ModelConfig, Vec<f32>)> {
    let m = load(path)?;
    Ok((m.cfg, m.params))
}

/// Element type of an exported model's matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
}

/// Converts between formats: `to` ending in `.bin` is written as llama2.c in `format`, one
/// ending in `.gguf` as GGUF (f32, f16 or q8_0), anything else as an HF directory (f32 or
/// bf16, with tokenizer.json and tokenizer_config.json when the source has a tokenizer). A
/// llama2.c source converted to its own format keeps the RoPE tables its file carried, so the
/// output is byte-identical to the input.
///
/// With `merge_lora` (a PEFT adapter directory or a LoRA checkpoint trained on `from`), the
/// adapters are merged into the weights first (`W + s·B·A`), so `to` is the fine-tuned model.
pub fn convert(
    from: &Path,
    to: &Path,
    dtype: ExportDtype,
    format: llama2c::Format,
    merge_lora: Option<&Path>,
) -> Result<ModelConfig> {
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
    let (mut model, rope_tables) = match ModelFormat::of_path(from)? {
        ModelFormat::Llama2c => {
            let m = llama2c::load(from)?;
            let tables = if m.format == format { m.rope_tables } else { None };
            (LoadedModel::bare(m.cfg, m.params), tables)
        }
        _ => (load(from)?, None),
    };
    if let Some(dir) = merge_lora {
        apply_lora(&mut model, dir)?;
    }
    let cfg = model.cfg.clone();
    if to.extension().is_some_and(|e| e == "bin") {
        llama2c::save(to, &llama2c::Llama2c { cfg: model.cfg, params: model.params, format, rope_tables })?;
    } else if to.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let ty = match dtype {
            ExportDtype::F32 => crate::quant::GgmlType::F32,
            ExportDtype::F16 => crate::quant::GgmlType::F16,
            ExportDtype::Q8_0 => crate::quant::GgmlType::Q8_0,
            ExportDtype::Bf16 => bail!("GGUF export supports --dtype f32, f16 and q8_0, not bf16"),
        };
        let extras = gguf::writer::Extras {
            tokenizer: model.tokenizer.as_ref(),
            pre_tokenizer: model.pre_tokenizer.as_deref(),
            bos: model.bos,
            eos: model.eos,
            chat_template: model.chat_template.as_deref(),
            add_bos: model.add_bos,
        };
        gguf::writer::save_model(to, &model.cfg, &model.params, ty, &extras)?;
    } else {
        let dtype = match dtype {
            ExportDtype::F32 => safetensors::Dtype::F32,
            ExportDtype::Bf16 => safetensors::Dtype::BF16,
            other => bail!("HF export supports --dtype f32 and bf16, not {other:?}"),
        };
        hf::save(to, &model.cfg, &model.params, dtype)?;
        hf::write_tokenizer_files(to, &model)?;
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
    // Before the first write, so the pages fault in 2 MB at a time (no later copy).
    crate::memory::advise_huge_pages(&buf);
    for t in &layout.tensors {
        file_of(&t.name).read_f32(&format!("{prefix}{}", t.name), &mut buf[t.range()])?;
    }
    Ok(buf)
}
