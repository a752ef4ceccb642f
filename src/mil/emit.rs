//! MIL programs for the kernel set, weights as inputs (never constants), so one compiled
//! program serves every layer and every step.
//!
//! Dims: C = dim, H = heads, KV = kv heads, G = H/KV, D = head_dim, QD = H·D, KD = KV·D,
//! F = ffn dim, S = T rounded up to a multiple of 32: spatial widths must be multiples of 16,
//! and a matmul's inner dimension is reported to need a multiple of 32 (the attention
//! matmuls contract over S). The extra positions are zero and, being later than every real
//! position, causally invisible. The model's own C, F and D are not padded: `hardware_notes`
//! lists those that break the reported 32 rule, for the probe to settle.
//!
//! Every tensor is `[1, channels, 1, S]` fp16 at the boundary. A linear layer is one
//! `matmul(transpose_x = true, x = W [1,1,IC,OC], y = act [1,1,IC,S])` → `[1,1,OC,S]`, with
//! the weight staged as `[IC, OC]` (one channel row per input feature, the original's
//! "dynamic matmul"); matrices whose HF layout already is `[IC, OC]` go in as-is.
//!
//! Kernels (HF weight names in brackets; "ᵀ" = staged transposed):
//! - `attn_fwd`  xn1, Wqᵀ Wkᵀ Wvᵀ [q/k/v_proj] (+ q_norm, k_norm) → attn | q | k | v (| q_raw | k_raw):
//!   projections, per-head QK-norm (`pow(·, −0.5)` after the reduction, never rsqrt),
//!   rotate-half RoPE from `rope_cos/sin.bin`, causal softmax with `mask.bin`, P·V.
//! - `wo_fwd`    attn, Woᵀ [o_proj] → o
//! - `ffn_fwd`   xn2, W1ᵀ W3ᵀ [gate/up_proj], W2 [down_proj] → out | h1 | h3 | gate
//! - `ffn_bwd_w2t`  d_out, W2 → dgate
//! - `ffn_bwd_w13t` dgate, h1, h3, W1, W3 → dxn | dh1 | dh3 (SiLU backward in the kernel)
//! - `wo_bwd`    d_o, Wo → dattn
//! - `sdpa_bwd1` q | k | v | dattn → dv | probs | dprobs (probabilities recomputed)
//! - `sdpa_bwd2` probs | dprobs | q | k → dq | dk (softmax backward, inverse RoPE)
//! - `q_bwd`     dq, Wq → dxn_q;   `kv_bwd` dk, dv, Wk, Wv → dxn_kv
//!
//! GQA: query head h reads kv head h / G everywhere (HF's repeat_interleave), by viewing
//! q `[1,H,S,D]` as `[1,KV,G·S,D]`; in the backward the same view makes the matmuls sum the
//! group's contributions to dk and dv, so no tile/reduce step exists to get wrong.
//!
//! Two input layouts (`InputLayout`): `Packed` puts activations and weights into one input
//! `[1, Cin, 1, W]` side by side along W (the original's single-input form); `Separate`
//! makes each piece its own function input (reported to compile on newer chips and run
//! faster). The kernel body after the unpacking is identical.

use super::graph::{Builder, V, as_rows, from_heads, head_norm, linear, rope, to_heads};
use super::{KernelProgram, TensorSig};
use crate::config::ModelConfig;
use crate::ops::rope::RopeTable;
use anyhow::{Result, bail, ensure};

/// The Neural Engine's per-dimension limit.
pub const MAX_DIM: usize = 65536;
/// Spatial widths are multiples of this.
pub const SPATIAL_GRANULE: usize = 16;
/// Added to scores above the diagonal: far below any real score, with room below it (a
/// score under −35504 still sends the sum to −inf, which exp maps to 0 all the same).
pub const MASK_VALUE: f32 = -30000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputLayout {
    /// Activations and weights side by side in one `[1, C, 1, W]` input.
    Packed,
    /// Every activation and weight its own function input.
    Separate,
}

/// Reported: a matmul's inner dimension must be a multiple of this, or it yields zeros.
pub const MATMUL_GRANULE: usize = 32;

/// A spatial width rounded up to the granule.
pub fn padded(w: usize) -> usize {
    w.div_ceil(SPATIAL_GRANULE) * SPATIAL_GRANULE
}

/// The padded sequence length S for T positions.
pub fn seq_padded(t: usize) -> usize {
    t.div_ceil(MATMUL_GRANULE) * MATMUL_GRANULE
}

/// Dimensions the kernels contract over in a matmul that break the reported multiple-of-32
/// rule (constraints §1; unverified): one line each, empty when all comply.
pub fn hardware_notes(cfg: &ModelConfig) -> Vec<String> {
    let dims = [
        ("dim (C)", cfg.dim),
        ("ffn_dim (F)", cfg.ffn_dim),
        ("head_dim (D)", cfg.head_dim),
        ("heads·head_dim", cfg.q_dim()),
        ("kv_heads·head_dim", cfg.kv_dim()),
    ];
    dims.iter()
        .filter(|(_, d)| d % MATMUL_GRANULE != 0)
        .map(|(what, d)| {
            format!("{what} = {d} is not a multiple of {MATMUL_GRANULE}, which matmul inner dimensions reportedly need")
        })
        .collect()
}

/// Where one logical tensor lives in a kernel's inputs: input index, channel and column
/// offsets, and its `[ch, width]` extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub name: String,
    pub input: usize,
    pub chan_off: usize,
    pub col_off: usize,
    pub ch: usize,
    pub width: usize,
}

/// One emitted kernel: the program plus where each piece goes and what the output holds.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub program: KernelProgram,
    pub pieces: Vec<Piece>,
    /// The single output's parts along channels: (name, channels), in order.
    pub out_parts: Vec<(String, usize)>,
}

impl Kernel {
    pub fn piece(&self, name: &str) -> &Piece {
        self.pieces.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("{}: no piece {name}", self.program.name))
    }

    /// (channel offset, channels) of an output part.
    pub fn out_part(&self, name: &str) -> (usize, usize) {
        let mut at = 0;
        for (n, ch) in &self.out_parts {
            if n == name {
                return (at, *ch);
            }
            at += ch;
        }
        panic!("{}: no output part {name}", self.program.name)
    }
}

/// Shapes and constants every kernel of one model shares.
#[derive(Clone, Debug)]
pub struct Dims {
    pub c: usize,
    pub h: usize,
    pub kv: usize,
    pub d: usize,
    pub f: usize,
    /// real sequence length and its padded width
    pub t: usize,
    pub s: usize,
    pub qk_norm: bool,
    pub eps: f64,
    pub theta: f64,
    /// RoPE frequency scaling (linear or Llama 3), if any
    pub rope_scaling: Option<crate::config::RopeScaling>,
    /// vocabulary size
    pub v: usize,
}

impl Dims {
    pub fn new(cfg: &ModelConfig, t: usize) -> Result<Self> {
        ensure!(t > 0, "sequence length must be positive");
        ensure!(
            !cfg.qkv_bias,
            "the MIL kernels have no q/k/v bias inputs (a Qwen2-family model): use --backend cpu for this model"
        );
        ensure!(
            t <= cfg.max_seq_len,
            "sequence length {t} exceeds the model's max_position_embeddings ({})",
            cfg.max_seq_len
        );
        ensure!(cfg.head_dim.is_multiple_of(2), "RoPE needs an even head_dim, got {}", cfg.head_dim);
        // QK-norm runs in fp16 inside `attn_fwd`: an eps that rounds to 0 makes padded (zero)
        // positions 0 · ∞ = NaN, which the mask cannot hide.
        ensure!(
            !cfg.qk_norm || half::f16::from_f64(cfg.norm_eps).to_f64() > 0.0,
            "rms_norm_eps {} rounds to 0 in fp16; the MIL kernels need at least 6e-8",
            cfg.norm_eps
        );
        Ok(Dims {
            c: cfg.dim,
            h: cfg.n_heads,
            kv: cfg.n_kv_heads,
            d: cfg.head_dim,
            f: cfg.ffn_dim,
            t,
            s: seq_padded(t),
            qk_norm: cfg.qk_norm,
            eps: cfg.norm_eps,
            theta: cfg.rope_theta,
            rope_scaling: cfg.rope_scaling,
            v: cfg.vocab_size,
        })
    }

    fn g(&self) -> usize {
        self.h / self.kv
    }
    fn qd(&self) -> usize {
        self.h * self.d
    }
    fn kd(&self) -> usize {
        self.kv * self.d
    }
}

/// How a kernel's pieces share inputs in the `Packed` layout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// Side by side along W (activations then weights; channels = the widest piece's)
    Columns,
    /// Stacked along channels (weight-free kernels whose activations differ in channels)
    Channels,
}

/// Declares the inputs for `pieces` (name, channels, width) and returns each piece as a
/// value of shape `[1, ch, 1, width]`.
fn inputs(
    layout: InputLayout,
    stack: Stack,
    pieces: &[(&str, usize, usize)],
) -> (Builder, Vec<TensorSig>, Vec<Piece>, Vec<V>) {
    let mut sigs = Vec::new();
    let mut placed = Vec::new();
    match layout {
        InputLayout::Packed => {
            let (mut chan, mut col) = (0, 0);
            for &(name, ch, width) in pieces {
                let (chan_off, col_off) = match stack {
                    Stack::Columns => (0, col),
                    Stack::Channels => (chan, 0),
                };
                placed.push(Piece { name: name.into(), input: 0, chan_off, col_off, ch, width });
                chan += ch;
                col += width;
            }
            let (c, w) = match stack {
                Stack::Columns => (pieces.iter().map(|p| p.1).max().unwrap(), col),
                Stack::Channels => (chan, pieces.iter().map(|p| p.2).max().unwrap()),
            };
            sigs.push(TensorSig { name: "x".into(), shape: [1, c, 1, padded(w)] });
        }
        InputLayout::Separate => {
            assert!(pieces.len() <= 10, "input names i0_..i9_ keep alphabetical = declaration order");
            for (i, &(name, ch, width)) in pieces.iter().enumerate() {
                placed.push(Piece { name: name.into(), input: i, chan_off: 0, col_off: 0, ch, width });
                sigs.push(TensorSig { name: format!("i{i}_{name}"), shape: [1, ch, 1, padded(width)] });
            }
        }
    }
    let mut b = Builder::new(&sigs);
    let mut vals = Vec::new();
    for p in &placed {
        let sig = &sigs[p.input];
        let input = V(sig.name.clone(), sig.shape.to_vec());
        if sig.shape == [1, p.ch, 1, p.width] {
            vals.push(input);
        } else {
            vals.push(b.slice(p.name.as_str(), &input, &[0, p.chan_off, 0, p.col_off], &[1, p.ch, 1, p.width]));
        }
    }
    (b, sigs, placed, vals)
}

/// Causal softmax probabilities `[1, H, S, S]` from q viewed `[1, KV, G·S, D]` and k `[1, KV, S, D]`.
fn probs(b: &mut Builder, dm: &Dims, qg: &V, k: &V, mask: &V) -> V {
    let sc = b.matmul("scores", qg, k, false, true);
    let sc4 = b.reshape("scores_h", &sc, &[1, dm.h, dm.s, dm.s]);
    let scale = b.scalar(1.0 / (dm.d as f32).sqrt());
    let scs = b.binary("scores_scaled", "mul", &sc4, &scale);
    let scm = b.binary("scores_masked", "add", &scs, mask);
    b.softmax("probs", &scm)
}

/// `[1, H, S, X]` viewed per kv group `[1, KV, G·S, X]` (a no-op for MHA).
fn grouped(b: &mut Builder, dm: &Dims, x: &V) -> V {
    if dm.g() == 1 {
        return x.clone();
    }
    let s = x.1[3];
    b.reshape(&format!("{}_g", x.0), x, &[1, dm.kv, dm.g() * dm.s, s])
}

fn ungrouped(b: &mut Builder, dm: &Dims, name: &str, x: &V) -> V {
    let last = x.1[3];
    b.reshape(name, x, &[1, dm.h, dm.s, last])
}

fn mask_table(s: usize) -> Vec<f32> {
    (0..s * s).map(|i| if i % s > i / s { MASK_VALUE } else { 0.0 }).collect()
}

/// cos and sin `[S, D]`, each half of a head repeating the `[S, D/2]` table.
fn rope_tables(dm: &Dims) -> (Vec<f32>, Vec<f32>) {
    let t = RopeTable::with_freqs(dm.s, &crate::ops::rope::inv_freq(dm.d, dm.theta, dm.rope_scaling.as_ref()));
    let half = dm.d / 2;
    let full = |x: &[f32]| (0..dm.s * dm.d).map(|i| x[(i / dm.d) * half + (i % dm.d) % half]).collect();
    (full(&t.cos), full(&t.sin))
}

fn finish(name: &str, b: Builder, sigs: Vec<TensorSig>, pieces: Vec<Piece>, parts: Vec<(&str, &V)>) -> Result<Kernel> {
    let mut b = b;
    let out_parts: Vec<(String, usize)> = parts.iter().map(|(n, v)| (n.to_string(), v.1[1])).collect();
    let s = parts[0].1.1[3];
    let out = if parts.len() == 1 {
        parts[0].1.clone()
    } else {
        let vals: Vec<&V> = parts.iter().map(|p| p.1).collect();
        b.concat("out", 1, &vals)
    };
    let total: usize = out_parts.iter().map(|p| p.1).sum();
    let program = super::graph::main_program(&sigs, b.body, &out.0);
    for st in &program.func.body {
        if let Some(&d) = st.ty.shape().iter().find(|&&d| d > MAX_DIM) {
            bail!(
                "kernel {name}: `{}` {} has a dimension of {d}, over the Neural Engine's limit of {MAX_DIM}; \
                 use a smaller model or sequence length",
                st.name,
                st.ty.text()
            );
        }
    }
    for sig in &sigs {
        if let Some(&d) = sig.shape.iter().find(|&&d| d > MAX_DIM) {
            bail!(
                "kernel {name}: input `{}` {:?} has a dimension of {d}, over the limit of {MAX_DIM}{}",
                sig.name,
                sig.shape,
                if sigs.len() == 1 { "; --mil-layout separate splits it into one input per tensor" } else { "" }
            );
        }
    }
    let outputs = vec![TensorSig { name: out.0.clone(), shape: [1, total, 1, s] }];
    let declared = program.func.body.iter().find(|st| st.name == out.0).map(|st| st.ty.shape().to_vec());
    ensure!(declared == Some(vec![1, total, 1, s]), "emitter bug: kernel {name}'s output is {declared:?}");
    let program = KernelProgram { name: name.into(), mil: program.text(), blobs: b.blobs, inputs: sigs, outputs };
    Ok(Kernel { program, pieces, out_parts })
}

pub fn attn_fwd(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    let (c, s, d, qd, kd) = (dm.c, dm.s, dm.d, dm.qd(), dm.kd());
    let mut pieces = vec![("xn", c, s), ("wq", c, qd), ("wk", c, kd), ("wv", c, kd)];
    if dm.qk_norm {
        ensure!(
            layout == InputLayout::Separate || d <= c,
            "the packed layout puts the QK-norm gains in a column of the input, which needs head_dim ({d}) ≤ dim ({c}); use --mil-layout separate"
        );
        pieces.extend([("qn", d, 1), ("kn", d, 1)]);
    }
    let (mut b, sigs, placed, v) = inputs(layout, Stack::Columns, &pieces);
    let xr = as_rows(&mut b, &v[0]);
    let q_raw = linear(&mut b, "q_raw", &v[1], &xr);
    let k_raw = linear(&mut b, "k_raw", &v[2], &xr);
    let vv = linear(&mut b, "v", &v[3], &xr);
    let mut q = to_heads(&mut b, "q_h", &q_raw, dm.h, d, s);
    let mut k = to_heads(&mut b, "k_h", &k_raw, dm.kv, d, s);
    if dm.qk_norm {
        let qg = b.reshape("qn_g", &v[4], &[1, 1, 1, d]);
        let kg = b.reshape("kn_g", &v[5], &[1, 1, 1, d]);
        q = head_norm(&mut b, "q_n", &q, &qg, dm.eps);
        k = head_norm(&mut b, "k_n", &k, &kg, dm.eps);
    }
    let (cos, sin) = rope_tables(dm);
    let cos = b.blob("rope_cos", &[1, 1, s, d], &cos);
    let sin = b.blob("rope_sin", &[1, 1, s, d], &sin);
    let mask = b.blob("mask", &[1, 1, s, s], &mask_table(s));
    let qr = rope(&mut b, "q_rope", &q, &cos, &sin, false);
    let kr = rope(&mut b, "k_rope", &k, &cos, &sin, false);
    let vh = to_heads(&mut b, "v_h", &vv, dm.kv, d, s);
    let qg = grouped(&mut b, dm, &qr);
    let p = probs(&mut b, dm, &qg, &kr, &mask);
    let pg = grouped(&mut b, dm, &p);
    let a = b.matmul("pv", &pg, &vh, false, false);
    let a = ungrouped(&mut b, dm, "attn_h", &a);
    let attn = from_heads(&mut b, "attn", &a);
    let q_out = from_heads(&mut b, "q", &qr);
    let k_out = from_heads(&mut b, "k", &kr);
    let mut parts = vec![("attn", &attn), ("q", &q_out), ("k", &k_out), ("v", &vv)];
    if dm.qk_norm {
        parts.extend([("q_raw", &q_raw), ("k_raw", &k_raw)]);
    }
    finish("attn_fwd", b, sigs, placed, parts)
}

/// A kernel that is one or two linear layers summed: `out = Σ Wᵢᵀ·actᵢ`.
fn linear_kernel(
    name: &str,
    layout: InputLayout,
    acts: &[(&str, usize)],
    ws: &[(&str, usize)],
    s: usize,
) -> Result<Kernel> {
    let mut pieces: Vec<(&str, usize, usize)> = acts.iter().map(|&(n, ch)| (n, ch, s)).collect();
    pieces.extend(ws.iter().zip(acts).map(|(&(n, oc), &(_, ic))| (n, ic, oc)));
    let (mut b, sigs, placed, v) = inputs(layout, Stack::Columns, &pieces);
    let na = acts.len();
    let mut sum: Option<V> = None;
    for i in 0..na {
        let r = as_rows(&mut b, &v[i]);
        let y = linear(&mut b, &format!("y{i}"), &v[na + i], &r);
        sum = Some(match sum {
            None => y,
            Some(prev) => b.binary("y", "add", &prev, &y),
        });
    }
    let out = sum.expect("at least one linear");
    finish(name, b, sigs, placed, vec![("out", &out)])
}

pub fn wo_fwd(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    linear_kernel("wo_fwd", layout, &[("attn", dm.qd())], &[("wo", dm.c)], dm.s)
}

pub fn ffn_fwd(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    let (c, f, s) = (dm.c, dm.f, dm.s);
    let pieces = [("xn", c, s), ("w1", c, f), ("w3", c, f), ("w2", c, f)];
    let (mut b, sigs, placed, v) = inputs(layout, Stack::Columns, &pieces);
    let xr = as_rows(&mut b, &v[0]);
    let h1 = linear(&mut b, "h1", &v[1], &xr);
    let h3 = linear(&mut b, "h3", &v[2], &xr);
    let sig = b.unary("sig", "sigmoid", &h1);
    let silu = b.binary("silu", "mul", &h1, &sig);
    let gate = b.binary("gate", "mul", &silu, &h3);
    // W2 is [C, F] = [out, in]: as staged it is the matmul's left operand untransposed.
    let w2 = b.reshape("w2_w", &v[3], &[1, 1, c, f]);
    let gr = as_rows(&mut b, &gate);
    let y = b.matmul("y_mm", &w2, &gr, false, false);
    let y = b.reshape("y", &y, &[1, c, 1, s]);
    finish("ffn_fwd", b, sigs, placed, vec![("out", &y), ("h1", &h1), ("h3", &h3), ("gate", &gate)])
}

pub fn ffn_bwd_w2t(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    linear_kernel("ffn_bwd_w2t", layout, &[("dout", dm.c)], &[("w2", dm.f)], dm.s)
}

/// SiLU-gate backward then both input projections' dx:
/// `dh3 = dgate·silu(h1)`, `dh1 = dgate·h3·σ(h1)·(1 + h1·(1 − σ(h1)))`, `dxn = W1ᵀ·dh1 + W3ᵀ·dh3`.
pub fn ffn_bwd_w13t(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    let (c, f, s) = (dm.c, dm.f, dm.s);
    let pieces = [("dgate", f, s), ("h1", f, s), ("h3", f, s), ("w1", f, c), ("w3", f, c)];
    let (mut b, sigs, placed, v) = inputs(layout, Stack::Columns, &pieces);
    let (dgate, h1, h3) = (&v[0], &v[1], &v[2]);
    let sig = b.unary("sig", "sigmoid", h1);
    let silu = b.binary("silu", "mul", h1, &sig);
    let dh3 = b.binary("dh3", "mul", dgate, &silu);
    let dsilu = b.binary("dsilu", "mul", dgate, h3);
    let one = b.scalar(1.0);
    let oms = b.binary("one_minus_sig", "sub", &one, &sig);
    let h_oms = b.binary("h1_oms", "mul", h1, &oms);
    let dsig = b.binary("dsilu_dh", "add", &h_oms, &one);
    let sd = b.binary("sig_dsilu", "mul", &sig, &dsig);
    let dh1 = b.binary("dh1", "mul", &dsilu, &sd);
    let r1 = as_rows(&mut b, &dh1);
    let r3 = as_rows(&mut b, &dh3);
    let y1 = linear(&mut b, "dx1", &v[3], &r1);
    let y3 = linear(&mut b, "dx3", &v[4], &r3);
    let dx = b.binary("dxn", "add", &y1, &y3);
    finish("ffn_bwd_w13t", b, sigs, placed, vec![("dxn", &dx), ("dh1", &dh1), ("dh3", &dh3)])
}

pub fn wo_bwd(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    linear_kernel("wo_bwd", layout, &[("do", dm.c)], &[("wo", dm.qd())], dm.s)
}

/// Recomputes the probabilities and gives `dv = Pᵀ·dA` (summed over each kv group) and
/// `dP = dA·Vᵀ`. Probabilities and dP leave flattened as `[1, H·S, 1, S]`.
pub fn sdpa_bwd1(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    let (s, d, qd, kd) = (dm.s, dm.d, dm.qd(), dm.kd());
    let pieces = [("q", qd, s), ("k", kd, s), ("v", kd, s), ("dattn", qd, s)];
    let (mut b, sigs, placed, v) = inputs(layout, Stack::Channels, &pieces);
    let q = to_heads(&mut b, "q_h", &v[0], dm.h, d, s);
    let k = to_heads(&mut b, "k_h", &v[1], dm.kv, d, s);
    let vh = to_heads(&mut b, "v_h", &v[2], dm.kv, d, s);
    let da = to_heads(&mut b, "da_h", &v[3], dm.h, d, s);
    let mask = b.blob("mask", &[1, 1, s, s], &mask_table(s));
    let qg = grouped(&mut b, dm, &q);
    let p = probs(&mut b, dm, &qg, &k, &mask);
    let pg = grouped(&mut b, dm, &p);
    let dag = grouped(&mut b, dm, &da);
    let dv = b.matmul("dv_h", &pg, &dag, true, false);
    let dp = b.matmul("dp_g", &dag, &vh, false, true);
    let dv = from_heads(&mut b, "dv", &dv);
    let p_flat = b.reshape("probs_flat", &p, &[1, dm.h * s, 1, s]);
    let dp_flat = b.reshape("dp_flat", &dp, &[1, dm.h * s, 1, s]);
    finish("sdpa_bwd1", b, sigs, placed, vec![("dv", &dv), ("probs", &p_flat), ("dp", &dp_flat)])
}

/// Softmax backward `dS = P ⊙ (dP − Σⱼ P⊙dP) / √D`, then `dq = dS·K`, `dk = dSᵀ·Q` (summed
/// over each kv group), each rotated back by −θ (RoPE's backward).
pub fn sdpa_bwd2(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    let (s, d, qd, kd, hs) = (dm.s, dm.d, dm.qd(), dm.kd(), dm.h * dm.s);
    let pieces = [("probs", hs, s), ("dp", hs, s), ("q", qd, s), ("k", kd, s)];
    let (mut b, sigs, placed, v) = inputs(layout, Stack::Channels, &pieces);
    let p = b.reshape("p_h", &v[0], &[1, dm.h, s, s]);
    let dp = b.reshape("dp_h", &v[1], &[1, dm.h, s, s]);
    let q = to_heads(&mut b, "q_h", &v[2], dm.h, d, s);
    let k = to_heads(&mut b, "k_h", &v[3], dm.kv, d, s);
    let pdp = b.binary("p_dp", "mul", &p, &dp);
    let rs = b.reduce_sum_last("p_dp_sum", &pdp);
    let centered = b.binary("dp_centered", "sub", &dp, &rs);
    let ds = b.binary("ds_unscaled", "mul", &p, &centered);
    let scale = b.scalar(1.0 / (d as f32).sqrt());
    let ds = b.binary("ds", "mul", &ds, &scale);
    let dsg = grouped(&mut b, dm, &ds);
    let qg = grouped(&mut b, dm, &q);
    let dq = b.matmul("dq_g", &dsg, &k, false, false);
    let dq = ungrouped(&mut b, dm, "dq_rot", &dq);
    let dk = b.matmul("dk_rot", &dsg, &qg, true, false);
    let (cos, sin) = rope_tables(dm);
    let cos = b.blob("rope_cos", &[1, 1, s, d], &cos);
    let sin = b.blob("rope_sin", &[1, 1, s, d], &sin);
    let dq = rope(&mut b, "dq_h", &dq, &cos, &sin, true);
    let dk = rope(&mut b, "dk_h", &dk, &cos, &sin, true);
    let dq = from_heads(&mut b, "dq", &dq);
    let dk = from_heads(&mut b, "dk", &dk);
    finish("sdpa_bwd2", b, sigs, placed, vec![("dq", &dq), ("dk", &dk)])
}

pub fn q_bwd(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    linear_kernel("q_bwd", layout, &[("dq", dm.qd())], &[("wq", dm.c)], dm.s)
}

pub fn kv_bwd(dm: &Dims, layout: InputLayout) -> Result<Kernel> {
    linear_kernel("kv_bwd", layout, &[("dk", dm.kd()), ("dv", dm.kd())], &[("wk", dm.c), ("wv", dm.c)], dm.s)
}

/// How the classifier is split so that no dimension passes `MAX_DIM`: `count` chunks of
/// `rows` vocabulary rows each (a multiple of 16; the last chunk is zero-padded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunks {
    pub rows: usize,
    pub count: usize,
}

pub fn classifier_chunks(v: usize, s: usize, layout: InputLayout) -> Chunks {
    // Packed, the chunk sits beside the S activation columns in one input.
    let limit = match layout {
        InputLayout::Packed => (MAX_DIM.saturating_sub(s) / SPATIAL_GRANULE * SPATIAL_GRANULE).max(SPATIAL_GRANULE),
        InputLayout::Separate => MAX_DIM,
    };
    let mut count = v.div_ceil(limit);
    loop {
        let rows = padded(v.div_ceil(count));
        if rows <= limit {
            return Chunks { rows, count };
        }
        count += 1;
    }
}

/// Logits of one vocabulary chunk: `logits [1, rows, 1, S] = E_chunk · xf`, with the chunk of
/// the (tied or untied) classifier staged transposed as `[C, rows]`. One program serves every
/// chunk (a chunk per slot); a 151,936-row classifier becomes 3 chunks of 50,656.
pub fn classifier(dm: &Dims, layout: InputLayout) -> Result<(Kernel, Chunks)> {
    let chunks = classifier_chunks(dm.v, dm.s, layout);
    let k = linear_kernel("classifier", layout, &[("xf", dm.c)], &[("e", chunks.rows)], dm.s)?;
    Ok((k, chunks))
}

/// The whole kernel set for one model and sequence length, in execution order.
#[derive(Clone, Debug)]
pub struct KernelSet {
    pub dims: Dims,
    pub layout: InputLayout,
    pub attn_fwd: Kernel,
    pub wo_fwd: Kernel,
    pub ffn_fwd: Kernel,
    pub ffn_bwd_w2t: Kernel,
    pub ffn_bwd_w13t: Kernel,
    pub wo_bwd: Kernel,
    pub sdpa_bwd1: Kernel,
    pub sdpa_bwd2: Kernel,
    pub q_bwd: Kernel,
    pub kv_bwd: Kernel,
    /// Not part of the per-layer set: the classifier, split into chunks.
    pub classifier: Kernel,
    pub classifier_chunks: Chunks,
}

impl KernelSet {
    pub fn new(cfg: &ModelConfig, t: usize, layout: InputLayout) -> Result<Self> {
        let dm = Dims::new(cfg, t)?;
        // The biggest tables are the two [S, S] causal masks (f32 while built, fp16 in the blob).
        crate::memory::ensure_fits(
            &format!("the MIL kernel set at T={t}"),
            crate::memory::bytes(2 * (4 + 2), &[dm.s, dm.s]),
            "lower --seq",
        )?;
        Ok(KernelSet {
            attn_fwd: attn_fwd(&dm, layout)?,
            wo_fwd: wo_fwd(&dm, layout)?,
            ffn_fwd: ffn_fwd(&dm, layout)?,
            ffn_bwd_w2t: ffn_bwd_w2t(&dm, layout)?,
            ffn_bwd_w13t: ffn_bwd_w13t(&dm, layout)?,
            wo_bwd: wo_bwd(&dm, layout)?,
            sdpa_bwd1: sdpa_bwd1(&dm, layout)?,
            sdpa_bwd2: sdpa_bwd2(&dm, layout)?,
            q_bwd: q_bwd(&dm, layout)?,
            kv_bwd: kv_bwd(&dm, layout)?,
            // after the layer kernels, so a too-wide model is reported by its first kernel
            classifier: classifier(&dm, layout)?.0,
            classifier_chunks: classifier_chunks(dm.v, dm.s, layout),
            dims: dm,
            layout,
        })
    }

    pub fn all(&self) -> [&Kernel; 10] {
        [
            &self.attn_fwd,
            &self.wo_fwd,
            &self.ffn_fwd,
            &self.ffn_bwd_w2t,
            &self.ffn_bwd_w13t,
            &self.wo_bwd,
            &self.sdpa_bwd1,
            &self.sdpa_bwd2,
            &self.q_bwd,
            &self.kv_bwd,
        ]
    }
}
