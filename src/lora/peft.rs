//! HF PEFT adapter directories: `adapter_config.json` and `adapter_model.safetensors` with
//! PEFT's key names, read and written so that `peft.PeftModel.from_pretrained(base, dir)`
//! loads what anetrain trained (tools/check_peft_export.py checks the logits).

use super::{LoraConfig, LoraLayout, Target};
use crate::checkpoint::safetensors::{self, Dtype, SafeTensors, TensorData, TensorOut};
use crate::config::ModelConfig;
use crate::params::{ParamLayout, TensorInfo};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The fields of PEFT's `LoraConfig` this crate writes and checks (others are ignored on read).
#[derive(Debug, Serialize, Deserialize)]
struct AdapterConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: Value,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default = "bias_none")]
    bias: String,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    layers_to_transform: Option<Value>,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

fn bias_none() -> String {
    "none".into()
}

/// Safetensors tensors of an arena described by `tensors`.
pub fn tensors_out<'a>(tensors: &[TensorInfo], buf: &'a [f32], prefix: &str) -> Vec<TensorOut<'a>> {
    tensors
        .iter()
        .map(|t| TensorOut {
            name: format!("{prefix}{}", t.name),
            dtype: Dtype::F32,
            shape: t.shape.clone(),
            data: TensorData::F32(&buf[t.range()]),
        })
        .collect()
}

/// Reads an arena of `total` values described by `tensors` from `st` (`<prefix><name>`),
/// checking every shape first and refusing NaN or Inf.
pub fn read_tensors(st: &SafeTensors, tensors: &[TensorInfo], total: usize, prefix: &str) -> Result<Vec<f32>> {
    for t in tensors {
        let info = st.info(&format!("{prefix}{}", t.name))?;
        ensure!(
            info.shape == t.shape,
            "{}: '{prefix}{}' has shape {:?}, expected {:?}",
            st.path.display(),
            t.name,
            info.shape,
            t.shape
        );
    }
    let mut buf = vec![0.0f32; total];
    for t in tensors {
        st.read_f32(&format!("{prefix}{}", t.name), &mut buf[t.range()])?;
        ensure!(
            buf[t.range()].iter().all(|x| x.is_finite()),
            "{}: '{prefix}{}' contains NaN or Inf",
            st.path.display(),
            t.name
        );
    }
    Ok(buf)
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (each atomically).
pub fn save(dir: &Path, layout: &LoraLayout, adapters: &[f32], base_name: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create adapter directory {}", dir.display()))?;
    let cfg = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        r: layout.cfg.rank,
        lora_alpha: layout.cfg.alpha,
        target_modules: Value::from(layout.cfg.targets.iter().map(|t| t.module()).collect::<Vec<_>>()),
        lora_dropout: 0.0,
        bias: "none".into(),
        use_rslora: false,
        use_dora: false,
        fan_in_fan_out: false,
        base_model_name_or_path: Some(base_name.into()),
        inference_mode: true,
        layers_to_transform: None,
        rank_pattern: Some(BTreeMap::new()),
        alpha_pattern: Some(BTreeMap::new()),
        modules_to_save: None,
    };
    let text = serde_json::to_string_pretty(&cfg)?;
    safetensors::write_atomically(&dir.join("adapter_config.json"), |out| {
        std::io::Write::write_all(out, text.as_bytes())
    })?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::write(&dir.join("adapter_model.safetensors"), &tensors_out(&layout.tensors, adapters, ""), &meta)
}

/// Reads a PEFT LoRA adapter directory for a base model of `model`; returns its layout and
/// the adapter arena. Variants this crate does not compute (DoRA, rsLoRA, per-module ranks,
/// biases, layer subsets, extra trained modules) are refused by name.
pub fn load(dir: &Path, model: &ModelConfig, base: &ParamLayout) -> Result<(LoraLayout, Vec<f32>)> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: AdapterConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is not a PEFT adapter config", path.display()))?;
    let unsupported = [
        (cfg.peft_type != "LORA", "peft_type is not LORA"),
        (cfg.use_dora, "use_dora"),
        (cfg.use_rslora, "use_rslora"),
        (cfg.fan_in_fan_out, "fan_in_fan_out"),
        (cfg.bias != "none", "bias other than 'none'"),
        (cfg.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()), "layers_to_transform"),
        (cfg.rank_pattern.as_ref().is_some_and(|m| !m.is_empty()), "rank_pattern"),
        (cfg.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty()), "alpha_pattern"),
        (cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()), "modules_to_save"),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(bad, _)| *bad) {
        bail!("{}: {what} is not supported (plain LoRA adapters only)", path.display());
    }
    let Some(modules) = cfg.target_modules.as_array() else {
        bail!("{}: target_modules must be a list of module names", path.display());
    };
    let names: Vec<&str> = modules.iter().filter_map(Value::as_str).collect();
    ensure!(names.len() == modules.len(), "{}: target_modules must be strings", path.display());
    let targets: Vec<Target> = Target::parse_list(&names.join(",")).with_context(|| format!("{}", path.display()))?;
    let lora = LoraConfig { rank: cfg.r, alpha: cfg.lora_alpha, targets };
    let layout = LoraLayout::new(model, base, &lora).with_context(|| format!("{}", path.display()))?;
    let st = SafeTensors::open(&dir.join("adapter_model.safetensors"))?;
    let extra: Vec<&String> = st.tensors.keys().filter(|k| layout.find(k).is_none()).collect();
    ensure!(
        extra.is_empty(),
        "{}: tensors this base model has no adapter slot for: {}",
        st.path.display(),
        extra.iter().take(4).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    );
    let adapters = read_tensors(&st, &layout.tensors, layout.total, "")?;
    Ok((layout, adapters))
}

/// Merges the adapters in `dir` (a PEFT adapter directory, a LoRA training checkpoint step, or
/// a checkpoint directory whose `latest` is one) into `params`, the base they were trained on.
pub fn merge_dir(dir: &Path, cfg: &ModelConfig, params: &mut [f32], par: crate::ops::Par) -> Result<LoraLayout> {
    let dir = if dir.join("latest").is_file() { crate::checkpoint::native::resolve(dir)? } else { dir.to_path_buf() };
    let base = ParamLayout::new(cfg);
    let (layout, adapters) = load(&dir, cfg, &base)
        .with_context(|| format!("cannot use {} as LoRA adapters of this model", dir.display()))?;
    layout.merge_into(par, &base, params, &adapters);
    Ok(layout)
}
