//! Model configuration: presets, HF `config.json` (`hf`), validation, and the derived sizes
//! (parameter count, FLOPs per token) that the rest of the crate relies on.
//!
//! Dims used throughout the crate, defined once here:
//! B batch, T positions, C model dim (`hidden_size`), H query heads, KV key/value heads,
//! D head dim, F ffn dim (`intermediate_size`), V vocabulary, L layers, N = B·T rows.

use anyhow::{Result, bail};
use std::path::Path;

mod hf;

/// Shape and hyper-parameters of a Llama-family decoder (Llama 2, llama2.c Stories, Qwen3).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Free-form label: the preset name or the file it came from.
    pub name: String,
    /// C: residual stream width (`hidden_size`).
    pub dim: usize,
    /// F: SwiGLU inner width (`intermediate_size`).
    pub ffn_dim: usize,
    /// L: decoder layers (`num_hidden_layers`).
    pub n_layers: usize,
    /// H: query heads (`num_attention_heads`).
    pub n_heads: usize,
    /// KV: key/value heads (`num_key_value_heads`); H must be a multiple of KV.
    pub n_kv_heads: usize,
    /// D: per-head width (`head_dim`); need not equal C / H (Qwen3: 128 vs 1024/16 = 64).
    pub head_dim: usize,
    /// V: vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the RoPE tables and checks allow (`max_position_embeddings`).
    pub max_seq_len: usize,
    /// RoPE base θ (`rope_theta`).
    pub rope_theta: f64,
    /// RMSNorm epsilon (`rms_norm_eps`).
    pub norm_eps: f64,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Classifier shares the embedding matrix (`tie_word_embeddings`).
    pub tied_embeddings: bool,
    /// RoPE frequency scaling (`rope_scaling` with `rope_type` `llama3` or `linear`).
    pub rope_scaling: Option<RopeScaling>,
    /// Biases on the q, k and v projections (Qwen2 / Qwen2.5; never on o_proj).
    pub qkv_bias: bool,
    /// Sliding-window attention span (Mistral, or Qwen with `use_sliding_window`): the math
    /// here is full causal attention, identical only while T ≤ this window, so longer
    /// sequences are refused (`check_seq`).
    pub sliding_window: Option<usize>,
}

/// HF `rope_scaling` kinds this crate computes exactly (see `ops::rope::inv_freq`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: llama3` (Llama 3.1 / 3.2).
    Llama3(Llama3Scaling),
    /// `rope_type: linear` (position interpolation): every frequency divided by `factor`,
    /// i.e. every position read as `pos / factor`.
    Linear { factor: f64 },
}

/// RoPE scaling kinds accepted, for errors that name them.
pub const ROPE_SCALING_KINDS: &str = "'default', 'linear' and 'llama3'";

/// Llama 3.x `rope_scaling` (`rope_type: llama3`): long wavelengths are slowed by `factor`,
/// short ones kept, the band between interpolated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// The HF `rope_type` name.
    pub fn kind(&self) -> &'static str {
        match self {
            RopeScaling::Llama3(_) => "llama3",
            RopeScaling::Linear { .. } => "linear",
        }
    }

    pub fn factor(&self) -> f64 {
        match self {
            RopeScaling::Llama3(s) => s.factor,
            RopeScaling::Linear { factor } => *factor,
        }
    }

    /// Refuses parameters transformers would refuse or compute nonsense with; `key` names
    /// the config field (`rope_scaling` or `rope_parameters`) in errors.
    pub fn check(&self, key: &str) -> Result<()> {
        let factor = self.factor();
        if !(factor.is_finite() && factor >= 1.0) {
            bail!("field '{key}.factor' ({factor}) must be a finite number >= 1");
        }
        if let RopeScaling::Llama3(s) = self {
            if !(s.low_freq_factor > 0.0 && s.high_freq_factor > s.low_freq_factor && s.high_freq_factor.is_finite()) {
                bail!(
                    "fields '{key}.low_freq_factor' ({}) and 'high_freq_factor' ({}) must satisfy 0 < low < high",
                    s.low_freq_factor,
                    s.high_freq_factor
                );
            }
            if !(1..=1 << 24).contains(&s.original_max_position_embeddings) {
                bail!(
                    "field '{key}.original_max_position_embeddings' ({}) must be a positive integer",
                    s.original_max_position_embeddings
                );
            }
        }
        Ok(())
    }
}

/// HF model classes this crate computes exactly.
pub const ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"];

/// Names accepted by `--model`, in the order `anetrain info` lists them.
pub const PRESETS: &[&str] = &[
    "stories260k",
    "stories2m",
    "stories15m",
    "stories42m",
    "stories110m",
    "qwen3-0.6b",
    "smollm2-135m",
    "tinyllama-1.1b",
    "qwen2.5-0.5b",
];

impl ModelConfig {
    /// A llama2.c "Stories" shape: MHA or GQA, tied classifier, θ 10000, eps 1e-5.
    #[allow(clippy::too_many_arguments)]
    fn stories(name: &str, c: usize, f: usize, l: usize, h: usize, kv: usize, v: usize, t: usize) -> Self {
        ModelConfig {
            name: name.to_string(),
            dim: c,
            ffn_dim: f,
            n_layers: l,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: c / h,
            vocab_size: v,
            max_seq_len: t,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            qk_norm: false,
            tied_embeddings: true,
            rope_scaling: None,
            qkv_bias: false,
            sliding_window: None,
        }
    }

    /// A Llama-architecture HF model's published shape (untied unless said).
    #[allow(clippy::too_many_arguments)]
    fn llama(name: &str, c: usize, f: usize, l: usize, h: usize, kv: usize, v: usize, t: usize, theta: f64) -> Self {
        ModelConfig { rope_theta: theta, tied_embeddings: false, ..Self::stories(name, c, f, l, h, kv, v, t) }
    }

    /// A built-in preset by name (case-insensitive), or `None`.
    pub fn preset(name: &str) -> Option<Self> {
        let cfg = match name.to_ascii_lowercase().as_str() {
            "stories260k" => Self::stories("stories260k", 64, 172, 5, 8, 4, 512, 512),
            // The default run's model: 2.16M parameters, trainable in minutes on 2 cores.
            "stories2m" => Self::stories("stories2m", 192, 512, 4, 6, 6, 2048, 256),
            "stories15m" => Self::stories("stories15m", 288, 768, 6, 6, 6, 32000, 256),
            "stories42m" => Self::stories("stories42m", 512, 1376, 8, 8, 8, 32000, 1024),
            "stories110m" => Self::stories("stories110m", 768, 2048, 12, 12, 12, 32000, 1024),
            // The published Qwen/Qwen3-0.6B config.json.
            "qwen3-0.6b" => ModelConfig {
                name: "qwen3-0.6b".into(),
                dim: 1024,
                ffn_dim: 3072,
                n_layers: 28,
                n_heads: 16,
                n_kv_heads: 8,
                head_dim: 128,
                vocab_size: 151936,
                max_seq_len: 40960,
                rope_theta: 1e6,
                norm_eps: 1e-6,
                qk_norm: true,
                tied_embeddings: true,
                rope_scaling: None,
                qkv_bias: false,
                sliding_window: None,
            },
            // The published HuggingFaceTB/SmolLM2-135M config.json.
            "smollm2-135m" => ModelConfig {
                tied_embeddings: true,
                ..Self::llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, 8192, 1e5)
            },
            // The published TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json.
            "tinyllama-1.1b" => Self::llama("tinyllama-1.1b", 2048, 5632, 22, 32, 4, 32000, 2048, 1e4),
            // The published Qwen/Qwen2.5-0.5B config.json (its sliding window is off).
            "qwen2.5-0.5b" => ModelConfig {
                norm_eps: 1e-6,
                tied_embeddings: true,
                qkv_bias: true,
                ..Self::llama("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, 32768, 1e6)
            },
            _ => return None,
        };
        Some(cfg)
    }

    /// `--model` argument: a preset name, a path to an HF-style `config.json` (or a directory
    /// holding one), or a `.gguf` file (its metadata).
    pub fn resolve(spec: &str) -> Result<Self> {
        if let Some(cfg) = Self::preset(spec) {
            return Ok(cfg);
        }
        let path = Path::new(spec);
        if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            let mut cfg = crate::checkpoint::gguf::GgufFile::open(path)?.config()?;
            cfg.name = spec.to_string();
            return Ok(cfg);
        }
        if path.is_file() {
            return Self::from_hf_json_file(path);
        }
        if path.is_dir() && path.join("config.json").is_file() {
            return Self::from_hf_json_file(&path.join("config.json"));
        }
        bail!(
            "unknown model '{spec}': expected one of {}, a path to an HF config.json or a .gguf file",
            PRESETS.join(", ")
        )
    }

    /// Refuses a sequence length this config would compute wrongly (a sliding window shorter
    /// than it) or that its positions cannot hold.
    pub fn check_seq(&self, t: usize) -> Result<()> {
        if let Some(w) = self.sliding_window
            && t > w
        {
            bail!(
                "--seq {t} is longer than this model's sliding_window ({w}); only full causal attention is \
                 implemented, so use --seq {w} or less"
            );
        }
        if t > self.max_seq_len {
            bail!("--seq {t} exceeds the model's max_position_embeddings ({})", self.max_seq_len);
        }
        Ok(())
    }

    /// Refuse combinations the math cannot run, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.dim),
            ("intermediate_size", self.ffn_dim),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_seq_len),
        ];
        for (field, value) in positive {
            if value == 0 {
                bail!("field '{field}' must be positive");
            }
            // Far beyond any model this crate can train; refusing here keeps every derived
            // size (products of these fields) from overflowing.
            if value > 1 << 24 {
                bail!("field '{field}' ({value}) is implausibly large");
            }
        }
        if self.n_layers > 4096 {
            bail!("field 'num_hidden_layers' ({}) is implausibly large", self.n_layers);
        }
        let (c, f, l, v) = (self.dim as u128, self.ffn_dim as u128, self.n_layers as u128, self.vocab_size as u128);
        let (q, kv) = ((self.n_heads * self.head_dim) as u128, (self.n_kv_heads * self.head_dim) as u128);
        let params = 2 * v * c + l * (2 * c * q + 2 * c * kv + 3 * c * f + 2 * c + 2 * self.head_dim as u128) + c;
        if params > 1 << 36 {
            bail!("this config has ~{params} parameters, beyond what this crate can hold (2^36)");
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!(
                "field 'num_key_value_heads' ({}) must divide num_attention_heads ({})",
                self.n_kv_heads,
                self.n_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("field 'head_dim' ({}) must be even for rotate-half RoPE", self.head_dim);
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            bail!("field 'rope_theta' ({}) must be a finite number > 1", self.rope_theta);
        }
        if let Some(s) = &self.rope_scaling {
            s.check("rope_scaling")?;
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            bail!("field 'rms_norm_eps' ({}) must be in (0, 1)", self.norm_eps);
        }
        if self.vocab_size > u32::MAX as usize {
            bail!("field 'vocab_size' ({}) exceeds u32 token ids", self.vocab_size);
        }
        Ok(())
    }

    /// H·D: width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// KV·D: width of the key and value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Weights of one decoder layer (matrices and norm vectors).
    pub fn layer_params(&self) -> usize {
        let (c, f) = (self.dim, self.ffn_dim);
        let attn = c * self.q_dim() * 2 + c * self.kv_dim() * 2;
        let norms = 2 * c + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let bias = if self.qkv_bias { self.q_dim() + 2 * self.kv_dim() } else { 0 };
        attn + 3 * c * f + norms + bias
    }

    /// Every trainable parameter, counting a tied embedding once.
    pub fn param_count(&self) -> usize {
        let embed = self.vocab_size * self.dim;
        let head = if self.tied_embeddings { 0 } else { embed };
        embed + self.n_layers * self.layer_params() + self.dim + head
    }

    /// Parameters that take part in a matrix product per token: every projection plus the
    /// classifier (V·C, tied or not). The embedding lookup and norms are not products.
    pub fn matmul_params(&self) -> usize {
        let (c, f) = (self.dim, self.ffn_dim);
        let layer = c * self.q_dim() * 2 + c * self.kv_dim() * 2 + 3 * c * f;
        self.n_layers * layer + self.vocab_size * c
    }

    /// Forward FLOPs per token at context length `t`: 2 per matmul weight, plus causal
    /// attention (q·kᵀ and P·v, 2·D each over on average t/2 keys, per head and layer).
    pub fn forward_flops_per_token(&self, t: usize) -> f64 {
        let matmul = 2.0 * self.matmul_params() as f64;
        let attn = 2.0 * 2.0 * (self.n_layers * self.n_heads * self.head_dim) as f64 * (t as f64 / 2.0);
        matmul + attn
    }

    /// Training (forward + backward) FLOPs per token: backward costs twice the forward.
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        3.0 * self.forward_flops_per_token(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn published_parameter_counts() {
        assert_eq!(ModelConfig::preset("stories110m").unwrap().param_count(), 109_529_856);
        assert_eq!(ModelConfig::preset("qwen3-0.6b").unwrap().param_count(), 596_049_920);
        // llama2.c's stories15M.bin is 15,191,712 parameters (tied).
        assert_eq!(ModelConfig::preset("stories15m").unwrap().param_count(), 15_191_712);
        assert_eq!(ModelConfig::preset("stories2m").unwrap().param_count(), 2_164_416);
    }

    #[test]
    fn qwen3_config_json_matches_preset() {
        let Some(path) = crate::shared_data::shared_data("data/models/qwen3-0.6b.config.json") else { return };
        let cfg = ModelConfig::from_hf_json_file(&path).unwrap();
        let mut preset = ModelConfig::preset("qwen3-0.6b").unwrap();
        preset.name = cfg.name.clone();
        assert_eq!(cfg, preset);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let base = ModelConfig::preset("stories260k").unwrap().to_hf_json();
        let cases: &[(&str, Value, &str)] = &[
            ("num_key_value_heads", Value::from(3), "num_key_value_heads"),
            ("head_dim", Value::from(7), "head_dim"),
            ("hidden_size", Value::from(0), "hidden_size"),
            ("rms_norm_eps", Value::from(-1.0), "rms_norm_eps"),
            ("hidden_act", Value::from("gelu"), "hidden_act"),
            ("vocab_size", Value::from("big"), "vocab_size"),
            ("model_type", Value::from("gpt2"), "model_type"),
        ];
        for (key, val, needle) in cases {
            let mut v = base.clone();
            v[*key] = val.clone();
            let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
            assert!(err.contains(needle), "{key}: error '{err}' does not name '{needle}'");
        }
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(err.contains("intermediate_size"), "{err}");
    }

    /// A published config as HF writes it: nulls, fields this crate ignores, and wrong types
    /// named by their path.
    #[test]
    fn published_style_config_with_nulls_and_extra_fields() {
        let v: Value = serde_json::from_str(
            r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
            "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
            "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0,
            "sliding_window": 32768, "head_dim": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}"#,
        )
        .unwrap();
        let mut cfg = ModelConfig::from_hf_json(&v).unwrap();
        cfg.name = "qwen2.5-0.5b".into();
        assert_eq!(cfg, ModelConfig::preset("qwen2.5-0.5b").unwrap());
        let mut bad = v.clone();
        bad["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": "8"});
        let err = format!("{:#}", ModelConfig::from_hf_json(&bad).unwrap_err());
        assert!(err.contains("rope_scaling.factor") && err.contains("expected f64"), "{err}");
        let mut bad = v.clone();
        bad["num_key_value_heads"] = (-2).into();
        let err = format!("{:#}", ModelConfig::from_hf_json(&bad).unwrap_err());
        assert!(err.contains("field 'num_key_value_heads'"), "{err}");
        let err = format!("{:#}", ModelConfig::from_hf_json(&Value::from(3)).unwrap_err());
        assert!(err.contains("JSON object"), "{err}");
    }

    #[test]
    fn rope_theta_from_transformers5_rope_parameters() {
        let mut v = ModelConfig::preset("qwen3-0.6b").unwrap().to_hf_json();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "default"});
        assert_eq!(ModelConfig::from_hf_json(&v).unwrap().rope_theta, 1e6);
        v["rope_parameters"]["rope_type"] = "yarn".into();
        assert!(format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err()).contains("rope_type"));
        v["rope_parameters"] = serde_json::json!({"rope_theta": 1e6});
        v["rope_theta"] = 1e4.into();
        assert!(format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err()).contains("disagree"));
    }

    #[test]
    fn hf_json_round_trip() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            let mut back = ModelConfig::from_hf_json(&cfg.to_hf_json()).unwrap();
            back.name = cfg.name.clone();
            assert_eq!(back, cfg);
        }
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_other_kinds_refused() {
        let mut v = ModelConfig::preset("stories260k").unwrap().to_hf_json();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let cfg = ModelConfig::from_hf_json(&v).unwrap();
        let want = RopeScaling::Llama3(Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        assert_eq!(cfg.rope_scaling, Some(want));
        // Written back and read again.
        assert_eq!(ModelConfig::from_hf_json(&cfg.to_hf_json()).unwrap().rope_scaling, Some(want));
        let mut bad = v.clone();
        bad["rope_scaling"]["rope_type"] = "yarn".into();
        assert!(format!("{:#}", ModelConfig::from_hf_json(&bad).unwrap_err()).contains("yarn"));
        let mut bad = v.clone();
        bad["rope_scaling"].as_object_mut().unwrap().remove("low_freq_factor");
        assert!(format!("{:#}", ModelConfig::from_hf_json(&bad).unwrap_err()).contains("low_freq_factor"));
        let mut bad = v.clone();
        bad["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert!(format!("{:#}", ModelConfig::from_hf_json(&bad).unwrap_err()).contains("disagree"));
    }

    /// `rope_type: linear` (and older files' `type: linear`, and transformers 5's
    /// `rope_parameters`) read and written back; bad factors and unsupported kinds get one
    /// sentence naming the field.
    #[test]
    fn linear_rope_scaling_is_read_and_bad_factors_refused() {
        let base = ModelConfig::preset("stories260k").unwrap().to_hf_json();
        let linear = Some(RopeScaling::Linear { factor: 2.5 });
        for (field, scaling) in [
            ("rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 2.5})),
            ("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.5})),
            ("rope_parameters", serde_json::json!({"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0})),
        ] {
            let mut v = base.clone();
            v[field] = scaling;
            let cfg = ModelConfig::from_hf_json(&v).unwrap();
            assert_eq!(cfg.rope_scaling, linear, "{field}");
            let back = cfg.to_hf_json();
            assert_eq!(back["rope_scaling"], serde_json::json!({"rope_type": "linear", "factor": 2.5}));
            assert_eq!(ModelConfig::from_hf_json(&back).unwrap().rope_scaling, linear);
        }
        let err = |scaling: Value| {
            let mut v = base.clone();
            v["rope_scaling"] = scaling;
            let e = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
            assert!(!e.contains('\n') && !e.trim_end_matches('.').contains(". "), "not one sentence: {e}");
            e
        };
        for f in [0.5, 0.0, -2.0] {
            let e = err(serde_json::json!({"rope_type": "linear", "factor": f}));
            assert!(e.contains("'rope_scaling.factor'") && e.contains("finite number >= 1"), "{e}");
        }
        assert!(err(serde_json::json!({"rope_type": "linear"})).contains("'rope_scaling.factor' is missing"));
        for kind in ["dynamic", "yarn", "longrope"] {
            let e = err(serde_json::json!({"rope_type": kind, "factor": 2.0}));
            assert!(e.contains(kind) && e.contains("'default', 'linear' and 'llama3'"), "{e}");
        }
        // Built in code rather than read: `validate` applies the same check (NaN included).
        let cfg = ModelConfig {
            rope_scaling: Some(RopeScaling::Linear { factor: f64::NAN }),
            ..ModelConfig::preset("stories260k").unwrap()
        };
        assert!(format!("{:#}", cfg.validate().unwrap_err()).contains("'rope_scaling.factor' (NaN)"));
    }

    #[test]
    fn sliding_window_shorter_than_seq_is_refused() {
        let mut v = ModelConfig::preset("stories260k").unwrap().to_hf_json();
        v["model_type"] = "mistral".into();
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        v["sliding_window"] = 64.into();
        let cfg = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(cfg.sliding_window, Some(64));
        cfg.check_seq(64).unwrap();
        let err = format!("{:#}", cfg.check_seq(65).unwrap_err());
        assert!(err.contains("sliding_window (64)") && err.contains("--seq 64"), "{err}");
        assert_eq!(ModelConfig::from_hf_json(&cfg.to_hf_json()).unwrap().sliding_window, Some(64));
        // Qwen's window counts only with use_sliding_window, and only below max_window_layers.
        let mut q = ModelConfig::preset("qwen2.5-0.5b").unwrap().to_hf_json();
        q["sliding_window"] = 32.into();
        assert_eq!(ModelConfig::from_hf_json(&q).unwrap().sliding_window, None);
        q["use_sliding_window"] = true.into();
        q["max_window_layers"] = 24.into();
        assert_eq!(ModelConfig::from_hf_json(&q).unwrap().sliding_window, None);
        q["max_window_layers"] = 21.into();
        assert_eq!(ModelConfig::from_hf_json(&q).unwrap().sliding_window, Some(32));
    }

    #[test]
    fn qwen2_has_qkv_biases_and_other_biases_are_refused() {
        let cfg = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        // Qwen2.5-0.5B's published parameter count (tied).
        assert_eq!(cfg.param_count(), 494_032_768);
        let mut v = ModelConfig::preset("stories260k").unwrap().to_hf_json();
        v["attention_bias"] = true.into();
        assert!(format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err()).contains("attention_bias"));
        assert_eq!(ModelConfig::preset("smollm2-135m").unwrap().param_count(), 134_515_008);
        assert_eq!(ModelConfig::preset("tinyllama-1.1b").unwrap().param_count(), 1_100_048_384);
    }
}
