//! One contiguous `f32` arena for every parameter, with named views. Gradients and the AdamW
//! moments use the same layout, so the optimizer, the global grad norm and checkpoint I/O are
//! each one loop over one slice.
//!
//! Tensor names are HF's safetensors keys exactly (`model.layers.3.self_attn.q_proj.weight`).
//! Matrices are row-major `[out, in]` like `torch.nn.Linear.weight`.

use crate::config::ModelConfig;
use crate::rng::Rng;
use rayon::prelude::*;
use std::ops::Range;

/// What a tensor is, which decides its init and whether weight decay applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// Token embedding `[V, C]` (also the classifier when tied).
    Embedding,
    /// A projection matrix `[out, in]`.
    Matrix,
    /// A residual output projection (Wo, W2): init scaled by 1/√(2L).
    ResidualMatrix,
    /// An RMSNorm gain vector, initialised to 1.
    Norm,
    /// A projection bias (Qwen2's q/k/v), initialised to 0, never decayed.
    Bias,
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub kind: TensorKind,
}

impl TensorInfo {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }

    /// Decoupled weight decay applies to matrices (2-D tensors) only, never to norm gains
    /// or biases.
    pub fn decays(&self) -> bool {
        !matches!(self.kind, TensorKind::Norm | TensorKind::Bias)
    }
}

/// Views of one decoder layer's weights as the kernels use them; `T` is `&[f32]` or
/// `&mut [f32]`. Projections that read the same input are stacked views over HF tensors that
/// the layout places next to each other.
#[derive(Debug)]
pub struct LayerTensors<T> {
    /// Which layer these are (backends that keep per-layer state, such as staged weights,
    /// key it by this).
    pub layer: usize,
    /// `[C]` input_layernorm
    pub attn_norm: T,
    /// `[(H + 2·KV)·D, C]`: q_proj, k_proj and v_proj stacked (adjacent in the arena), so
    /// the three projections are one GEMM.
    pub wqkv: T,
    /// `[C, H·D]` o_proj
    pub wo: T,
    /// `[(H + 2·KV)·D]`: q_proj, k_proj and v_proj biases stacked (Qwen2 only)
    pub bqkv: Option<T>,
    /// `[D]` q_norm (QK-norm models only)
    pub q_norm: Option<T>,
    /// `[D]` k_norm (QK-norm models only)
    pub k_norm: Option<T>,
    /// `[C]` post_attention_layernorm
    pub ffn_norm: T,
    /// `[2·F, C]`: gate_proj (W1) then up_proj (W3), stacked, one GEMM.
    pub w13: T,
    /// `[C, F]` down_proj
    pub w2: T,
}

#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorInfo>,
    /// Per layer: the arena range holding all of its tensors (contiguous by construction).
    layer_ranges: Vec<Range<usize>>,
    has_qk_norm: bool,
    has_qkv_bias: bool,
    /// (C, F, H·D, KV·D, D)
    layer_dims: (usize, usize, usize, usize, usize),
    pub embed: usize,
    pub final_norm: usize,
    /// Untied classifier `[V, C]`; `None` when it is the embedding.
    pub lm_head: Option<usize>,
    pub total: usize,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let (c, f, d) = (cfg.dim, cfg.ffn_dim, cfg.head_dim);
        let mut tensors = Vec::new();
        let mut offset = 0;
        let mut push = |name: String, shape: Vec<usize>, kind: TensorKind| {
            let info = TensorInfo { name, shape, offset, kind };
            offset += info.len();
            tensors.push(info);
            tensors.len() - 1
        };
        let embed = push("model.embed_tokens.weight".into(), vec![cfg.vocab_size, c], TensorKind::Embedding);
        let mut layer_ranges = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("model.layers.{l}");
            let first = push(format!("{p}.input_layernorm.weight"), vec![c], TensorKind::Norm);
            push(format!("{p}.self_attn.q_proj.weight"), vec![cfg.q_dim(), c], TensorKind::Matrix);
            push(format!("{p}.self_attn.k_proj.weight"), vec![cfg.kv_dim(), c], TensorKind::Matrix);
            push(format!("{p}.self_attn.v_proj.weight"), vec![cfg.kv_dim(), c], TensorKind::Matrix);
            push(format!("{p}.self_attn.o_proj.weight"), vec![c, cfg.q_dim()], TensorKind::ResidualMatrix);
            if cfg.qkv_bias {
                push(format!("{p}.self_attn.q_proj.bias"), vec![cfg.q_dim()], TensorKind::Bias);
                push(format!("{p}.self_attn.k_proj.bias"), vec![cfg.kv_dim()], TensorKind::Bias);
                push(format!("{p}.self_attn.v_proj.bias"), vec![cfg.kv_dim()], TensorKind::Bias);
            }
            if cfg.qk_norm {
                push(format!("{p}.self_attn.q_norm.weight"), vec![d], TensorKind::Norm);
                push(format!("{p}.self_attn.k_norm.weight"), vec![d], TensorKind::Norm);
            }
            push(format!("{p}.post_attention_layernorm.weight"), vec![c], TensorKind::Norm);
            push(format!("{p}.mlp.gate_proj.weight"), vec![f, c], TensorKind::Matrix);
            push(format!("{p}.mlp.up_proj.weight"), vec![f, c], TensorKind::Matrix);
            let last = push(format!("{p}.mlp.down_proj.weight"), vec![c, f], TensorKind::ResidualMatrix);
            layer_ranges.push((first, last));
        }
        let final_norm = push("model.norm.weight".into(), vec![c], TensorKind::Norm);
        let lm_head =
            (!cfg.tied_embeddings).then(|| push("lm_head.weight".into(), vec![cfg.vocab_size, c], TensorKind::Matrix));
        let layer_ranges = layer_ranges.into_iter().map(|(a, b)| tensors[a].offset..tensors[b].range().end).collect();
        ParamLayout {
            tensors,
            layer_ranges,
            has_qk_norm: cfg.qk_norm,
            has_qkv_bias: cfg.qkv_bias,
            layer_dims: (c, f, cfg.q_dim(), cfg.kv_dim(), d),
            embed,
            final_norm,
            lm_head,
            total: offset,
        }
    }

    /// The first tensor of `buf` holding a NaN or an infinity, if any: loaders refuse such
    /// weights by name.
    pub fn first_nonfinite(&self, buf: &[f32]) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| buf[t.range()].iter().any(|x| !x.is_finite()))
    }

    pub fn find(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn view<'a>(&self, buf: &'a [f32], tensor: usize) -> &'a [f32] {
        &buf[self.tensors[tensor].range()]
    }

    pub fn view_mut<'a>(&self, buf: &'a mut [f32], tensor: usize) -> &'a mut [f32] {
        &mut buf[self.tensors[tensor].range()]
    }

    /// The classifier matrix `[V, C]`: `lm_head` when untied, else the embedding.
    pub fn classifier(&self) -> usize {
        self.lm_head.unwrap_or(self.embed)
    }

    pub fn n_layers(&self) -> usize {
        self.layer_ranges.len()
    }

    /// The arena range holding all of layer `l`'s tensors.
    pub fn layer_range(&self, l: usize) -> Range<usize> {
        self.layer_ranges[l].clone()
    }

    /// Layer `l`'s tensors as slices of `buf`.
    pub fn layer<'a>(&self, buf: &'a [f32], l: usize) -> LayerTensors<&'a [f32]> {
        let mut rest = &buf[self.layer_ranges[l].clone()];
        self.split_layer(l, |len| {
            let (head, tail) = rest.split_at(len);
            rest = tail;
            head
        })
    }

    /// The arena range of all decoder layers together (between the embedding and the final
    /// norm).
    pub fn layer_span(&self) -> Range<usize> {
        match (self.layer_ranges.first(), self.layer_ranges.last()) {
            (Some(first), Some(last)) => first.start..last.end,
            _ => 0..0,
        }
    }

    /// Layer `l`'s tensors as slices of `layer_buf`, a copy of just that layer's range (LoRA
    /// merges adapters into such a copy).
    pub fn layer_in<'a, T>(&self, layer_buf: &'a [T], l: usize) -> LayerTensors<&'a [T]> {
        let mut rest = &layer_buf[..self.layer_ranges[l].len()];
        self.split_layer(l, |len| {
            let (head, tail) = rest.split_at(len);
            rest = tail;
            head
        })
    }

    /// `layer_in`, as disjoint mutable slices.
    pub fn layer_in_mut<'a, T>(&self, layer_buf: &'a mut [T], l: usize) -> LayerTensors<&'a mut [T]> {
        let mut rest = &mut layer_buf[..self.layer_ranges[l].len()];
        self.split_layer(l, |len| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            head
        })
    }

    /// Layer `l`'s tensors as disjoint mutable slices of `buf`.
    pub fn layer_mut<'a>(&self, buf: &'a mut [f32], l: usize) -> LayerTensors<&'a mut [f32]> {
        let mut rest = &mut buf[self.layer_ranges[l].clone()];
        self.split_layer(l, |len| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            head
        })
    }

    /// Every layer's tensors as disjoint mutable slices of `buf`, last layer first (the
    /// backward pass's order). Unlike calling `layer_mut` per layer, the views of all layers
    /// are alive at once, so the model can hand one layer's weight gradients to a worker
    /// thread while it works on the next. No allocation: each step splits the remaining
    /// arena prefix.
    pub fn layers_mut_rev<'a>(&'a self, buf: &'a mut [f32]) -> impl Iterator<Item = LayerTensors<&'a mut [f32]>> + 'a {
        let mut rest = buf;
        (0..self.n_layers()).rev().map(move |l| {
            let range = self.layer_ranges[l].clone();
            // Layers lie in ascending arena order, so layer l sits at the end of what is left.
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(range.start);
            rest = head;
            let mut layer = &mut tail[..range.len()];
            self.split_layer(l, |len| {
                let (head, tail) = std::mem::take(&mut layer).split_at_mut(len);
                layer = tail;
                head
            })
        })
    }

    /// Cuts a layer's range in arena order (the order `new` pushes them); no allocation.
    fn split_layer<T>(&self, l: usize, mut take: impl FnMut(usize) -> T) -> LayerTensors<T> {
        let (c, f, q, kv, d) = self.layer_dims;
        let attn_norm = take(c);
        let (wqkv, wo) = (take((q + 2 * kv) * c), take(c * q));
        let bqkv = self.has_qkv_bias.then(|| take(q + 2 * kv));
        let (q_norm, k_norm) = if self.has_qk_norm { (Some(take(d)), Some(take(d))) } else { (None, None) };
        let ffn_norm = take(c);
        let (w13, w2) = (take(2 * f * c), take(c * f));
        debug_assert!(l < self.n_layers());
        LayerTensors { layer: l, attn_norm, wqkv, wo, bqkv, q_norm, k_norm, ffn_norm, w13, w2 }
    }

    /// Seeded init: matrices ~ N(0, 0.02²), residual output projections (Wo, W2) scaled by
    /// 1/√(2L), norm gains 1, biases 0. Each block of `INIT_BLOCK` values of each tensor draws from its
    /// own stream, so the result depends on neither the thread count nor the fill order, and
    /// a 155M-value embedding fills in parallel.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut buf = vec![0.0f32; self.total];
        self.init_range(seed, 0..self.total, &mut buf);
        buf
    }

    /// `init`'s values for the tensors lying inside the arena `range` (which starts and ends
    /// at tensor boundaries), written to `out` `[range.len()]`: a frozen LoRA base can be
    /// initialised one layer at a time (and kept in bf16) without the whole f32 arena.
    pub fn init_range(&self, seed: u64, range: Range<usize>, out: &mut [f32]) {
        const INIT_BLOCK: usize = 1 << 20;
        let residual_scale = 1.0 / (2.0 * self.n_layers().max(1) as f64).sqrt();
        let mut jobs: Vec<(u64, f64, &mut [f32])> = Vec::new();
        let mut rest = &mut out[..range.len()];
        let inside = |t: &&TensorInfo| t.offset >= range.start && t.range().end <= range.end;
        for (i, t) in self.tensors.iter().enumerate().filter(|(_, t)| inside(t)) {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(t.len());
            rest = tail;
            let std = match t.kind {
                TensorKind::Norm | TensorKind::Bias => 0.0,
                TensorKind::ResidualMatrix => 0.02 * residual_scale,
                TensorKind::Embedding | TensorKind::Matrix => 0.02,
            };
            for (j, block) in head.chunks_mut(INIT_BLOCK).enumerate() {
                jobs.push((((i as u64) << 32) | j as u64, std, block));
            }
        }
        let biases: Vec<bool> = self.tensors.iter().map(|t| t.kind == TensorKind::Bias).collect();
        jobs.into_par_iter().for_each(|(stream, std, out)| {
            if biases[(stream >> 32) as usize] {
                out.fill(0.0);
            } else if std == 0.0 {
                out.fill(1.0);
            } else {
                Rng::derive(seed, stream + 1).fill_normal(out, std);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_arena_and_views_agree() {
        for name in ["stories260k", "qwen3-0.6b"] {
            let mut cfg = ModelConfig::preset(name).unwrap();
            cfg.n_layers = 2;
            cfg.vocab_size = 100;
            let layout = ParamLayout::new(&cfg);
            assert_eq!(layout.total, cfg.param_count());
            let mut end = 0;
            for t in &layout.tensors {
                assert_eq!(t.offset, end, "{}", t.name);
                end = t.range().end;
            }
            assert_eq!(end, layout.total);
            let mut buf: Vec<f32> = (0..layout.total).map(|i| i as f32).collect();
            let wo_name = "model.layers.1.self_attn.o_proj.weight";
            let wo = layout.find(wo_name).unwrap().clone();
            assert_eq!(layout.layer(&buf, 1).wo[0], wo.offset as f32);
            layout.layer_mut(&mut buf, 1).w2[0] = -1.0;
            let w2 = layout.find("model.layers.1.mlp.down_proj.weight").unwrap();
            assert_eq!(buf[w2.offset], -1.0);
            assert_eq!(layout.layer(&buf, 0).q_norm.is_some(), cfg.qk_norm);
            // All layers at once, last first, are the same views as one at a time.
            let want: Vec<Vec<f32>> = (0..2).rev().map(|l| layout.layer(&buf, l).wqkv.to_vec()).collect();
            let mut copy = buf.clone();
            let got: Vec<Vec<f32>> = layout.layers_mut_rev(&mut copy).map(|t| t.wqkv.to_vec()).collect();
            assert_eq!(got, want);
            for t in layout.layers_mut_rev(&mut copy) {
                t.w2.fill(-2.0);
            }
            assert!((0..2).all(|l| layout.layer(&copy, l).w2.iter().all(|&x| x == -2.0)));
        }
    }

    #[test]
    fn init_statistics_and_determinism() {
        let cfg = ModelConfig::preset("stories260k").unwrap();
        let layout = ParamLayout::new(&cfg);
        let a = layout.init(3);
        assert_eq!(a, layout.init(3));
        assert_ne!(a, layout.init(4));
        let stats = |s: &[f32]| {
            let n = s.len() as f64;
            let mean = s.iter().map(|&x| x as f64).sum::<f64>() / n;
            (mean, (s.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt())
        };
        let (m, sd) = stats(layout.view(&a, layout.embed));
        assert!(m.abs() < 2e-3 && (sd - 0.02).abs() < 1e-3, "embed mean {m} std {sd}");
        let l0 = layout.layer(&a, 0);
        let (_, sd) = stats(l0.w2);
        assert!((sd - 0.02 / 10f64.sqrt()).abs() < 1e-3, "w2 std {sd}");
        assert!(l0.attn_norm.iter().all(|&x| x == 1.0));
    }
}
