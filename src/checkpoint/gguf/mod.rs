//! GGUF model files (llama.cpp's format): import of `llama`, `qwen2` (q/k/v biases) and
//! `qwen3` models with their tokenizer and chat template, and export (`writer`).
//!
//! Tensor names map to HF's (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`);
//! shapes are stored fastest-dimension first, so a GGUF `[C, V]` is HF's `[V, C]`. llama.cpp's
//! converter stores a `llama` model's q/k rows in Meta's interleaved RoPE order; they are
//! permuted back to rotate-half here (and forth on export). `qwen2`/`qwen3` files are not
//! permuted. Llama 3 RoPE scaling travels as llama.cpp's `rope_freqs.weight` (`rope`).

pub mod reader;
pub mod rope;
pub mod tokenizer;
pub mod writer;

use crate::checkpoint::safetensors::Bytes;
use crate::config::{ModelConfig, RopeScaling};
use crate::params::ParamLayout;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use reader::{Header, TensorEntry, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Architectures whose metadata this crate maps.
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// An open GGUF file: the memory map and its checked header.
pub struct GgufFile {
    map: Bytes,
    pub header: Header,
    pub name: String,
}

/// Everything a GGUF model file holds that this crate uses.
pub struct GgufModel {
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    pub tokenizer: Option<Tokenizer>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.pre`, kept so an export writes the same pre-tokenizer name.
    pub pre_tokenizer: Option<String>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map of a file this process does not modify; a concurrent writer
        // could change the bytes under us, which the format checks cannot rule out (as for
        // every mmap'd loader in this crate).
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot mmap {}", path.display()))?;
        Self::parse(Bytes::Mapped(map), &path.display().to_string())
    }

    /// Parses a file's contents held in memory; `name` stands in for its path in messages.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes), name)
    }

    fn parse(map: Bytes, name: &str) -> Result<Self> {
        let header = reader::parse(&map).with_context(|| format!("{name} is not a valid GGUF file"))?;
        Ok(GgufFile { map, header, name: name.to_string() })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked when the header was parsed).
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.map[t.start..t.start + t.len]
    }

    /// Dequantizes a tensor into `out` (its element count).
    pub fn read_f32(&self, t: &TensorEntry, out: &mut [f32]) -> Result<()> {
        crate::quant::dequantize(t.ty, self.bytes(t), out)
            .with_context(|| format!("{}: tensor '{}'", self.name, t.name))
    }

    fn arch(&self) -> Result<&str> {
        let arch = self
            .meta("general.architecture")
            .context("metadata 'general.architecture' is missing")?
            .as_str()
            .context("metadata 'general.architecture' is not a string")?;
        ensure!(
            ARCHITECTURES.contains(&arch),
            "architecture '{arch}' is not supported (supported: {})",
            ARCHITECTURES.join(", ")
        );
        Ok(arch)
    }

    /// The model config from `<arch>.*` metadata (and the tensors, for the vocabulary and
    /// whether the classifier is tied).
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.arch()?;
        let key = |k: &str| format!("{arch}.{k}");
        let uint = |k: &str| -> Result<Option<usize>> {
            match self.meta(&key(k)) {
                None => Ok(None),
                Some(Value::Array(_)) => bail!("metadata '{}' varies per layer, which is not supported", key(k)),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .map(Some)
                    .with_context(|| format!("metadata '{}' is not a non-negative integer", key(k))),
            }
        };
        let req = |k: &str| uint(k)?.with_context(|| format!("metadata '{}' is missing", key(k)));
        let float = |k: &str| -> Result<Option<f64>> {
            match self.meta(&key(k)) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).with_context(|| format!("metadata '{}' is not a number", key(k))),
            }
        };
        let dim = req("embedding_length")?;
        let n_heads = req("attention.head_count")?;
        ensure!(n_heads > 0, "metadata '{}' is 0", key("attention.head_count"));
        let head_dim = uint("attention.key_length")?.unwrap_or(dim / n_heads);
        if let Some(v) = uint("attention.value_length")? {
            ensure!(v == head_dim, "attention.value_length ({v}) differs from key_length ({head_dim})");
        }
        if let Some(r) = uint("rope.dimension_count")? {
            ensure!(r == head_dim, "partial RoPE ({r} of {head_dim} dimensions) is not supported");
        }
        let embed = self.tensor("token_embd.weight").context("tensor 'token_embd.weight' is missing")?;
        ensure!(embed.dims.len() == 2, "tensor 'token_embd.weight' is not a matrix");
        let vocab = match uint("vocab_size")? {
            Some(v) => v,
            None => embed.dims[1] as usize,
        };
        let rope_theta = float("rope.freq_base")?.unwrap_or(10000.0);
        // llama.cpp's linear scaling: `rope.scaling.factor` (older files: `rope.scale_linear`)
        // with `rope.scaling.type` "linear" or no type; 0 and 1 mean none, and type "none"
        // switches it off whatever the factor.
        let old_name =
            self.meta(&key("rope.scaling.factor")).is_none() && self.meta(&key("rope.scale_linear")).is_some();
        let factor_key = if old_name { "rope.scale_linear" } else { "rope.scaling.factor" };
        let factor = float(factor_key)?;
        let linear = match self.meta(&key("rope.scaling.type")) {
            Some(kind) => match kind.as_str().unwrap_or("?") {
                "none" => None,
                "linear" => Some(factor.with_context(|| {
                    format!("metadata '{}' is missing, but rope.scaling.type is 'linear'", key("rope.scaling.factor"))
                })?),
                other => bail!(
                    "metadata '{}' = '{other}': this RoPE scaling is not supported (only 'none', 'linear', and Llama 3's \
                     'rope_freqs.weight' tensor)",
                    key("rope.scaling.type")
                ),
            },
            None => factor.filter(|&f| f != 0.0 && f != 1.0),
        };
        if let Some(f) = linear {
            ensure!(
                f.is_finite() && f >= 1.0,
                "metadata '{}' ({f}) must be a finite number >= 1 for linear RoPE scaling",
                key(factor_key)
            );
        }
        let rope_scaling = match self.tensor(rope::TENSOR) {
            None => linear.map(|factor| RopeScaling::Linear { factor }),
            Some(_) if linear.is_some() => bail!(
                "{}: linear RoPE scaling metadata together with Llama 3's '{}' tensor is not supported",
                self.name,
                rope::TENSOR
            ),
            Some(t) => {
                ensure!(arch == "llama", "tensor '{}' in a '{arch}' file is not supported", rope::TENSOR);
                ensure!(
                    t.dims.len() == 1 && t.numel() == (head_dim / 2) as u64,
                    "tensor '{}' has shape {:?}, but head_dim {head_dim} has {} RoPE frequencies",
                    rope::TENSOR,
                    t.shape(),
                    head_dim / 2
                );
                let mut r = vec![0.0f32; head_dim / 2];
                self.read_f32(t, &mut r)?;
                let orig = uint("rope.scaling.original_context_length")?;
                rope::recover(&r, head_dim, rope_theta, orig)
                    .with_context(|| self.name.clone())?
                    .map(RopeScaling::Llama3)
            }
        };
        let cfg = ModelConfig {
            name: String::new(),
            dim,
            ffn_dim: req("feed_forward_length")?,
            n_layers: req("block_count")?,
            n_heads,
            n_kv_heads: uint("attention.head_count_kv")?.unwrap_or(n_heads),
            head_dim,
            vocab_size: vocab,
            max_seq_len: uint("context_length")?.unwrap_or(2048),
            rope_theta,
            norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            qk_norm: arch == "qwen3",
            tied_embeddings: self.tensor("output.weight").is_none(),
            rope_scaling,
            qkv_bias: self.tensor("blk.0.attn_q.bias").is_some(),
            sliding_window: None,
        };
        cfg.validate().with_context(|| format!("{}: invalid model metadata", self.name))?;
        Ok(cfg)
    }

    /// Reads the weights of `cfg` into a fresh arena, in HF layout.
    pub fn params(&self, cfg: &ModelConfig) -> Result<Vec<f32>> {
        let arch = self.arch()?;
        let layout = ParamLayout::new(cfg);
        // Every tensor of the file must be one the layout has, with the layout's shape, before
        // the arena is allocated.
        let mut by_hf: BTreeMap<String, &TensorEntry> = BTreeMap::new();
        let mut unknown = Vec::new();
        // `rope_freqs.weight` is part of the config (`config`), not a weight.
        for t in self.header.tensors.iter().filter(|t| t.name != rope::TENSOR) {
            match hf_name(&t.name) {
                Some(n) => {
                    by_hf.insert(n, t);
                }
                None => unknown.push(t.name.as_str()),
            }
        }
        ensure!(unknown.is_empty(), "{}: tensors this crate does not know: {}", self.name, unknown.join(", "));
        let mut missing = Vec::new();
        for t in &layout.tensors {
            match by_hf.remove(&t.name) {
                None => missing.push(gguf_name(&t.name).unwrap_or_else(|| t.name.clone())),
                Some(e) => ensure!(
                    e.shape() == t.shape,
                    "{}: tensor '{}' has shape {:?}, the metadata implies {:?}",
                    self.name,
                    e.name,
                    e.shape(),
                    t.shape
                ),
            }
        }
        ensure!(missing.is_empty(), "{}: missing tensors: {}", self.name, missing.join(", "));
        let extra: Vec<&str> = by_hf.values().map(|t| t.name.as_str()).collect();
        ensure!(extra.is_empty(), "{}: tensors this architecture does not have: {}", self.name, extra.join(", "));
        let bytes = layout.total as u64 * 4;
        crate::memory::ensure_fits(
            &format!("loading {} as f32", self.name),
            bytes,
            "use a smaller model or free memory",
        )?;
        let mut params: Vec<f32> = crate::memory::try_zeroed(layout.total, "the model's f32 weights")?;
        // Before the first write, so the pages fault in 2 MB at a time (no later copy).
        crate::memory::advise_huge_pages(&params);
        for t in &layout.tensors {
            let gname = gguf_name(&t.name).expect("layout names map to GGUF names");
            let entry = self.tensor(&gname).expect("checked above");
            self.read_f32(entry, &mut params[t.range()])?;
        }
        if arch == "llama" {
            permute_qk(&layout, cfg, &mut params, false);
        }
        if let Some(t) = layout.first_nonfinite(&params) {
            bail!("{}: tensor '{}' contains NaN or Inf", self.name, t.name);
        }
        Ok(params)
    }

    fn token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => {
                let id = v.as_u64().with_context(|| format!("metadata '{key}' is not an integer"))?;
                ensure!((id as usize) < vocab, "metadata '{key}' = {id} is outside the vocabulary ({vocab})");
                Ok(Some(id as u32))
            }
        }
    }

    /// Config, weights, tokenizer, special ids and chat template.
    pub fn load(&self) -> Result<GgufModel> {
        let mut cfg = self.config()?;
        cfg.name = self.name.clone();
        let tokenizer = tokenizer::from_metadata(&self.header.metadata, cfg.vocab_size)
            .with_context(|| format!("{}: tokenizer", self.name))?;
        let params = self.params(&cfg)?;
        let text = |k: &str| -> Result<Option<String>> {
            self.meta(k)
                .map(|v| v.as_str().map(str::to_string).with_context(|| format!("metadata '{k}' is not a string")))
                .transpose()
        };
        Ok(GgufModel {
            bos: self.token_id("tokenizer.ggml.bos_token_id", cfg.vocab_size)?,
            eos: self.token_id("tokenizer.ggml.eos_token_id", cfg.vocab_size)?,
            chat_template: text("tokenizer.chat_template")?,
            pre_tokenizer: text("tokenizer.ggml.pre")?,
            add_bos: self.meta("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
            cfg,
            params,
            tokenizer,
        })
    }
}

/// Reads a GGUF model file.
pub fn load(path: &Path) -> Result<GgufModel> {
    GgufFile::open(path)?.load()
}

/// Permutes every layer's q and k rows between rotate-half (HF) and Meta's interleaved order.
pub(crate) fn permute_qk(layout: &ParamLayout, cfg: &ModelConfig, params: &mut [f32], to_meta: bool) {
    for t in &layout.tensors {
        let heads = if t.name.ends_with("q_proj.weight") {
            cfg.n_heads
        } else if t.name.ends_with("k_proj.weight") {
            cfg.n_kv_heads
        } else {
            continue;
        };
        let p = super::llama2c::permute_rows(&params[t.range()], heads, cfg.head_dim, cfg.dim, to_meta);
        params[t.range()].copy_from_slice(&p);
    }
}

/// Per-layer GGUF suffix ↔ HF suffix.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
];

const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The HF name of a GGUF tensor name, if this crate knows it.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The GGUF name of an HF tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

#[cfg(test)]
mod tests {
    use super::writer::{Extras, save_model};
    use super::*;
    use crate::quant::GgmlType;

    fn tiny(qk_norm: bool, tied: bool) -> ModelConfig {
        ModelConfig {
            // Qwen2-style biases on the untied variant without QK-norm.
            qkv_bias: !qk_norm && !tied,
            n_layers: 2,
            vocab_size: 400,
            qk_norm,
            tied_embeddings: tied,
            ..ModelConfig::preset("stories260k").unwrap()
        }
    }

    #[test]
    fn export_import_round_trip_per_dtype() {
        let dir = std::env::temp_dir().join(format!("anetrain-gguf-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let texts = crate::corpus::stories(1, 100);
        let tok = Tokenizer::train_bpe(&texts, 400).unwrap();
        for (qk_norm, tied) in [(false, true), (true, false), (false, false)] {
            let cfg = tiny(qk_norm, tied);
            let params = ParamLayout::new(&cfg).init(5);
            for (ty, tol) in [(GgmlType::F32, 0.0f32), (GgmlType::F16, 1.0 / 1024.0), (GgmlType::Q8_0, 1.0 / 127.0)] {
                let path = dir.join(format!("m-{qk_norm}-{tied}-{}.gguf", ty.name()));
                let extras = Extras {
                    tokenizer: Some(&tok),
                    chat_template: Some("{{ messages }}"),
                    eos: Some(0),
                    ..Default::default()
                };
                save_model(&path, &cfg, &params, ty, &extras).unwrap();
                let m = load(&path).unwrap();
                // GGUF holds eps and θ as f32 (llama.cpp's types), as transformers reads them.
                let expect = ModelConfig {
                    norm_eps: cfg.norm_eps as f32 as f64,
                    rope_theta: cfg.rope_theta as f32 as f64,
                    ..cfg.clone()
                };
                assert_eq!(ModelConfig { name: cfg.name.clone(), ..m.cfg.clone() }, expect);
                let layout = ParamLayout::new(&cfg);
                for t in &layout.tensors {
                    // Q8_0's error is half a step of the block's max; f16's a relative 2^-11.
                    let (a, b) = (&params[t.range()], &m.params[t.range()]);
                    let amax = a.iter().fold(0.0f32, |x, v| x.max(v.abs()));
                    for (x, y) in a.iter().zip(b) {
                        let bound = if t.shape.len() == 1 { 0.0 } else { tol * amax.max(x.abs()) };
                        assert!((x - y).abs() <= bound, "{} {}: {x} vs {y}", ty.name(), t.name);
                    }
                }
                let tok2 = m.tokenizer.as_ref().unwrap();
                let text = "Once upon a time, Lily saw 3 dogs.";
                assert_eq!(tok2.encode(text).unwrap(), tok.encode(text).unwrap());
                assert_eq!(m.chat_template.as_deref(), Some("{{ messages }}"));
                assert_eq!(m.eos, Some(0));
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_get_one_sentence_errors() {
        let cfg = tiny(false, true);
        let params = ParamLayout::new(&cfg).init(1);
        let dir = std::env::temp_dir().join(format!("anetrain-gguf-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        save_model(&path, &cfg, &params, GgmlType::F16, &Extras::default()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let err = |bytes: Vec<u8>| match GgufFile::from_bytes(bytes, "x.gguf").and_then(|f| f.load()) {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        };
        // Truncated data.
        assert!(
            err(good[..good.len() - 100].to_vec()).contains("past the end"),
            "{}",
            err(good[..good.len() - 100].to_vec())
        );
        // Absurd metadata count.
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(b).contains("metadata entries"));
        // Absurd string length (the first key's).
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err(b).contains("string length"));
        // Unknown architecture, unknown tensor type.
        let text = |b: &[u8], from: &[u8], to: &[u8]| {
            let at = b.windows(from.len()).position(|w| w == from).unwrap();
            let mut c = b.to_vec();
            c[at..at + to.len()].copy_from_slice(to);
            c
        };
        assert!(
            err(text(&good, b"\x05\0\0\0\0\0\0\0llama", b"\x05\0\0\0\0\0\0\0gpt_x")).contains("architecture 'gpt_x'")
        );
        // token_embd's type id (F16 = 1) follows its two dims.
        let mut name = b"token_embd.weight\x02\0\0\0".to_vec();
        name.extend_from_slice(&(cfg.dim as u64).to_le_bytes());
        name.extend_from_slice(&(cfg.vocab_size as u64).to_le_bytes());
        let mut bad = name.clone();
        name.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&77u32.to_le_bytes());
        assert!(err(text(&good, &name, &bad)).contains("unknown ggml tensor type 77"));
        // A tokenizer whose vocabulary is not the model's.
        let tok = Tokenizer::train_bpe(&crate::corpus::stories(1, 50), 300).unwrap();
        let extras = Extras { tokenizer: Some(&tok), ..Default::default() };
        assert!(save_model(&path, &cfg, &params, GgmlType::F16, &extras).is_err());
        let md = super::tokenizer::to_metadata(&tok, None).unwrap();
        let t = vec![super::writer::TensorOut {
            name: "token_embd.weight".into(),
            shape: vec![4, 64],
            ty: GgmlType::F32,
            data: &[0.0; 256],
        }];
        let bytes = super::writer::to_bytes(&md, &t).unwrap();
        let md = GgufFile::from_bytes(bytes, "t").unwrap().header.metadata;
        let e = match super::tokenizer::from_metadata(&md, 400) {
            Ok(_) => panic!("accepted a 300-token tokenizer for a 400-token vocabulary"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains("does not match"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tensor_names_map_both_ways() {
        for name in ParamLayout::new(&tiny(true, false)).tensors.iter().map(|t| t.name.clone()) {
            let g = gguf_name(&name).unwrap();
            assert_eq!(hf_name(&g).unwrap(), name);
        }
        assert_eq!(hf_name("blk.12.ffn_down.weight").unwrap(), "model.layers.12.mlp.down_proj.weight");
        assert!(hf_name("blk.x.ffn_down.weight").is_none());
    }
}
