//! The LoRA forward/backward of `Model` (see `crate::lora`): the frozen base gets no
//! gradient — no classifier, norm, embedding or base dW GEMMs — and each adapter's dA, dB come
//! from the projection-output gradient the dx kernels already produce and the saved inputs.

use super::{LossSum, Model, PhaseTimes, ms_since, timed};
use crate::backend::{LowpWeights, QkNormGrads};
use crate::lora::apply::{Stack, adapter_da, adapter_db, adapter_down, adapter_dy_b};
use crate::lora::{Adapter, LoraLayout, LoraScratch, Target, merge_layer_from};
use crate::ops::Par;
use crate::ops::cross_entropy::{IGNORE, cross_entropy_fused, loss_sum};
use crate::ops::gemm_bf16::{Bf16Gemm, Bf16Rhs};
use crate::ops::matmul::matmul_backward_dx;
use crate::ops::rmsnorm::rmsnorm_backward_dx;
use crate::params::{LayerTensors, ParamLayout};
use crate::prof;
use anyhow::{Context, Result, ensure};
use rayon::prelude::*;
use std::time::Instant;

/// A model's LoRA state: the adapter layout and the scratch its forward and backward use.
pub struct LoraRun {
    pub layout: LoraLayout,
    /// One layer's weights with that layer's adapters merged in `[layer range]`.
    merged: Vec<f32>,
    /// s·B `[OC, r]` for the merge.
    sb: Vec<f32>,
    /// u, v `[N, R]` (R = `LoraLayout::stacked_rows`) and dA `[3r, IC]` of the adapter
    /// backward (`adapters_backward`).
    scratch: LoraScratch,
    /// `[stack_len]`: the current layer's A's stacked by input (`LoraLayout::layer_stacks`).
    a_stack: Vec<f32>,
    /// `--base-dtype bf16`: every layer's frozen weights as bf16 bits `[layer arena span]`,
    /// from the first layer's arena offset on; the f32 arena's layer ranges are then never
    /// read (`merge_layer` widens these into the scratch instead).
    base_bf16: Option<Vec<u16>>,
    /// `--bf16-matmul`: the layers' projections run as bf16 GEMMs on `base_bf16` with the
    /// adapters applied beside them (`LowpWeights`) instead of f32 GEMMs on the widened,
    /// merged weights.
    lowp: bool,
    /// `--bf16-attention` (with `lowp`): the attention core's products on bf16 too.
    lowp_attention: bool,
    /// The bf16 GEMM's scratch for the classifier (its f32 embedding rounded while packing),
    /// made when `lowp` is switched on.
    gemm: Option<Bf16Gemm>,
}

impl LoraRun {
    /// The classifier's bf16 GEMM, when bf16 GEMMs are on.
    pub(super) fn lowp_gemm(&mut self) -> Option<&mut Bf16Gemm> {
        self.gemm.as_mut().filter(|_| self.lowp)
    }

    /// Layer `l`'s weights for the kernels: a copy of layer `l` of `params` (or of the bf16
    /// base, widened) with `s·B·A` merged in; or, with bf16 GEMMs on (`lowp`), only the norm
    /// gains and biases widened (the matrices are then empty) and the bf16 matrices with
    /// their adapters beside them.
    pub(super) fn merged_layer<'a>(
        &'a mut self,
        par: Par,
        layout: &ParamLayout,
        params: &[f32],
        adapters: &'a [f32],
        l: usize,
    ) -> (LayerTensors<&'a [f32]>, Option<LowpWeights<'a>>) {
        let bf16 = self.base_bf16.as_deref();
        if self.lowp {
            let bits = bf16.expect("lowp is only set with a bf16 base");
            let stacks = self.layout.layer_stacks(&mut self.a_stack, adapters, l);
            let bf16_attention = self.lowp_attention;
            return lowp_layer(&mut self.merged, &self.layout, stacks, bits, bf16_attention, layout, l);
        }
        (merge_layer(&mut self.merged, &mut self.sb, &self.layout, bf16, par, layout, params, adapters, l), None)
    }
}

/// Layer `l` for the bf16 GEMMs: its norm gains and biases widened into `merged` (returned
/// as `Weights` with empty matrices, so an f32 kernel reading them fails loudly), and its
/// bf16 matrices with their adapters (`stacks`, from `LoraLayout::layer_stacks`), and
/// whether attention runs on bf16 too (`--bf16-attention`). The forward and the backward both
/// take their layers from here, so the two always agree.
#[allow(clippy::too_many_arguments)]
fn lowp_layer<'a>(
    merged: &'a mut [f32],
    lora: &LoraLayout,
    stacks: [Option<Stack<'a>>; 4],
    base_bf16: &'a [u16],
    bf16_attention: bool,
    layout: &ParamLayout,
    l: usize,
) -> (LayerTensors<&'a [f32]>, Option<LowpWeights<'a>>) {
    let range = layout.layer_range(l);
    let first = layout.layer_range(0).start;
    let bits = layout.layer_in(&base_bf16[range.start - first..range.end - first], l);
    let widen = |dst: &mut [f32], src: &[u16]| {
        dst.iter_mut().zip(src).for_each(|(d, &b)| *d = half::bf16::from_bits(b).to_f32());
    };
    let dst = layout.layer_in_mut(&mut merged[..range.len()], l);
    widen(dst.attn_norm, bits.attn_norm);
    widen(dst.ffn_norm, bits.ffn_norm);
    for (d, b) in [(dst.q_norm, bits.q_norm), (dst.k_norm, bits.k_norm), (dst.bqkv, bits.bqkv)] {
        if let (Some(d), Some(b)) = (d, b) {
            widen(d, b);
        }
    }
    let mut w = layout.layer_in(&merged[..range.len()], l);
    (w.wqkv, w.wo, w.w13, w.w2) = (&[], &[], &[], &[]);
    let lw = LowpWeights {
        wqkv: bits.wqkv,
        wo: bits.wo,
        w13: bits.w13,
        w2: bits.w2,
        stacks,
        scale: lora.cfg.scale(),
        bf16_attention,
    };
    (w, Some(lw))
}

#[allow(clippy::too_many_arguments)]
fn merge_layer<'a>(
    merged: &'a mut [f32],
    sb: &mut Vec<f32>,
    lora: &LoraLayout,
    base_bf16: Option<&[u16]>,
    par: Par,
    layout: &ParamLayout,
    params: &[f32],
    adapters: &[f32],
    l: usize,
) -> LayerTensors<&'a [f32]> {
    let range = layout.layer_range(l);
    let merged = &mut merged[..range.len()];
    let (layer, s) = (lora.layer(l), lora.cfg.scale());
    match base_bf16 {
        None => {
            let src = &params[range];
            let copy = |at: usize, dst: &mut [f32]| dst.copy_from_slice(&src[at..at + dst.len()]);
            merge_layer_from(par, layer, s, merged, copy, adapters, sb);
        }
        Some(bits) => {
            let first = layout.layer_range(0).start;
            let src = &bits[range.start - first..range.end - first];
            let widen = |at: usize, dst: &mut [f32]| {
                dst.iter_mut().zip(&src[at..]).for_each(|(m, &b)| *m = half::bf16::from_bits(b).to_f32())
            };
            merge_layer_from(par, layer, s, merged, widen, adapters, sb);
        }
    }
    layout.layer_in(merged, l)
}

/// The layers of `params` (`ParamLayout::layer_span`) rounded to bf16 (round to nearest even).
pub fn bf16_layers(layout: &ParamLayout, params: &[f32]) -> Result<Vec<u16>> {
    let span = layout.layer_span();
    let mut bits = crate::memory::try_with_capacity::<u16>(span.len(), "the bf16 base")?;
    bits.par_extend(params[span].par_iter().map(|&x| half::bf16::from_f32(x).to_bits()));
    Ok(bits)
}

/// `dy` (with its row stride) and the saved input `x` of adapter `ad`'s projection, given
/// the block's output gradient `d_out` `[N, C]` and the stacked projection gradient `dproj`.
fn operands<'a>(
    ad: &Adapter,
    m: &'a Model,
    l: usize,
    d_out: &'a [f32],
    dqkv: &'a [f32],
    dh13: &'a [f32],
) -> (&'a [f32], usize, &'a [f32]) {
    let a = &m.acts[l];
    let (c, f, qd, kd) = (m.cfg.dim, m.cfg.ffn_dim, m.cfg.q_dim(), m.cfg.kv_dim());
    let w = qd + 2 * kd;
    match ad.target {
        Target::Q => (dqkv, w, &a.xn1),
        Target::K => (&dqkv[qd..], w, &a.xn1),
        Target::V => (&dqkv[qd + kd..], w, &a.xn1),
        Target::O => (d_out, c, &a.attn),
        Target::Gate => (dh13, 2 * f, &a.xn2),
        Target::Up => (&dh13[f..], 2 * f, &a.xn2),
        Target::Down => (d_out, c, &a.gate),
    }
}

impl Model {
    /// Trains LoRA adapters of `layout` on this model from now on: `forward_backward_lora`
    /// replaces `forward_backward`, and dW overlap is off (there are no base dW GEMMs).
    pub fn set_lora(&mut self, layout: LoraLayout) -> Result<()> {
        let n = self.n();
        let r = layout.cfg.rank;
        let widest = (0..self.cfg.n_layers).map(|l| self.layout.layer_range(l).len()).max().unwrap_or(0);
        let max_oc = layout.adapters.iter().map(|a| a.oc).max().unwrap_or(0);
        let a_stack = (0..self.cfg.n_layers).map(|l| layout.stack_len(l)).max().unwrap_or(0);
        let (rows, max_ic) = (layout.stacked_rows(), layout.adapters.iter().map(|a| a.ic).max().unwrap_or(0));
        let da = 3 * r * max_ic;
        let floats = widest + max_oc * r + a_stack + 2 * n * rows + da + self.cfg.dim + 2 * self.cfg.head_dim;
        crate::memory::ensure_fits("the LoRA scratch", crate::memory::bytes(4, &[floats]), "lower --lora-rank")?;
        self.dw = None;
        self.lora = Some(LoraRun {
            layout,
            merged: vec![0.0; widest],
            sb: Vec::with_capacity(max_oc * r),
            scratch: LoraScratch { u: vec![0.0; n * rows], v: vec![0.0; n * rows], da: vec![0.0; da] },
            a_stack: vec![0.0; a_stack],
            base_bf16: None,
            lowp: false,
            lowp_attention: false,
            gemm: None,
        });
        Ok(())
    }

    /// Holds the frozen layer weights as bf16 bits `[every layer's arena range]`, from the
    /// first layer's offset (`bf16_layers`): the layers then compute with these widened to
    /// f32, and the f32 arena's layer ranges are never read.
    pub fn set_lora_base_bf16(&mut self, bits: Vec<u16>) -> Result<()> {
        let span = self.layout.layer_span();
        ensure!(bits.len() == span.len(), "the bf16 base holds {} values, the layers need {}", bits.len(), span.len());
        self.lora.as_mut().context("call set_lora before set_lora_base_bf16")?.base_bf16 = Some(bits);
        Ok(())
    }

    /// `--bf16-matmul`: with a bf16 base (`set_lora_base_bf16`), run the layers' projections
    /// as bf16 GEMMs (activations rounded to bf16, f32 accumulation; `crate::ops::gemm_bf16`)
    /// with the adapters applied beside them, on backends that have them. Returns whether
    /// bf16 GEMMs are on: on a CPU without AVX-512 BF16 the portable bf16 kernel would be
    /// slower than the f32 GEMMs, so they stay on (false) unless `portable` (the tests, which
    /// check the numerics on every machine).
    pub fn set_lora_bf16_matmul(&mut self, portable: bool) -> Result<bool> {
        let (has_lowp, name, n) = (self.backend.has_lowp(), self.backend.name(), self.n());
        let lora = self.lora.as_mut().context("--bf16-matmul needs --lora-rank")?;
        ensure!(lora.base_bf16.is_some(), "--bf16-matmul needs --base-dtype bf16 (the bf16 GEMMs read the bf16 base)");
        ensure!(has_lowp, "--bf16-matmul runs on the cpu backend only, not on {name}");
        lora.lowp = portable || crate::ops::gemm_bf16::available();
        if lora.lowp && lora.gemm.is_none() {
            lora.gemm = Some(Bf16Gemm::new(n)?);
            // The forward saves u and the input gradient v beside the bf16 GEMMs, per layer
            // and once for the block being differentiated.
            let store = n * lora.layout.stacked_rows();
            for a in &mut self.acts {
                a.lora_u = crate::memory::try_vec_f32(store, "the saved LoRA activations (u = s·x·Aᵀ)")?;
            }
            self.grads.lora_v = crate::memory::try_vec_f32(store, "the LoRA input-gradient store (v = s·dy·B)")?;
        }
        Ok(lora.lowp)
    }

    /// `--bf16-attention`: with bf16 GEMMs on (`set_lora_bf16_matmul` returned true), run the
    /// attention core's six products on bf16 inputs as well (`ops::attention::bf16`, as
    /// PyTorch's bf16 autocast runs attention). Changes the numerics further
    /// (docs/BENCHMARKS.md §12). Errors if bf16 GEMMs are not on.
    pub fn set_lora_bf16_attention(&mut self, on: bool) -> Result<()> {
        let lora = self.lora.as_mut().context("--bf16-attention needs --lora-rank")?;
        ensure!(!on || lora.lowp, "--bf16-attention needs --bf16-matmul (bf16 GEMMs on)");
        lora.lowp_attention = on;
        Ok(())
    }

    /// The bf16 layer weights, when the base is held in bf16.
    pub fn lora_base_bf16(&self) -> Option<&[u16]> {
        self.lora.as_ref().and_then(|l| l.base_bf16.as_deref())
    }

    /// The adapter layout, when LoRA is on.
    pub fn lora(&self) -> Option<&LoraLayout> {
        self.lora.as_ref().map(|l| &l.layout)
    }

    pub(super) fn check_adapters(&self, adapters: Option<&[f32]>) -> Result<()> {
        if let Some(ad) = adapters {
            let lora = self.lora.as_ref().context("adapters given to a model without LoRA (call set_lora)")?;
            ensure!(
                ad.len() == lora.layout.total,
                "adapter arena has {} values, LoRA layout needs {}",
                ad.len(),
                lora.layout.total
            );
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch with LoRA: gradients of `loss_scale ·
    /// mean_loss / accum` are **added** to `agrads` (the adapter arena's layout); `params`
    /// (the base) is read only.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_lora(
        &mut self,
        params: &[f32],
        adapters: &[f32],
        agrads: &mut [f32],
        tokens: &[u32],
        targets: &[u32],
        loss_scale: f32,
        accum: usize,
    ) -> Result<LossSum> {
        self.check_batch(params, tokens, targets)?;
        self.check_adapters(Some(adapters))?;
        ensure!(agrads.len() == adapters.len(), "adapter gradient arena does not match the adapters");
        let start = Instant::now();
        let kernel_fwd_ms = self.forward_to_logits(params, Some(adapters), tokens)?;
        let (par, n, c, v) = (self.par, self.n(), self.cfg.dim, self.cfg.vocab_size);
        let count = targets.iter().filter(|&&t| t != IGNORE).count();
        let dscale = loss_scale / (count.max(1) * accum.max(1)) as f32;
        let t = prof::op("cross-entropy fwd+bwd");
        cross_entropy_fused(&mut self.losses, &mut self.logits, targets, v, dscale);
        let (sum, count) = loss_sum(&self.losses, targets);
        drop(t);
        let mid = Instant::now();
        let forward_ms = (mid - start).as_secs_f64() * 1e3;

        let layout = &self.layout;
        // Out of `self` while the layers run, so the loop can borrow the model's other fields.
        let mut lora = self.lora.take().expect("checked above");
        let e = layout.view(params, layout.classifier());
        let t = prof::gemm("classifier dx dlogits·E", n, c, v);
        match lora.lowp_gemm() {
            Some(g) => g.gemm(par, n, c, v, &self.logits, v, Bf16Rhs::NF32(e, c), &mut self.dxn, c, false),
            None => matmul_backward_dx(par, &mut self.dxn, &self.logits, e, n, c, v, false),
        }
        drop(t);
        let final_norm = layout.view(params, layout.final_norm);
        // The norm gains are frozen: their gradients are never formed.
        let t = prof::op("rmsnorm bwd");
        rmsnorm_backward_dx(&mut self.dx, &self.dxn, &self.rstd_final, &self.x_final, final_norm, n, c, false);
        drop(t);
        let mut kernel_ms = 0.0;
        let result = (|| -> Result<()> {
            for l in (0..self.cfg.n_layers).rev() {
                let LoraRun { layout: ll, merged, sb, scratch, a_stack, base_bf16, lowp, lowp_attention, .. } =
                    &mut lora;
                let t = prof::op("layer weights for the kernels (LoRA merge / widen)");
                let stacks = ll.layer_stacks(a_stack, adapters, l);
                let (w, lw) = match (*lowp, base_bf16.as_deref()) {
                    (true, Some(bits)) => lowp_layer(merged, ll, stacks, bits, *lowp_attention, &self.layout, l),
                    (_, bf16) => (merge_layer(merged, sb, ll, bf16, par, &self.layout, params, adapters, l), None),
                };
                // With bf16 GEMMs, u and v were saved beside them; else recomputed here.
                let saved = lw.is_some();
                drop(t);
                let a = &self.acts[l];
                let (dxn, g, dx) = (&mut self.dxn, &mut self.grads, &self.dx);
                timed(&mut kernel_ms, || match &lw {
                    Some(lw) => self.backend.ffn_backward_dx_lowp(dxn, g, dx, a, &w, lw),
                    None => self.backend.ffn_backward_dx(dxn, g, dx, a, &w),
                })?;
                self.adapters_backward(agrads, scratch, ll, &stacks, l, 2..4, saved);
                let t = prof::op("rmsnorm bwd");
                rmsnorm_backward_dx(&mut self.dx, &self.dxn, &a.rstd2, &a.x_mid, w.ffn_norm, n, c, true);
                drop(t);
                let norm_grads = QkNormGrads { q_norm: None, k_norm: None };
                let (dxn, g, dx) = (&mut self.dxn, &mut self.grads, &self.dx);
                timed(&mut kernel_ms, || match &lw {
                    Some(lw) => self.backend.attention_backward_dx_lowp(dxn, g, norm_grads, dx, a, &w, lw),
                    None => self.backend.attention_backward_dx(dxn, g, norm_grads, dx, a, &w),
                })?;
                self.adapters_backward(agrads, scratch, ll, &stacks, l, 0..2, saved);
                let _t = prof::op("rmsnorm bwd");
                rmsnorm_backward_dx(&mut self.dx, &self.dxn, &a.rstd1, &a.x_in, w.attn_norm, n, c, true);
            }
            Ok(())
        })();
        self.lora = Some(lora);
        result?;
        self.times = PhaseTimes {
            forward_ms,
            backward_ms: ms_since(mid),
            kernel_ms: kernel_fwd_ms + kernel_ms,
            ..PhaseTimes::default()
        };
        Ok(LossSum { sum, count })
    }

    /// dA, dB of layer `l`'s adapters in stacks `groups` (`apply::GROUPS`), added into
    /// `agrads`, from the projection-output gradients the last dx kernel left (`self.dx`,
    /// `grads.dqkv`, `grads.dh13`) and the saved inputs: dB_m += dy_mᵀ·u_m per member, dA =
    /// vᵀ·x per stack. u = s·x·Aᵀ and v = s·dy·B are the ones the bf16 path saved when
    /// `saved`, else computed into `scratch` (the merged-weights paths never form them).
    #[allow(clippy::too_many_arguments)]
    fn adapters_backward(
        &self,
        agrads: &mut [f32],
        scratch: &mut LoraScratch,
        ll: &LoraLayout,
        stacks: &[Option<Stack>; 4],
        l: usize,
        groups: std::ops::Range<usize>,
        saved: bool,
    ) {
        let (par, n, s) = (self.par, self.n(), ll.cfg.scale());
        let LoraScratch { u: u_tmp, v: v_tmp, da } = scratch;
        let (dqkv, dh13) = (&self.grads.dqkv, &self.grads.dh13);
        for st in stacks[groups].iter().flatten() {
            let adapter = |slot: usize| ll.layer(l).iter().find(|ad| ad.target as usize == slot).expect("a member");
            let first = st.iter().next().expect("a stack has members");
            let x = operands(adapter(first.slot), self, l, &self.dx, dqkv, dh13).2;
            let (u, v): (&[f32], &[f32]) = if saved {
                (&self.acts[l].lora_u[st.block(n)], &self.grads.lora_v[st.block(n)])
            } else {
                let (u, v) = (&mut u_tmp[st.block(n)], &mut v_tmp[st.block(n)]);
                adapter_down(par, u, x, st, n, s);
                for m in st.iter() {
                    let (dy, ld, _) = operands(adapter(m.slot), self, l, &self.dx, dqkv, dh13);
                    adapter_dy_b(par, v, dy, ld, st, &m, n, s);
                }
                (u, v)
            };
            for m in st.iter() {
                let ad = adapter(m.slot);
                let (dy, ld, _) = operands(ad, self, l, &self.dx, dqkv, dh13);
                adapter_db(par, &mut agrads[ad.b.clone()], dy, ld, u, st, &m, n);
            }
            adapter_da(par, da, v, x, st, n);
            let t = prof::op("lora dA rows into the gradients");
            for m in st.iter() {
                let rows = &da[m.col * st.ic..(m.col + st.r) * st.ic];
                agrads[adapter(m.slot).a.clone()].iter_mut().zip(rows).for_each(|(g, &d)| *g += d);
            }
            drop(t);
        }
    }
}
