//! HF `config.json` ⇄ [`ModelConfig`] through a serde-derived mirror of the fields this crate
//! reads. Unknown fields are ignored (HF configs carry many that do not change the math);
//! fields that would change it and are not implemented are refused by name. A field of the
//! wrong type is reported with its path (`serde_path_to_error`), e.g. `field 'vocab_size':
//! invalid type: string "big", expected usize`.

use super::{ARCHITECTURES, Llama3Scaling, ModelConfig, ROPE_SCALING_KINDS, RopeScaling};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The `config.json` fields read or written. `Option` fields may be absent or `null`; the
/// defaults applied when they are follow the HF class named by `model_type`.
#[derive(Debug, Default, Deserialize, Serialize)]
struct HfConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    architectures: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_key_value_heads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_position_embeddings: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rope_theta: Option<f64>,
    /// transformers 5's replacement for `rope_theta` + `rope_scaling`.
    #[serde(skip_serializing_if = "Option::is_none")]
    rope_parameters: Option<HfRope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rope_scaling: Option<HfRope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rms_norm_eps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qk_norm: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tie_word_embeddings: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attention_bias: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mlp_bias: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hidden_act: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sliding_window: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    use_sliding_window: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_window_layers: Option<usize>,
}

/// `rope_scaling` / `rope_parameters`. Older configs name the kind `type`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct HfRope {
    #[serde(skip_serializing_if = "Option::is_none")]
    rope_type: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rope_theta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    low_freq_factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    high_freq_factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    original_max_position_embeddings: Option<u64>,
}

impl HfRope {
    /// `None` for the default RoPE, the parameters for `rope_type` `linear` and `llama3`;
    /// every other kind is refused. `key` names the field in errors.
    fn scaling(&self, key: &str) -> Result<Option<RopeScaling>> {
        let kind = self.rope_type.as_deref().or(self.kind.as_deref()).unwrap_or("default");
        let need =
            |v: Option<f64>, k: &str| v.with_context(|| format!("field '{key}.{k}' is missing (rope_type {kind})"));
        let s = match kind {
            "default" => return Ok(None),
            "linear" => RopeScaling::Linear { factor: need(self.factor, "factor")? },
            "llama3" => {
                let orig = self.original_max_position_embeddings.with_context(|| {
                    format!("field '{key}.original_max_position_embeddings' is missing (rope_type llama3)")
                })?;
                RopeScaling::Llama3(Llama3Scaling {
                    factor: need(self.factor, "factor")?,
                    low_freq_factor: need(self.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(self.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: usize::try_from(orig).unwrap_or(usize::MAX),
                })
            }
            other => bail!("field '{key}.rope_type' = '{other}' is not supported (only {ROPE_SCALING_KINDS})"),
        };
        s.check(key)?;
        Ok(Some(s))
    }

    fn from_scaling(s: &RopeScaling) -> Self {
        match s {
            RopeScaling::Linear { factor } => {
                HfRope { rope_type: Some("linear".into()), factor: Some(*factor), ..HfRope::default() }
            }
            RopeScaling::Llama3(s) => HfRope {
                rope_type: Some("llama3".into()),
                factor: Some(s.factor),
                low_freq_factor: Some(s.low_freq_factor),
                high_freq_factor: Some(s.high_freq_factor),
                original_max_position_embeddings: Some(s.original_max_position_embeddings as u64),
                ..HfRope::default()
            },
        }
    }
}

impl HfConfig {
    /// RoPE θ from `rope_theta`, or from `rope_parameters.rope_theta`; 10000 when neither.
    fn rope_theta(&self) -> Result<f64> {
        let nested = self.rope_parameters.as_ref().and_then(|p| p.rope_theta);
        match (self.rope_theta, nested) {
            (Some(t), Some(n)) if t != n => {
                bail!("fields 'rope_theta' ({t}) and 'rope_parameters.rope_theta' ({n}) disagree")
            }
            (Some(v), _) | (None, Some(v)) => Ok(v),
            (None, None) => Ok(10000.0),
        }
    }

    /// The RoPE scaling of `rope_scaling` and `rope_parameters`, which must agree.
    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let a = self.rope_scaling.as_ref().map(|r| r.scaling("rope_scaling")).transpose()?.flatten();
        let b = self.rope_parameters.as_ref().map(|r| r.scaling("rope_parameters")).transpose()?.flatten();
        match (a, b) {
            (Some(a), Some(b)) if a != b => bail!("fields 'rope_scaling' and 'rope_parameters' disagree"),
            (a, b) => Ok(a.or(b)),
        }
    }
}

/// "llama" for "LlamaForCausalLM".
fn family(arch: &str) -> String {
    arch.strip_suffix("ForCausalLM").unwrap_or(arch).to_lowercase()
}

impl ModelConfig {
    pub fn from_hf_json_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let mut cfg = Self::from_hf_json(&value).with_context(|| format!("invalid model config {}", path.display()))?;
        cfg.name = path.display().to_string();
        Ok(cfg)
    }

    /// Parse HF `config.json` field names. Defaults follow the HF class named by `model_type`
    /// (`LlamaConfig` / `Qwen3Config` / `Qwen2Config` / `MistralConfig`); options this crate
    /// does not implement are refused.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        ensure!(v.is_object(), "config must be a JSON object");
        let hf: HfConfig = serde_path_to_error::deserialize(v).map_err(|e| match e.path().to_string().as_str() {
            "." => anyhow::anyhow!("{}", e.inner()),
            path => anyhow::anyhow!("field '{path}': {}", e.inner()),
        })?;
        let archs = hf.architectures.as_deref().unwrap_or_default();
        for arch in archs {
            if !ARCHITECTURES.contains(&arch.as_str()) {
                bail!("architecture '{arch}' is not supported (expected one of {})", ARCHITECTURES.join(", "));
            }
        }
        let arch_type = archs.first().map(|a| family(a));
        let model_type = hf.model_type.as_deref().or(arch_type.as_deref()).unwrap_or("llama");
        if !["llama", "qwen3", "qwen2", "mistral"].contains(&model_type) {
            bail!("model_type '{model_type}' is not supported (expected 'llama', 'qwen2', 'qwen3' or 'mistral')");
        }
        // The two fields choose different defaults and layers (QK-norm, biases): they must agree.
        for arch in archs {
            ensure!(
                family(arch) == model_type,
                "architectures names {arch} but model_type is '{model_type}'; fix whichever is wrong"
            );
        }
        // Refuse what would silently compute something else. Qwen2 always has q/k/v biases
        // (its o_proj never has one); elsewhere `attention_bias` would also bias o_proj.
        let qkv_bias = model_type == "qwen2";
        if !qkv_bias && hf.attention_bias.unwrap_or(false) {
            bail!("field 'attention_bias' = true is not supported for '{model_type}' (an o_proj bias)");
        }
        if hf.mlp_bias.unwrap_or(false) {
            bail!("field 'mlp_bias' = true is not supported");
        }
        if let Some(act) = &hf.hidden_act
            && act != "silu"
        {
            bail!("field 'hidden_act' = '{act}' is not supported (only 'silu' / SwiGLU)");
        }
        // Mistral's `sliding_window` always applies; Qwen's only with `use_sliding_window`
        // (then, in HF, to layers from `max_window_layers` on: refusing T > window whenever
        // any layer has one keeps every layer exact).
        let sliding_window = match model_type {
            "mistral" => hf.sliding_window,
            "qwen2" | "qwen3" if hf.use_sliding_window.unwrap_or(false) => match hf.max_window_layers {
                Some(m) if m >= hf.num_hidden_layers => None,
                _ => hf.sliding_window,
            },
            _ => None,
        };
        if sliding_window == Some(0) {
            bail!("field 'sliding_window' must be positive");
        }
        let (dim, n_heads) = (hf.hidden_size, hf.num_attention_heads);
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if n_heads > 0 => {
                ensure!(
                    dim.is_multiple_of(n_heads),
                    "hidden_size ({dim}) is not divisible by num_attention_heads ({n_heads}); \
                     change one, or give head_dim explicitly"
                );
                dim / n_heads
            }
            None => 0,
        };
        let cfg = ModelConfig {
            name: model_type.to_string(),
            dim,
            ffn_dim: hf.intermediate_size,
            n_layers: hf.num_hidden_layers,
            n_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(n_heads),
            head_dim,
            vocab_size: hf.vocab_size,
            max_seq_len: hf.max_position_embeddings.unwrap_or(2048),
            rope_theta: hf.rope_theta()?,
            norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            qk_norm: hf.qk_norm.unwrap_or(model_type == "qwen3"),
            tied_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            rope_scaling: hf.rope_scaling()?,
            qkv_bias,
            sliding_window,
        };
        if cfg.qk_norm && cfg.qkv_bias {
            bail!("QK-norm with q/k/v biases is not a known architecture");
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialize with HF field names (what `from_hf_json` reads back).
    pub fn to_hf_json(&self) -> Value {
        let (arch, model_type) = match (self.qk_norm, self.qkv_bias, self.sliding_window) {
            (true, _, _) => ("Qwen3ForCausalLM", "qwen3"),
            (false, true, _) => ("Qwen2ForCausalLM", "qwen2"),
            (false, false, Some(_)) => ("MistralForCausalLM", "mistral"),
            (false, false, None) => ("LlamaForCausalLM", "llama"),
        };
        let windowed_qwen = self.sliding_window.is_some() && model_type != "mistral";
        let hf = HfConfig {
            architectures: Some(vec![arch.into()]),
            model_type: Some(model_type.into()),
            hidden_size: self.dim,
            intermediate_size: self.ffn_dim,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: Some(self.n_kv_heads),
            head_dim: Some(self.head_dim),
            vocab_size: self.vocab_size,
            max_position_embeddings: Some(self.max_seq_len),
            rope_theta: Some(self.rope_theta),
            rope_parameters: None,
            rope_scaling: self.rope_scaling.as_ref().map(HfRope::from_scaling),
            rms_norm_eps: Some(self.norm_eps),
            // Implied by model_type (QK-norm is written as Qwen3).
            qk_norm: None,
            tie_word_embeddings: Some(self.tied_embeddings),
            attention_bias: (model_type != "qwen2").then_some(false),
            mlp_bias: None,
            hidden_act: Some("silu".into()),
            sliding_window: self.sliding_window,
            use_sliding_window: (windowed_qwen || model_type == "qwen2").then_some(windowed_qwen),
            max_window_layers: windowed_qwen.then_some(0),
        };
        serde_json::to_value(hf).expect("HfConfig serializes to a JSON object")
    }
}
