//! llama2.c model files (`.bin`).
//!
//! - **legacy**: 7 × i32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
//!   seq_len; a negative vocab_size means an untied classifier follows), then f32 weights:
//!   embedding, attention norms, wq, wk, wv, wo (each for all layers), ffn norms, w1, w2, w3,
//!   final norm, the RoPE cos and sin tables (`[seq_len, head_dim/2]` each), then the
//!   classifier if untied.
//! - **version 1**: magic `ak42`, i32 version = 1, the same 7 i32 (vocab positive), u8 shared
//!   classifier flag, zero padding to 256 bytes, then f32: attention norms, ffn norms, final
//!   norm, embedding, wq, wk, wv, wo, w1, w2, w3 (all layers each), classifier if not shared.
//!
//! Wq and Wk rows are stored in Meta's interleaved RoPE layout (pairs 2i, 2i+1 of each head);
//! this crate runs rotate-half (pairs i, i+D/2), so rows are permuted on import and back on
//! export. A permutation is exact, so import followed by export reproduces the file.

use crate::config::ModelConfig;
use crate::params::ParamLayout;
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

const MAGIC: u32 = 0x616b_3432;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 7-int header, RoPE tables, negative vocab for an untied classifier.
    Legacy,
    /// `ak42` magic, version 1, 256-byte header.
    V1,
}

/// A llama2.c model: config, parameters in this crate's layout, and what the file carried
/// beyond them so that an unchanged model exports byte-identically.
pub struct Llama2c {
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    pub format: Format,
    /// Legacy files store RoPE cos/sin tables; they are derived data, kept verbatim.
    pub rope_tables: Option<Vec<f32>>,
}

/// Which arena tensor each llama2.c weight block maps to, in file order.
fn blocks(layout: &ParamLayout, format: Format, shared: bool) -> Vec<Vec<usize>> {
    let l = layout.n_layers();
    let idx = |suffix: &str| -> Vec<usize> {
        (0..l)
            .map(|i| {
                let name = format!("model.layers.{i}.{suffix}");
                layout.tensors.iter().position(|t| t.name == name).expect("layer tensor")
            })
            .collect()
    };
    let (attn_norm, ffn_norm) = (idx("input_layernorm.weight"), idx("post_attention_layernorm.weight"));
    let (wq, wk, wv, wo) = (
        idx("self_attn.q_proj.weight"),
        idx("self_attn.k_proj.weight"),
        idx("self_attn.v_proj.weight"),
        idx("self_attn.o_proj.weight"),
    );
    let (w1, w2, w3) = (idx("mlp.gate_proj.weight"), idx("mlp.down_proj.weight"), idx("mlp.up_proj.weight"));
    let (embed, norm) = (vec![layout.embed], vec![layout.final_norm]);
    let mut out = match format {
        Format::Legacy => vec![embed, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, norm],
        Format::V1 => vec![attn_norm, ffn_norm, norm, embed, wq, wk, wv, wo, w1, w2, w3],
    };
    if !shared {
        out.push(vec![layout.lm_head.expect("untied classifier")]);
    }
    out
}

/// Meta interleaved → rotate-half, for a `[heads·D, C]` matrix: HF row `h·D + j·D/2 + i` is
/// Meta row `h·D + 2i + j`.
pub(crate) fn permute_rows(w: &[f32], heads: usize, d: usize, c: usize, to_meta: bool) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    let half = d / 2;
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (hf, meta) = (h * d + j * half + i, h * d + 2 * i + j);
                let (src, dst) = if to_meta { (hf, meta) } else { (meta, hf) };
                out[dst * c..(dst + 1) * c].copy_from_slice(&w[src * c..(src + 1) * c]);
            }
        }
    }
    out
}

fn read_i32s(bytes: &[u8], at: usize, n: usize) -> Vec<i32> {
    (0..n).map(|i| i32::from_le_bytes(bytes[at + 4 * i..at + 4 * i + 4].try_into().expect("4 bytes"))).collect()
}

pub fn load(path: &Path) -> Result<Llama2c> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read llama2.c model {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{} is not a valid llama2.c model file", path.display()))
}

pub fn parse(bytes: &[u8]) -> Result<Llama2c> {
    ensure!(bytes.len() >= 28, "file is {} bytes, shorter than a header", bytes.len());
    let is_v1 = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) == MAGIC;
    let (format, h, shared, data_start) = if is_v1 {
        ensure!(bytes.len() >= 256, "version-1 header is truncated");
        let version = read_i32s(bytes, 4, 1)[0];
        ensure!(version == 1, "llama2.c format version {version} is not supported (only 1 and the legacy header)");
        let h = read_i32s(bytes, 8, 7);
        (Format::V1, h, bytes[36] != 0, 256)
    } else {
        let h = read_i32s(bytes, 0, 7);
        (Format::Legacy, h.clone(), h[5] > 0, 28)
    };
    ensure!(h.iter().enumerate().all(|(i, &x)| x > 0 || (i == 5 && x < 0)), "header fields must be positive: {h:?}");
    let (dim, hidden, n_layers, n_heads, n_kv, seq) =
        (h[0] as usize, h[1] as usize, h[2] as usize, h[3] as usize, h[4] as usize, h[6] as usize);
    let vocab = h[5].unsigned_abs() as usize;
    ensure!(dim % n_heads == 0, "dim {dim} is not a multiple of n_heads {n_heads}");
    let base = ModelConfig::preset("stories260k").expect("preset");
    let cfg = ModelConfig {
        name: "llama2.c".into(),
        dim,
        ffn_dim: hidden,
        n_layers,
        n_heads,
        n_kv_heads: n_kv,
        head_dim: dim / n_heads,
        vocab_size: vocab,
        max_seq_len: seq,
        tied_embeddings: shared,
        ..base
    };
    cfg.validate()?;
    // Sizes are bounded by validate(); check the file before building anything from them.
    let table_len = if format == Format::Legacy { seq * cfg.head_dim } else { 0 };
    let want = data_start + 4 * (cfg.param_count() + table_len);
    ensure!(
        bytes.len() == want,
        "{} bytes where the header ({h:?}) implies {want}: truncated or not this format",
        bytes.len()
    );
    let layout = ParamLayout::new(&cfg);
    let floats = |at: usize, n: usize| -> Vec<f32> {
        bytes[at..at + 4 * n].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    let mut params = vec![0.0f32; layout.total];
    // Before the first write, so the pages fault in 2 MB at a time (no later copy).
    crate::memory::advise_huge_pages(&params);
    let mut at = data_start;
    let mut rope_tables = None;
    for (bi, block) in blocks(&layout, format, shared).iter().enumerate() {
        for &t in block {
            let info = &layout.tensors[t];
            params[info.range()].copy_from_slice(&floats(at, info.len()));
            at += 4 * info.len();
        }
        // Legacy: the RoPE tables sit between the final norm (block 10) and the classifier.
        if format == Format::Legacy && bi == 10 {
            rope_tables = Some(floats(at, table_len));
            at += 4 * table_len;
        }
    }
    debug_assert_eq!(at, bytes.len());
    permute_qk(&layout, &cfg, &mut params, false);
    if let Some(t) = layout.first_nonfinite(&params) {
        bail!("tensor '{}' contains NaN or Inf", t.name);
    }
    Ok(Llama2c { cfg, params, format, rope_tables })
}

fn permute_qk(layout: &ParamLayout, cfg: &ModelConfig, params: &mut [f32], to_meta: bool) {
    for l in 0..cfg.n_layers {
        for (suffix, heads) in [("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)] {
            let t = layout.find(&format!("model.layers.{l}.self_attn.{suffix}.weight")).expect("tensor");
            let permuted = permute_rows(&params[t.range()], heads, cfg.head_dim, cfg.dim, to_meta);
            params[t.range()].copy_from_slice(&permuted);
        }
    }
}

/// RoPE tables as llama2.c's legacy export computes them (f32 angles, cos then sin).
fn rope_tables(cfg: &ModelConfig) -> Vec<f32> {
    let half = cfg.head_dim / 2;
    let table = crate::ops::rope::RopeTable::new(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta);
    let mut out = table.cos;
    out.extend_from_slice(&table.sin);
    debug_assert_eq!(out.len(), cfg.max_seq_len * half * 2);
    out
}

/// Serializes in `format`. Only configs llama2.c can express are accepted.
pub fn to_bytes(model: &Llama2c) -> Result<Vec<u8>> {
    let cfg = &model.cfg;
    ensure!(!cfg.qk_norm, "llama2.c files cannot hold QK-norm weights (Qwen3); export to an HF directory instead");
    ensure!(cfg.head_dim * cfg.n_heads == cfg.dim, "llama2.c requires head_dim = dim / n_heads");
    ensure!((cfg.rope_theta - 10000.0).abs() < 1e-9, "llama2.c uses RoPE θ = 10000; this model has {}", cfg.rope_theta);
    ensure!(
        cfg.rope_scaling.is_none(),
        "llama2.c files cannot express RoPE scaling ({}); export to an HF directory or a GGUF file instead",
        cfg.rope_scaling.map_or("", |s| s.kind())
    );
    ensure!(!cfg.qkv_bias, "llama2.c files cannot hold q/k/v biases (Qwen2); export to an HF directory instead");
    ensure!(cfg.sliding_window.is_none(), "llama2.c files cannot express a sliding window; export to an HF directory");
    ensure!((cfg.norm_eps - 1e-5).abs() < 1e-12, "llama2.c uses RMSNorm eps 1e-5; this model has {}", cfg.norm_eps);
    let layout = ParamLayout::new(cfg);
    let mut params = model.params.clone();
    permute_qk(&layout, cfg, &mut params, true);
    let vocab = cfg.vocab_size as i32;
    let header = [cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads].map(|x| x as i32);
    let mut out = Vec::with_capacity(256 + 4 * params.len());
    let push_i32 = |out: &mut Vec<u8>, x: i32| out.extend_from_slice(&x.to_le_bytes());
    match model.format {
        Format::Legacy => {
            header.iter().for_each(|&x| push_i32(&mut out, x));
            push_i32(&mut out, if cfg.tied_embeddings { vocab } else { -vocab });
            push_i32(&mut out, cfg.max_seq_len as i32);
        }
        Format::V1 => {
            out.extend_from_slice(&MAGIC.to_le_bytes());
            push_i32(&mut out, 1);
            header.iter().for_each(|&x| push_i32(&mut out, x));
            push_i32(&mut out, vocab);
            push_i32(&mut out, cfg.max_seq_len as i32);
            out.push(u8::from(cfg.tied_embeddings));
            out.resize(256, 0);
        }
    }
    // Only the legacy format stores RoPE tables (seq_len × head_dim values).
    let tables = match (&model.rope_tables, model.format) {
        (_, Format::V1) => Vec::new(),
        (Some(t), Format::Legacy) if t.len() == cfg.max_seq_len * cfg.head_dim => t.clone(),
        (_, Format::Legacy) => rope_tables(cfg),
    };
    for (bi, block) in blocks(&layout, model.format, cfg.tied_embeddings).iter().enumerate() {
        for &t in block {
            params[layout.tensors[t].range()].iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        if model.format == Format::Legacy && bi == 10 {
            tables.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
    Ok(out)
}

pub fn save(path: &Path, model: &Llama2c) -> Result<()> {
    let bytes = to_bytes(model)?;
    crate::fsio::write_atomically(path, |out| std::io::Write::write_all(out, &bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_inverse_and_matches_meta_layout() {
        let (heads, d, c) = (2, 4, 3);
        let w: Vec<f32> = (0..heads * d * c).map(|i| i as f32).collect();
        let hf = permute_rows(&w, heads, d, c, false);
        // Head 0, HF row 1 (i = 1, j = 0) comes from Meta row 2.
        assert_eq!(&hf[c..2 * c], &w[2 * c..3 * c]);
        // HF row 2 (i = 0, j = 1) comes from Meta row 1.
        assert_eq!(&hf[2 * c..3 * c], &w[c..2 * c]);
        assert_eq!(permute_rows(&hf, heads, d, c, true), w);
    }

    #[test]
    fn synthetic_round_trips_in_both_formats() {
        for (format, tied) in [(Format::Legacy, true), (Format::Legacy, false), (Format::V1, true), (Format::V1, false)]
        {
            let cfg = ModelConfig {
                n_layers: 2,
                tied_embeddings: tied,
                name: "llama2.c".into(),
                ..ModelConfig::preset("stories260k").unwrap()
            };
            let params = ParamLayout::new(&cfg).init(4);
            let model = Llama2c { cfg, params, format, rope_tables: None };
            let bytes = to_bytes(&model).unwrap();
            let back = parse(&bytes).unwrap();
            assert_eq!(back.params, model.params, "{format:?} tied={tied}");
            assert_eq!(back.cfg, model.cfg);
            assert_eq!(to_bytes(&back).unwrap(), bytes);
            assert!(parse(&bytes[..bytes.len() - 4]).is_err(), "truncated file accepted");
        }
        // What the format cannot hold is refused, not silently changed.
        let base = ModelConfig { n_layers: 1, ..ModelConfig::preset("stories260k").unwrap() };
        for (cfg, needle) in [
            (ModelConfig { norm_eps: 1e-6, ..base.clone() }, "eps"),
            (ModelConfig { rope_theta: 1e6, ..base.clone() }, "θ"),
            (ModelConfig { qk_norm: true, ..base.clone() }, "QK-norm"),
            (
                ModelConfig { rope_scaling: Some(crate::config::RopeScaling::Linear { factor: 2.0 }), ..base.clone() },
                "cannot express RoPE scaling (linear)",
            ),
        ] {
            let params = ParamLayout::new(&cfg).init(1);
            let err =
                to_bytes(&Llama2c { cfg, params, format: Format::V1, rope_tables: None }).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
