//! HF model directories: `config.json` + `model.safetensors`, or a sharded
//! `model.safetensors.index.json`; `LlamaForCausalLM` and `Qwen3ForCausalLM`; fp32, fp16 and
//! bf16 tensors. Tensor names are the arena's names, which are HF's exactly.

use super::safetensors::{self, Dtype, SafeTensors};
use crate::config::ModelConfig;
use crate::params::ParamLayout;
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Reads the model's config and every parameter into a fresh arena.
pub fn load(dir: &Path) -> Result<(ModelConfig, Vec<f32>)> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        bail!("{} is not an HF model directory: it has no config.json", dir.display());
    }
    let mut cfg = ModelConfig::from_hf_json_file(&config_path)?;
    cfg.name = dir.display().to_string();
    let layout = ParamLayout::new(&cfg);
    let files = open_weight_files(dir)?;

    // Which file holds each tensor; every expected tensor must be present exactly once.
    let mut owner: BTreeMap<&str, &SafeTensors> = BTreeMap::new();
    for st in &files {
        for name in st.tensors.keys() {
            if owner.insert(name.as_str(), st).is_some() {
                bail!("tensor '{name}' appears in more than one shard of {}", dir.display());
            }
        }
    }
    let missing: Vec<&str> =
        layout.tensors.iter().map(|t| t.name.as_str()).filter(|n| !owner.contains_key(n)).collect();
    ensure!(missing.is_empty(), "{}: missing tensors: {}", dir.display(), missing.join(", "));
    let expected: BTreeSet<&str> = layout.tensors.iter().map(|t| t.name.as_str()).collect();
    let unexpected: Vec<&str> = owner
        .keys()
        .copied()
        .filter(|n| !expected.contains(n))
        // Tied checkpoints sometimes carry the shared matrix twice; RoPE buffers are derived.
        .filter(|n| {
            let duplicate_head = cfg.tied_embeddings && *n == "lm_head.weight";
            !(duplicate_head || n.ends_with("rotary_emb.inv_freq"))
        })
        .collect();
    ensure!(
        unexpected.is_empty(),
        "{}: tensors this architecture does not have: {} (biases or another variant?)",
        dir.display(),
        unexpected.join(", ")
    );

    let params = super::read_arena(&layout, "", |name| owner[name])?;
    if let Some(t) = layout.first_nonfinite(&params) {
        bail!("{}: tensor '{}' contains NaN or Inf", dir.display(), t.name);
    }
    Ok((cfg, params))
}

/// `model.safetensors.index.json`: which shard file holds each tensor.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ShardIndex {
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
    pub weight_map: BTreeMap<String, String>,
}

fn open_weight_files(dir: &Path) -> Result<Vec<SafeTensors>> {
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    ensure!(
        !(single.is_file() && index_path.is_file()),
        "{} holds both model.safetensors and model.safetensors.index.json; remove the one that is stale",
        dir.display()
    );
    if single.is_file() {
        return Ok(vec![SafeTensors::open(&single)?]);
    }
    let text = std::fs::read_to_string(&index_path).with_context(|| {
        format!("{} holds neither model.safetensors nor model.safetensors.index.json", dir.display())
    })?;
    let index: ShardIndex = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid shard index (JSON with a weight_map)", index_path.display()))?;
    let shards: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
    ensure!(!shards.is_empty(), "{}: weight_map is empty", index_path.display());
    shards
        .into_iter()
        .map(|shard| {
            ensure!(
                !shard.contains('/') && !shard.contains(".."),
                "{}: shard name '{shard}' is not a plain file name",
                index_path.display()
            );
            SafeTensors::open(&dir.join(shard))
        })
        .collect()
}

/// Writes `dir/config.json` and `dir/model.safetensors` (f32 or bf16) that transformers loads.
pub fn save(dir: &Path, cfg: &ModelConfig, params: &[f32], dtype: Dtype) -> Result<()> {
    ensure!(matches!(dtype, Dtype::F32 | Dtype::BF16), "HF export supports f32 and bf16, not {}", dtype.name());
    let layout = ParamLayout::new(cfg);
    ensure!(params.len() == layout.total, "parameter arena does not match the config");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = super::arena_tensors(&layout, params, "", dtype);
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::write(&dir.join("model.safetensors"), &tensors, &meta)?;
    let mut config = cfg.to_hf_json();
    config["torch_dtype"] = Value::from(if dtype == Dtype::BF16 { "bfloat16" } else { "float32" });
    let text = serde_json::to_string_pretty(&config)?;
    crate::fsio::write_atomically(&dir.join("config.json"), |out| std::io::Write::write_all(out, text.as_bytes()))
}

/// `tokenizer_config.json` fields this crate reads and writes (transformers' names).
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_template: Option<ChatTemplateField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bos_token: Option<TokenField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token: Option<TokenField>,
}

/// A template string, or a list of `{name, template}` (the one named `default` is used).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum ChatTemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
    /// Anything else (a null inside, a number): ignored, as transformers would fail on it.
    #[serde(skip_serializing)]
    Other(serde::de::IgnoredAny),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A token string or an `AddedToken` object with `content`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added {
        content: String,
    },
    #[serde(skip_serializing)]
    Other(serde::de::IgnoredAny),
}

impl TokenField {
    fn text(&self) -> Option<&str> {
        match self {
            TokenField::Text(s) | TokenField::Added { content: s } => Some(s),
            TokenField::Other(_) => None,
        }
    }
}

/// `config.json`'s special-token ids (either may be a list; the first is used).
#[derive(serde::Deserialize, Default)]
struct SpecialIds {
    #[serde(default)]
    bos_token_id: Option<IdField>,
    #[serde(default)]
    eos_token_id: Option<IdField>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum IdField {
    One(u64),
    List(Vec<u64>),
    Other(serde::de::IgnoredAny),
}

impl IdField {
    fn first(&self) -> Option<u64> {
        match self {
            IdField::One(x) => Some(*x),
            IdField::List(v) => v.first().copied(),
            IdField::Other(_) => None,
        }
    }
}

/// Reads `tokenizer.json` (or sentencepiece `tokenizer.model`), the chat template and the
/// special ids of an HF directory into `m`; absent files leave the fields `None`.
pub fn read_tokenizer_files(dir: &Path, m: &mut super::LoadedModel) -> Result<()> {
    for name in ["tokenizer.json", "tokenizer.model", "tokenizer.bin"] {
        if dir.join(name).is_file() {
            let tok = crate::tokenizer::Tokenizer::load(&dir.join(name))?;
            ensure!(
                tok.vocab_size() <= m.cfg.vocab_size,
                "{}: the tokenizer has {} entries, more than the model's vocabulary ({})",
                dir.display(),
                tok.vocab_size(),
                m.cfg.vocab_size
            );
            m.tokenizer = Some(tok);
            break;
        }
    }
    let id_of = |v: &IdField| -> Option<u32> {
        v.first().and_then(|x| u32::try_from(x).ok()).filter(|&x| (x as usize) < m.cfg.vocab_size)
    };
    let cfg_path = dir.join("config.json");
    if cfg_path.is_file() {
        let ids: SpecialIds = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?).unwrap_or_default();
        m.bos = ids.bos_token_id.as_ref().and_then(id_of);
        m.eos = ids.eos_token_id.as_ref().and_then(id_of);
    }
    let tc_path = dir.join("tokenizer_config.json");
    if tc_path.is_file() {
        let text = std::fs::read_to_string(&tc_path).with_context(|| format!("cannot read {}", tc_path.display()))?;
        let tc: TokenizerConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid tokenizer_config.json", tc_path.display()))?;
        m.chat_template = match tc.chat_template {
            Some(ChatTemplateField::One(s)) => Some(s),
            Some(ChatTemplateField::Named(list)) => list.into_iter().find(|t| t.name == "default").map(|t| t.template),
            _ => None,
        };
        let token_id =
            |v: &Option<TokenField>| -> Option<u32> { m.tokenizer.as_ref()?.as_hf()?.token_to_id(v.as_ref()?.text()?) };
        if let Some(id) = token_id(&tc.bos_token) {
            m.bos = Some(id);
        }
        if let Some(id) = token_id(&tc.eos_token) {
            m.eos = Some(id);
        }
    }
    Ok(())
}

/// Writes the model's tokenizer (tokenizer.json or tokenizer.model's llama2.c form) and a
/// tokenizer_config.json with its chat template and special tokens, when it has a tokenizer.
pub fn write_tokenizer_files(dir: &Path, m: &super::LoadedModel) -> Result<()> {
    let Some(tok) = &m.tokenizer else { return Ok(()) };
    tok.save_to_dir(dir)?;
    let name = |id: Option<u32>| id.and_then(|i| tok.as_hf()?.id_to_token(i)).map(TokenField::Text);
    let tc = TokenizerConfig {
        chat_template: m.chat_template.clone().map(ChatTemplateField::One),
        bos_token: name(m.bos),
        eos_token: name(m.eos),
    };
    let text = serde_json::to_string_pretty(&tc)?;
    crate::fsio::write_atomically(&dir.join("tokenizer_config.json"), |out| {
        std::io::Write::write_all(out, text.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::safetensors::TensorOut;

    #[test]
    fn save_load_round_trip_and_clear_errors() {
        let tmp_dir = tempfile::Builder::new().prefix("anetrain-hf-").tempdir().unwrap();
        let dir = tmp_dir.path().to_path_buf();
        let cfg = ModelConfig {
            n_layers: 2,
            vocab_size: 50,
            qk_norm: true,
            tied_embeddings: false,
            ..ModelConfig::preset("stories260k").unwrap()
        };
        let params = ParamLayout::new(&cfg).init(9);
        save(&dir, &cfg, &params, Dtype::F32).unwrap();
        let (cfg2, params2) = load(&dir).unwrap();
        assert_eq!(params2, params);
        assert_eq!(ModelConfig { name: cfg.name.clone(), ..cfg2 }, cfg);

        // bf16 export: every value rounds to the nearest bf16.
        save(&dir, &cfg, &params, Dtype::BF16).unwrap();
        let (_, p16) = load(&dir).unwrap();
        for (a, b) in params.iter().zip(&p16) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-8));
        }

        // The same weights split over two shards with an index load identically.
        let st = SafeTensors::open(&dir.join("model.safetensors")).unwrap();
        let mut weight_map = BTreeMap::new();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for (i, (n, info)) in st.tensors.iter().enumerate() {
            let shard =
                if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
            weight_map.insert(n.clone(), shard.into());
            let t = TensorOut {
                name: n.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: st.bytes(info).to_vec().into(),
            };
            if i % 2 == 0 { first.push(t) } else { second.push(t) }
        }
        drop(st);
        let sharded = dir.join("sharded");
        std::fs::create_dir_all(&sharded).unwrap();
        std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
        safetensors::write(&sharded.join("model-00001-of-00002.safetensors"), &first, &BTreeMap::new()).unwrap();
        safetensors::write(&sharded.join("model-00002-of-00002.safetensors"), &second, &BTreeMap::new()).unwrap();
        let index = ShardIndex { weight_map, ..Default::default() };
        std::fs::write(sharded.join("model.safetensors.index.json"), serde_json::to_string(&index).unwrap()).unwrap();
        assert_eq!(load(&sharded).unwrap().1, p16);

        // A missing tensor is named.
        let st = SafeTensors::open(&dir.join("model.safetensors")).unwrap();
        let keep: Vec<TensorOut> = st
            .tensors
            .iter()
            .filter(|(n, _)| n.as_str() != "model.layers.1.mlp.up_proj.weight")
            .map(|(n, i)| TensorOut {
                name: n.clone(),
                dtype: i.dtype,
                shape: i.shape.clone(),
                data: st.bytes(i).to_vec().into(),
            })
            .collect();
        drop(st);
        safetensors::write(&dir.join("model.safetensors"), &keep, &BTreeMap::new()).unwrap();
        let err = format!("{:#}", load(&dir).unwrap_err());
        assert!(err.contains("missing tensors: model.layers.1.mlp.up_proj.weight"), "{err}");

        // An unknown architecture is named.
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        config["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let err = format!("{:#}", load(&dir).unwrap_err());
        assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
    }
}
