//! A model's matrices in a quantized encoding for decoding (`--quant`): quantized from the
//! f32 weights (q8_0, q4_0), or a GGUF file's own Q8_0/Q4_0/Q4_1 tensors read as they are.
//! Embeddings and norms stay f32 (a row lookup and a few vectors per token).

use super::matvec::{QKind, QMatrix};
use crate::checkpoint::gguf::GgufFile;
use crate::config::ModelConfig;
use crate::params::ParamLayout;
use anyhow::{Context, Result, bail, ensure};

/// What `--quant` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantMode {
    /// Every matrix quantized to Q8_0 (W8A8).
    Q8_0,
    /// Layer matrices quantized to Q4_0 (W4A8); the classifier to Q8_0, as it is the matrix
    /// most sensitive to rounding (llama.cpp keeps it at 6 bits or more for the same reason).
    Q4_0,
    /// A GGUF file's own quantized tensors, used as they are.
    Gguf,
}

impl QuantMode {
    pub fn name(self) -> &'static str {
        match self {
            QuantMode::Q8_0 => "q8_0",
            QuantMode::Q4_0 => "q4_0",
            QuantMode::Gguf => "gguf",
        }
    }
}

/// One layer's matrices, stacked as in `ParamLayout` (q|k|v rows, gate|up rows).
pub struct QLayer {
    /// `[(H + 2·KV)·D, C]`
    pub wqkv: QMatrix,
    /// `[C, H·D]`
    pub wo: QMatrix,
    /// `[2·F, C]`
    pub w13: QMatrix,
    /// `[C, F]`
    pub w2: QMatrix,
}

pub struct QuantWeights {
    pub layers: Vec<QLayer>,
    /// `[V, C]`
    pub classifier: QMatrix,
    /// What was done, e.g. "q8_0 (W8A8)" or "GGUF Q4_1 as stored; classifier Q8_0 as stored".
    pub description: String,
}

/// Why `cfg` cannot be quantized in blocks of 32, if it cannot.
fn block_check(cfg: &ModelConfig) -> Result<()> {
    let mut bad = Vec::new();
    for (what, n) in
        [("the model width C", cfg.dim), ("the attention width H·D", cfg.q_dim()), ("the FFN width F", cfg.ffn_dim)]
    {
        if !n.is_multiple_of(super::matvec::QK) {
            bad.push(format!("{what} = {n}"));
        }
    }
    ensure!(
        bad.is_empty(),
        "{} cannot be quantized: {} not a multiple of the block length 32 (matrix rows are quantized in blocks of 32)",
        if cfg.name.is_empty() { "this model" } else { cfg.name.as_str() },
        bad.join(" and ") + if bad.len() > 1 { " are" } else { " is" }
    );
    Ok(())
}

impl QuantWeights {
    /// Quantizes the matrices of `params` (`ParamLayout::new(cfg)`) as `mode` (Q8_0 or Q4_0).
    pub fn quantize(cfg: &ModelConfig, params: &[f32], mode: QuantMode) -> Result<Self> {
        block_check(cfg)?;
        let kind = match mode {
            QuantMode::Q8_0 => QKind::Q8_0,
            QuantMode::Q4_0 => QKind::Q4_0,
            QuantMode::Gguf => {
                bail!("--quant gguf reads a GGUF file's own quantized tensors; this model is not a GGUF file")
            }
        };
        let layout = ParamLayout::new(cfg);
        ensure!(params.len() == layout.total, "parameters do not match the config");
        let (c, qd, kd, f) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let w = layout.layer(params, l);
            let q = |m: &[f32], n: usize, k: usize, name: &str| {
                QMatrix::quantize(kind, m, n, k, &format!("layer {l} {name}"))
            };
            layers.push(QLayer {
                wqkv: q(w.wqkv, qd + 2 * kd, c, "q/k/v")?,
                wo: q(w.wo, c, qd, "o_proj")?,
                w13: q(w.w13, 2 * f, c, "gate/up")?,
                w2: q(w.w2, c, f, "down_proj")?,
            });
        }
        let classifier = layout.view(params, layout.classifier());
        let classifier = QMatrix::quantize(QKind::Q8_0, classifier, cfg.vocab_size, c, "the classifier")?;
        let description = match mode {
            QuantMode::Q4_0 => "q4_0 (W4A8; classifier q8_0)".to_string(),
            _ => "q8_0 (W8A8)".to_string(),
        };
        Ok(QuantWeights { layers, classifier, description })
    }

    /// A GGUF file's matrices as they are stored (Q8_0, Q4_0, Q4_1); a matrix stored in any
    /// other type is refused with its name and type. `cfg` is the file's config.
    pub fn from_gguf(file: &GgufFile, cfg: &ModelConfig) -> Result<Self> {
        block_check(cfg)?;
        let llama = file.meta("general.architecture").and_then(|v| v.as_str()) == Some("llama");
        let mut types = std::collections::BTreeSet::new();
        let mut read = |name: &str, n: usize, k: usize| -> Result<QMatrix> {
            let t = file.tensor(name).with_context(|| format!("{}: tensor '{name}' is missing", file.name))?;
            ensure!(
                t.dims.len() == 2 && t.dims[0] as usize == k && t.dims[1] as usize == n,
                "{}: tensor '{name}' has dims {:?}, expected [{k}, {n}]",
                file.name,
                t.dims
            );
            types.insert(t.ty.name());
            QMatrix::from_ggml(t.ty, file.bytes(t), n, k, &format!("tensor '{name}'"))
                .with_context(|| format!("--quant gguf on {}", file.name))
        };
        let (c, d, f) = (cfg.dim, cfg.head_dim, cfg.ffn_dim);
        let (h, kv) = (cfg.n_heads, cfg.n_kv_heads);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let mut q = read(&format!("blk.{l}.attn_q.weight"), h * d, c)?;
            let mut k = read(&format!("blk.{l}.attn_k.weight"), kv * d, c)?;
            let v = read(&format!("blk.{l}.attn_v.weight"), kv * d, c)?;
            if llama {
                // llama.cpp stores q/k rows in Meta's interleaved RoPE order: HF row
                // h·D + j·D/2 + i is stored row h·D + 2i + j (as the f32 import permutes).
                let half = d / 2;
                let meta = move |row: usize| {
                    let (head, r) = (row / d, row % d);
                    head * d + 2 * (r % half) + r / half
                };
                q.permute_rows(meta);
                k.permute_rows(meta);
            }
            let gate = read(&format!("blk.{l}.ffn_gate.weight"), f, c)?;
            let up = read(&format!("blk.{l}.ffn_up.weight"), f, c)?;
            layers.push(QLayer {
                wqkv: QMatrix::concat(&[q, k, v], &format!("layer {l} q/k/v"))?,
                wo: read(&format!("blk.{l}.attn_output.weight"), c, h * d)?,
                w13: QMatrix::concat(&[gate, up], &format!("layer {l} gate/up"))?,
                w2: read(&format!("blk.{l}.ffn_down.weight"), c, f)?,
            });
        }
        let head = if cfg.tied_embeddings { "token_embd.weight" } else { "output.weight" };
        let classifier = read(head, cfg.vocab_size, c)?;
        let description = format!("GGUF tensors as stored ({})", types.into_iter().collect::<Vec<_>>().join(", "));
        Ok(QuantWeights { layers, classifier, description })
    }

    /// What `--quant mode` asks for on the model at `path` (already loaded as `cfg`,
    /// `params`): `Gguf` opens the file again for its quantized tensors.
    pub fn load(path: &std::path::Path, cfg: &ModelConfig, params: &[f32], mode: QuantMode) -> Result<Self> {
        match mode {
            QuantMode::Gguf => {
                ensure!(
                    path.is_file() && path.extension().is_some_and(|e| e == "gguf"),
                    "--quant gguf uses a GGUF file's own quantized tensors, and {} is not a .gguf file (use --quant q8_0 or q4_0)",
                    path.display()
                );
                let file = GgufFile::open(path)?;
                Self::from_gguf(&file, cfg)
            }
            _ => Self::quantize(cfg, params, mode).with_context(|| format!("--quant {}", mode.name())),
        }
    }

    /// One line for the terminal: what is used, its size, the integer kernels.
    pub fn summary(&self) -> String {
        format!(
            "quantized decoding: {}, {:.1} MB of matrices, {} integer kernels",
            self.description,
            self.bytes() as f64 / 1e6,
            super::matvec::kernel_name()
        )
    }

    /// Bytes of quantized matrices (streamed once per decoded token).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.wqkv.bytes() + l.wo.bytes() + l.w13.bytes() + l.w2.bytes()).sum::<usize>()
            + self.classifier.bytes()
    }

    /// Checks that these matrices have `cfg`'s shapes.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let (c, qd, kd, f) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
        ensure!(
            self.layers.len() == cfg.n_layers,
            "quantized weights have {} layers, the model {}",
            self.layers.len(),
            cfg.n_layers
        );
        for l in &self.layers {
            ensure!(
                (l.wqkv.n, l.wqkv.k, l.wo.n, l.wo.k, l.w13.n, l.w13.k, l.w2.n, l.w2.k)
                    == (qd + 2 * kd, c, c, qd, 2 * f, c, c, f),
                "quantized weights do not match the model's shapes"
            );
        }
        ensure!(
            (self.classifier.n, self.classifier.k) == (cfg.vocab_size, c),
            "quantized classifier does not match the model's shape"
        );
        Ok(())
    }
}
