//! GGUF export (version 3): metadata llama.cpp and transformers read, the tokenizer and chat
//! template when known, tensors in F32, F16 or Q8_0 (norm vectors always F32, as llama.cpp
//! keeps them; a Q8_0 matrix whose rows are not a multiple of 32 falls back to F16), and Llama
//! 3 RoPE scaling as llama.cpp's `rope_freqs.weight` (`super::rope`).

use super::reader::Value;
use crate::config::{ModelConfig, RopeScaling};
use crate::params::ParamLayout;
use crate::quant::GgmlType;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, ensure};
use std::io::Write;
use std::path::Path;

const ALIGNMENT: usize = 32;

/// A tensor to write: row-major `shape` (slowest first, as in PyTorch), f32 values encoded as
/// `ty` while written.
pub struct TensorOut<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: &'a [f32],
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array's element type is irrelevant; use u8.
            let elem = items.first().map_or(0, Value::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// The header (through the padding before the data section) and each tensor's data offset.
fn header(metadata: &[(String, Value)], tensors: &[TensorOut]) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64 + 1).to_le_bytes());
    put_str(&mut out, "general.alignment");
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&(ALIGNMENT as u32).to_le_bytes());
    for (k, v) in metadata {
        ensure!(k != "general.alignment", "general.alignment is written by the writer");
        if let Value::Array(items) = v {
            ensure!(items.iter().all(|i| i.type_id() == items[0].type_id()), "metadata '{k}' mixes value types");
        }
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        ensure!(numel == t.data.len(), "tensor '{}': shape {:?} but {} values", t.name, t.shape, t.data.len());
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.ty.bytes_for(numel as u64)? as usize).next_multiple_of(ALIGNMENT);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    Ok((out, offsets))
}

/// Streams the header then each tensor, encoded one at a time (no whole-file buffer).
fn write_to(out: &mut impl Write, metadata: &[(String, Value)], tensors: &[TensorOut]) -> Result<()> {
    let (head, offsets) = header(metadata, tensors)?;
    out.write_all(&head)?;
    let mut written = 0usize;
    let mut buf = Vec::new();
    for (t, &offset) in tensors.iter().zip(&offsets) {
        out.write_all(&vec![0u8; offset - written])?;
        buf.clear();
        crate::quant::quantize(t.ty, t.data, &mut buf).with_context(|| format!("tensor '{}'", t.name))?;
        out.write_all(&buf)?;
        written = offset + buf.len();
    }
    Ok(())
}

/// A whole GGUF file in memory (tests, fuzz seeds).
pub fn to_bytes(metadata: &[(String, Value)], tensors: &[TensorOut]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_to(&mut out, metadata, tensors)?;
    Ok(out)
}

/// Writes a GGUF file atomically (temporary file, fsync, rename).
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[TensorOut]) -> Result<()> {
    header(metadata, tensors)?;
    let mut result = Ok(());
    crate::fsio::write_atomically(path, |out| {
        result = write_to(out, metadata, tensors);
        result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(format!("{e:#}")))
    })?;
    result
}

/// What goes into an exported model file besides the weights.
#[derive(Default)]
pub struct Extras<'a> {
    pub tokenizer: Option<&'a Tokenizer>,
    pub pre_tokenizer: Option<&'a str>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub chat_template: Option<&'a str>,
    pub add_bos: bool,
}

/// Writes `params` of `cfg` as a GGUF model file, matrices as `dtype` (F32, F16 or Q8_0).
pub fn save_model(path: &Path, cfg: &ModelConfig, params: &[f32], dtype: GgmlType, extras: &Extras) -> Result<()> {
    ensure!(
        matches!(dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0),
        "GGUF export supports f32, f16 and q8_0, not {}",
        dtype.name()
    );
    let layout = ParamLayout::new(cfg);
    ensure!(params.len() == layout.total, "parameter arena does not match the config");
    ensure!(cfg.sliding_window.is_none(), "GGUF export of sliding-window attention is not supported");
    ensure!(!(cfg.qk_norm && cfg.qkv_bias), "no GGUF architecture has both QK-norm and q/k/v biases");
    let arch = match (cfg.qk_norm, cfg.qkv_bias) {
        (true, _) => "qwen3",
        (false, true) => "qwen2",
        (false, false) => "llama",
    };
    // llama.cpp's llama graph expects q/k rows in Meta's interleaved order.
    let permuted;
    let params = if arch == "llama" {
        let mut p = Vec::new();
        p.try_reserve_exact(params.len()).context("not enough memory for a permuted copy of the weights")?;
        p.extend_from_slice(params);
        super::permute_qk(&layout, cfg, &mut p, true);
        permuted = p;
        &permuted[..]
    } else {
        params
    };
    let llama3 = match &cfg.rope_scaling {
        Some(RopeScaling::Llama3(s)) => Some(s),
        _ => None,
    };
    ensure!(
        llama3.is_none() || arch == "llama",
        "GGUF export of Llama 3 RoPE scaling needs the llama architecture (no QK-norm, no q/k/v biases)"
    );
    let mut tensors = Vec::with_capacity(layout.tensors.len() + 1);
    // llama.cpp's form of Llama 3 scaling: per-frequency divisors, which the importer turns
    // back into these parameters (checked here, so every export reads back as this config).
    let divisors = llama3.map(|s| super::rope::divisors(cfg.head_dim, cfg.rope_theta, s));
    if let (Some(s), Some(r)) = (llama3, &divisors) {
        let back = super::rope::recover(
            r,
            cfg.head_dim,
            cfg.rope_theta as f32 as f64,
            Some(s.original_max_position_embeddings),
        );
        ensure!(
            matches!(back, Ok(Some(b)) if b == *s),
            "the Llama 3 RoPE scaling {s:?} cannot be written as GGUF divisors that read back as the same parameters"
        );
        tensors.push(TensorOut { name: super::rope::TENSOR.into(), shape: vec![r.len()], ty: GgmlType::F32, data: r });
    }
    for t in &layout.tensors {
        let name = super::gguf_name(&t.name).with_context(|| format!("no GGUF name for '{}'", t.name))?;
        let ty = if t.shape.len() == 1 {
            GgmlType::F32
        } else if dtype == GgmlType::Q8_0 && !t.shape[t.shape.len() - 1].is_multiple_of(32) {
            GgmlType::F16
        } else {
            dtype
        };
        tensors.push(TensorOut { name, shape: t.shape.clone(), ty, data: &params[t.range()] });
    }
    let md = model_metadata(cfg, arch, dtype, extras)?;
    write(path, &md, &tensors)
}

fn model_metadata(cfg: &ModelConfig, arch: &str, dtype: GgmlType, extras: &Extras) -> Result<Vec<(String, Value)>> {
    let u = |x: usize| Value::U32(x as u32);
    let name = Path::new(&cfg.name).file_stem().and_then(|s| s.to_str()).unwrap_or("anetrain").to_string();
    let file_type = match dtype {
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 7,
        _ => 0,
    };
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str(name)),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let k = |s: &str| format!("{arch}.{s}");
    md.extend([
        (k("context_length"), u(cfg.max_seq_len)),
        (k("embedding_length"), u(cfg.dim)),
        (k("block_count"), u(cfg.n_layers)),
        (k("feed_forward_length"), u(cfg.ffn_dim)),
        (k("attention.head_count"), u(cfg.n_heads)),
        (k("attention.head_count_kv"), u(cfg.n_kv_heads)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("attention.value_length"), u(cfg.head_dim)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.norm_eps as f32)),
        (k("vocab_size"), u(cfg.vocab_size)),
    ]);
    match &cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Llama3(s)) => {
            // llama.cpp's own key (used there only by YaRN); it pins the band when the divisors
            // alone cannot (`rope::recover`).
            md.push((k("rope.scaling.original_context_length"), u(s.original_max_position_embeddings)));
        }
        // GGUF holds the factor as f32, the type the forward pass divides by (`inv_freq`), so
        // the tables read back bit for bit.
        Some(RopeScaling::Linear { factor }) => md.extend([
            (k("rope.scaling.type"), Value::Str("linear".into())),
            (k("rope.scaling.factor"), Value::F32(*factor as f32)),
        ]),
    }
    if let Some(tok) = extras.tokenizer {
        ensure!(
            tok.vocab_size() == cfg.vocab_size,
            "the tokenizer has {} entries but the model's vocabulary is {}",
            tok.vocab_size(),
            cfg.vocab_size
        );
        md.extend(super::tokenizer::to_metadata(tok, extras.pre_tokenizer)?);
    }
    let have = |key: &str, md: &[(String, Value)]| md.iter().any(|(k, _)| k == key);
    if let Some(b) = extras.bos
        && !have("tokenizer.ggml.bos_token_id", &md)
    {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = extras.eos
        && !have("tokenizer.ggml.eos_token_id", &md)
    {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if extras.tokenizer.is_some() {
        md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(extras.add_bos)));
    }
    if let Some(t) = extras.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::Str(t.into())));
    }
    Ok(md)
}
