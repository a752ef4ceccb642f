//! The fp16 MIL simulator: runs a parsed, type-checked program the way the Neural Engine is
//! documented to, so everything around the hardware can be verified here.
//!
//! Numeric model:
//! - every fp16 tensor holds values exactly representable in fp16 (kept in f32 storage);
//! - element-wise ops compute in f32 and round once to fp16; for mul, add and sub of fp16
//!   operands that is the correctly rounded fp16 result (products are exact in f32, and a
//!   24-bit intermediate suffices for sums rounded to 11 bits);
//! - `matmul` accumulates in f32, then rounds; results beyond ±32752 become ±inf, the
//!   saturation point reported for the hardware's matmul (constraints §1, ANEForge), below
//!   fp16's own 65504;
//! - `softmax` and `reduce_sum` compute in f32, then round;
//! - `conv` (1×1) accumulates in f32 and rounds (no 32752 cliff: reported for matmul only);
//! - int8 tensors hold integers in the same f32 storage; `quantize` rounds half to even and
//!   saturates to [−128, 127], `dequantize` and `constexpr_affine_dequantize` round
//!   scale · q to fp16 (semantics in `types`);
//! - overflow rounds to ±inf, as fp16 does; NaN propagates.
//!
//! Inputs are read from, and outputs written to, fp16 buffers in the hardware's dense
//! `[1, C, 1, W]` row-major layout; BLOBFILE constants are read through the blob format.

use super::ast::{Arg, Literal, Program, Type};
use super::blob::{read_blob, read_blob_i8};
use super::parse::parse;
use super::{KernelProgram, KernelRunner};
use crate::ops::Par;
use crate::ops::matmul::{Operand, sgemm};
use anyhow::{Context, Result, bail, ensure};
use half::f16;
use std::borrow::Cow;
use std::collections::HashMap;

/// The reported saturation point of the hardware's fp16 matmul output.
pub const MATMUL_SATURATION: f32 = 32752.0;

#[inline]
fn r16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// An fp16 tensor (values exactly representable in fp16, stored as f32).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Calls `f(flat_out, offsets)` for every element of `out_shape`, with each source's flat
/// index computed from its strides (0 on broadcast axes).
fn for_each_index(out_shape: &[usize], srcs: &[Vec<usize>], mut f: impl FnMut(usize, &[usize])) {
    let rank = out_shape.len();
    let total: usize = out_shape.iter().product();
    let mut idx = vec![0usize; rank];
    let mut offs = vec![0usize; srcs.len()];
    for flat in 0..total {
        f(flat, &offs);
        for ax in (0..rank).rev() {
            idx[ax] += 1;
            for (o, s) in offs.iter_mut().zip(srcs) {
                *o += s[ax];
            }
            if idx[ax] < out_shape[ax] {
                break;
            }
            for (o, s) in offs.iter_mut().zip(srcs) {
                *o -= s[ax] * out_shape[ax];
            }
            idx[ax] = 0;
        }
    }
}

/// Like `for_each_index`, a row at a time: `f(flat_out_start, offsets, len)` for each run of
/// the last axis, where source k's elements are at `offsets[k] + j·srcs[k][last]`, j < len.
/// The per-element bookkeeping of `for_each_index` dominated the simulator's time.
fn for_each_row(out_shape: &[usize], srcs: &[Vec<usize>], mut f: impl FnMut(usize, &[usize], usize)) {
    match out_shape.split_last() {
        None => f(0, &vec![0; srcs.len()], 1),
        Some((&len, outer)) => {
            let outer_srcs: Vec<Vec<usize>> = srcs.iter().map(|s| s[..s.len() - 1].to_vec()).collect();
            for_each_index(outer, &outer_srcs, |i, o| f(i * len, o, len));
        }
    }
}

/// Strides of `shape` read as `out_shape` under right-aligned broadcasting.
fn broadcast_strides(shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let st = strides(shape);
    let pad = out_shape.len() - shape.len();
    (0..out_shape.len()).map(|i| if i < pad || shape[i - pad] == 1 { 0 } else { st[i - pad] }).collect()
}

/// A value during a run: a tensor (blob constants borrowed from the loaded program, not
/// copied on every evaluation) or a literal.
enum Val<'a> {
    T(Cow<'a, Tensor>),
    Lit(Literal),
}

/// A loaded program: parsed, checked, blob constants read.
pub struct Sim {
    pub program: Program,
    blobs: HashMap<String, Tensor>,
    par: Par,
}

impl Sim {
    /// Parses `kernel.mil` and reads every BLOBFILE constant from `kernel.blobs`.
    pub fn load(kernel: &KernelProgram, par: Par) -> Result<Sim> {
        let program = parse(&kernel.mil).with_context(|| format!("kernel {}", kernel.name))?;
        let declared: Vec<(String, Type)> =
            kernel.inputs.iter().map(|s| (s.name.clone(), Type::fp16(&s.shape))).collect();
        ensure!(
            program.func.inputs == declared,
            "kernel {}: the program's inputs differ from the kernel signature",
            kernel.name
        );
        let outs: Vec<(String, Type)> = program
            .func
            .outputs
            .iter()
            .map(|o| {
                let ty = program
                    .func
                    .body
                    .iter()
                    .find(|s| &s.name == o)
                    .map_or(Type::Scalar(super::ast::DType::Fp16), |s| s.ty.clone());
                (o.clone(), ty)
            })
            .collect();
        let want: Vec<(String, Type)> = kernel.outputs.iter().map(|s| (s.name.clone(), Type::fp16(&s.shape))).collect();
        ensure!(outs == want, "kernel {}: the program's outputs differ from the kernel signature", kernel.name);
        // Every BLOBFILE constant, and every compile-time dequantization, is materialised once.
        let read = |lit: &Literal| -> Result<Tensor> {
            let Literal::Blob { ty, path, offset } = lit else { unreachable!("called on blobs only") };
            let rel = path.strip_prefix("@model_path/").with_context(|| {
                format!("kernel {}: BLOBFILE path {path} must start with @model_path/", kernel.name)
            })?;
            let Some((_, file)) = kernel.blobs.iter().find(|(p, _)| p == rel) else {
                bail!("kernel {}: weight file {rel} is missing", kernel.name);
            };
            let shape = ty.shape().to_vec();
            let n = shape.iter().product();
            let data = match ty.dtype() {
                super::ast::DType::Int8 => read_blob_i8(file, *offset, n, rel)?.iter().map(|&q| q as f32).collect(),
                _ => read_blob(file, *offset, n, rel)?.iter().map(|h| h.to_f32()).collect(),
            };
            Ok(Tensor { shape, data })
        };
        let mut blobs = HashMap::new();
        for st in &program.func.body {
            if let Some(lit @ Literal::Blob { .. }) = &st.val {
                blobs.insert(st.name.clone(), read(lit)?);
            } else if st.op == "constexpr_affine_dequantize" {
                let attr = |k: &str| &st.attrs.iter().find(|(n, _)| n == k).expect("parser checked the attributes").1;
                let q = read(attr("quantized_data"))?;
                let ax = match attr("axis") {
                    Literal::Int32(a) => super::types::axis(*a, q.shape.len())?,
                    _ => unreachable!("parser checked: axis is int32"),
                };
                let scales = match attr("scale") {
                    Literal::Fp16(s) => vec![*s],
                    blob => read(blob)?.data,
                };
                blobs.insert(st.name.clone(), affine_dequantize(&q, &scales, ax));
            }
        }
        Ok(Sim { program, blobs, par })
    }

    /// Runs the program on fp16 inputs (in declaration order); returns the outputs.
    pub fn run(&self, inputs: &[&[f16]]) -> Result<Vec<Tensor>> {
        let f = &self.program.func;
        ensure!(inputs.len() == f.inputs.len(), "{} inputs given, the program takes {}", inputs.len(), f.inputs.len());
        let mut env: HashMap<&str, Val> = HashMap::new();
        for ((name, ty), data) in f.inputs.iter().zip(inputs) {
            let shape = ty.shape().to_vec();
            ensure!(
                data.len() == shape.iter().product::<usize>(),
                "input {name}: {} values for shape {shape:?}",
                data.len()
            );
            env.insert(name, Val::T(Cow::Owned(Tensor { shape, data: data.iter().map(|h| h.to_f32()).collect() })));
        }
        for st in &f.body {
            let v = if st.op == "const" || st.op == "constexpr_affine_dequantize" {
                match self.blobs.get(&st.name) {
                    Some(t) => Val::T(Cow::Borrowed(t)),
                    None => Val::Lit(st.val.clone().expect("parser checked: const has a val")),
                }
            } else {
                let get = |k: &str| -> &Val {
                    match st.args.iter().find(|(n, _)| n == k) {
                        Some((_, Arg::Name(n))) => &env[n.as_str()],
                        _ => panic!("parser checked: {} has argument {k}", st.op),
                    }
                };
                Val::T(Cow::Owned(self.eval_op(&st.op, &get, st, &env)?))
            };
            env.insert(&st.name, v);
        }
        f.outputs
            .iter()
            .map(|o| match env.remove(o.as_str()) {
                Some(Val::T(t)) => Ok(t.into_owned()),
                _ => bail!("output {o} is not a tensor"),
            })
            .collect()
    }

    fn eval_op<'a>(
        &self,
        op: &str,
        get: &dyn Fn(&str) -> &'a Val<'a>,
        st: &super::ast::Stmt,
        env: &'a HashMap<&str, Val<'a>>,
    ) -> Result<Tensor> {
        let t = |k: &str| -> &'a Tensor {
            match get(k) {
                Val::T(t) => t,
                Val::Lit(_) => panic!("parser checked: `{k}` of {op} is a tensor"),
            }
        };
        let ints = |k: &str| -> Vec<i64> {
            match get(k) {
                Val::Lit(Literal::IntTensor(_, v)) => v.clone(),
                _ => panic!("parser checked: `{k}` of {op} is an int tensor"),
            }
        };
        let int = |k: &str| -> i64 {
            match get(k) {
                Val::Lit(Literal::Int32(i)) => *i,
                _ => panic!("parser checked: `{k}` of {op} is an int"),
            }
        };
        let boolean = |k: &str| -> bool {
            match get(k) {
                Val::Lit(Literal::Bool(b)) => *b,
                _ => panic!("parser checked: `{k}` of {op} is a bool"),
            }
        };
        let out_shape = st.ty.shape().to_vec();
        Ok(match op {
            "slice_by_size" => slice(t("x"), &ints("begin"), &out_shape),
            "reshape" => Tensor { shape: out_shape, data: t("x").data.clone() },
            "transpose" => transpose(t("x"), &ints("perm")),
            "matmul" => matmul(self.par, t("x"), t("y"), boolean("transpose_x"), boolean("transpose_y"), &out_shape),
            "concat" => {
                let Some((_, Arg::Tuple(names))) = st.args.iter().find(|(n, _)| n == "values") else {
                    panic!("parser checked: concat has values")
                };
                let vals: Vec<&Tensor> = names
                    .iter()
                    .map(|n| match &env[n.as_str()] {
                        Val::T(t) => t.as_ref(),
                        Val::Lit(_) => panic!("parser checked: concat values are tensors"),
                    })
                    .collect();
                let ax = super::types::axis(int("axis"), out_shape.len())?;
                concat(&vals, ax, &out_shape)
            }
            "softmax" => {
                let x = t("x");
                let ax = super::types::axis(int("axis"), x.shape.len())?;
                softmax(x, ax)
            }
            "reduce_sum" => {
                let x = t("x");
                let axes: Vec<usize> =
                    ints("axes").iter().map(|&a| super::types::axis(a, x.shape.len())).collect::<Result<_>>()?;
                reduce_sum(x, &axes, &out_shape)
            }
            "pow" => {
                let Val::Lit(Literal::Fp16(e)) = get("y") else { panic!("parser checked: pow exponent") };
                let x = t("x");
                Tensor { shape: out_shape, data: x.data.iter().map(|&v| r16(v.powf(*e))).collect() }
            }
            "conv" => conv(self.par, t("x"), t("weight"), &out_shape),
            "quantize" => {
                let Val::Lit(Literal::Fp16(s)) = get("scale") else { panic!("parser checked: scale") };
                Tensor { shape: out_shape, data: t("input").data.iter().map(|&x| quantize(x, *s)).collect() }
            }
            "dequantize" => {
                let Val::Lit(Literal::Fp16(s)) = get("scale") else { panic!("parser checked: scale") };
                Tensor { shape: out_shape, data: t("input").data.iter().map(|&q| r16(s * q)).collect() }
            }
            "sigmoid" => {
                let x = t("x");
                Tensor { shape: out_shape, data: x.data.iter().map(|&v| r16(1.0 / (1.0 + (-v).exp()))).collect() }
            }
            "mul" | "add" | "sub" => {
                let operand = |k: &str| -> (Vec<usize>, &'a [f32]) {
                    match get(k) {
                        Val::T(t) => (t.shape.clone(), &t.data),
                        Val::Lit(Literal::Fp16(x)) => (vec![], std::slice::from_ref(x)),
                        Val::Lit(_) => panic!("parser checked: {op} operands are fp16"),
                    }
                };
                let ((xs, xd), (ys, yd)) = (operand("x"), operand("y"));
                let f: fn(f32, f32) -> f32 = match op {
                    "mul" => |a, b| a * b,
                    "add" => |a, b| a + b,
                    _ => |a, b| a - b,
                };
                let srcs = [broadcast_strides(&xs, &out_shape), broadcast_strides(&ys, &out_shape)];
                let (sx, sy) = (srcs[0].last().copied().unwrap_or(0), srcs[1].last().copied().unwrap_or(0));
                let mut data = vec![0.0; out_shape.iter().product()];
                for_each_row(&out_shape, &srcs, |i, o, len| {
                    for (j, d) in data[i..i + len].iter_mut().enumerate() {
                        *d = r16(f(xd[o[0] + j * sx], yd[o[1] + j * sy]));
                    }
                });
                Tensor { shape: out_shape, data }
            }
            _ => bail!("unsupported op `{op}`"),
        })
    }
}

/// MIL `quantize` to int8 with zero point 0: clip(round_half_even(x / scale), −128, 127),
/// the quotient rounded to fp16 first (the op divides fp16 values, as Apple's reference
/// implementation does in numpy). NaN, which has no int8 value, becomes 0.
pub fn quantize(x: f32, scale: f32) -> f32 {
    let q = r16(x / scale).round_ties_even();
    if q.is_nan() { 0.0 } else { q.clamp(-128.0, 127.0) }
}

/// `constexpr_affine_dequantize` with zero point 0: scale · q rounded to fp16, the scale per
/// tensor (one value) or per index along `ax`.
fn affine_dequantize(q: &Tensor, scales: &[f32], ax: usize) -> Tensor {
    let inner: usize = q.shape[ax + 1..].iter().product();
    let len = q.shape[ax];
    let data = q
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| r16(v * if scales.len() == 1 { scales[0] } else { scales[(i / inner) % len] }))
        .collect();
    Tensor { shape: q.shape.clone(), data }
}

/// 1×1 convolution `[N, C, H, W]` by `[OC, C, 1, 1]`: per image, W [OC, C] · X [C, H·W],
/// accumulated in f32 and rounded to fp16 (overflow gives ±inf; the 32752 matmul cliff is
/// not reported for conv, so it is not applied).
fn conv(par: Par, x: &Tensor, w: &Tensor, out_shape: &[usize]) -> Tensor {
    let (n, c, hw) = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3]);
    let oc = w.shape[0];
    let mut data = vec![0.0f32; out_shape.iter().product()];
    for b in 0..n {
        let xs = &x.data[b * c * hw..(b + 1) * c * hw];
        sgemm(
            par,
            oc,
            hw,
            c,
            Operand::n(&w.data, c),
            Operand::n(xs, hw),
            &mut data[b * oc * hw..(b + 1) * oc * hw],
            hw,
            false,
        );
    }
    for v in &mut data {
        *v = r16(*v);
    }
    Tensor { shape: out_shape.to_vec(), data }
}

fn slice(x: &Tensor, begin: &[i64], size: &[usize]) -> Tensor {
    let st = strides(&x.shape);
    let base: usize = begin.iter().zip(&st).map(|(&b, &s)| b as usize * s).sum();
    let mut data = vec![0.0; size.iter().product()];
    // The last axis of a slice is contiguous in the source.
    for_each_row(size, std::slice::from_ref(&st), |i, o, len| {
        data[i..i + len].copy_from_slice(&x.data[base + o[0]..base + o[0] + len]);
    });
    Tensor { shape: size.to_vec(), data }
}

fn transpose(x: &Tensor, perm: &[i64]) -> Tensor {
    let st = strides(&x.shape);
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p as usize]).collect();
    let src: Vec<usize> = perm.iter().map(|&p| st[p as usize]).collect();
    let mut data = vec![0.0; x.data.len()];
    let step = *src.last().unwrap_or(&1);
    for_each_row(&shape, std::slice::from_ref(&src), |i, o, len| {
        for (j, d) in data[i..i + len].iter_mut().enumerate() {
            *d = x.data[o[0] + j * step];
        }
    });
    Tensor { shape, data }
}

fn concat(vals: &[&Tensor], ax: usize, out_shape: &[usize]) -> Tensor {
    let outer: usize = out_shape[..ax].iter().product();
    let mut data = Vec::with_capacity(out_shape.iter().product());
    for o in 0..outer {
        for v in vals {
            let inner: usize = v.shape[ax..].iter().product();
            data.extend_from_slice(&v.data[o * inner..(o + 1) * inner]);
        }
    }
    Tensor { shape: out_shape.to_vec(), data }
}

fn softmax(x: &Tensor, ax: usize) -> Tensor {
    let len = x.shape[ax];
    let inner: usize = x.shape[ax + 1..].iter().product();
    let outer: usize = x.shape[..ax].iter().product();
    let mut data = x.data.clone();
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let max = (0..len).map(|j| x.data[at(j)]).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..len).map(|j| (x.data[at(j)] - max).exp()).sum();
            for j in 0..len {
                data[at(j)] = r16((x.data[at(j)] - max).exp() / sum);
            }
        }
    }
    Tensor { shape: x.shape.clone(), data }
}

fn reduce_sum(x: &Tensor, axes: &[usize], out_shape: &[usize]) -> Tensor {
    // Accumulate into the kept-dims shape, then relabel with the declared shape.
    let kept: Vec<usize> = x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let dst = broadcast_strides(&kept, &x.shape);
    let mut acc = vec![0.0f32; kept.iter().product()];
    let step = *dst.last().unwrap_or(&0);
    for_each_row(&x.shape, std::slice::from_ref(&dst), |i, o, len| {
        for (j, &v) in x.data[i..i + len].iter().enumerate() {
            acc[o[0] + j * step] += v;
        }
    });
    Tensor { shape: out_shape.to_vec(), data: acc.into_iter().map(r16).collect() }
}

fn matmul(par: Par, x: &Tensor, y: &Tensor, tx: bool, ty: bool, out_shape: &[usize]) -> Tensor {
    let r = out_shape.len();
    let (m, n) = (out_shape[r - 2], out_shape[r - 1]);
    let k = if tx { x.shape[r - 2] } else { x.shape[r - 1] };
    let batch_shape = &out_shape[..r - 2];
    let (xs, ys) = (x.shape[r - 2] * x.shape[r - 1], y.shape[r - 2] * y.shape[r - 1]);
    // Batch strides in units of whole matrices.
    let bx: Vec<usize> = broadcast_strides(&x.shape[..r - 2], batch_shape).iter().map(|s| s * xs).collect();
    let by: Vec<usize> = broadcast_strides(&y.shape[..r - 2], batch_shape).iter().map(|s| s * ys).collect();
    let mut data = vec![0.0f32; out_shape.iter().product()];
    let (ldx, ldy) = (x.shape[r - 1], y.shape[r - 1]);
    let mut jobs = Vec::new();
    for_each_index(batch_shape, &[bx, by], |i, o| jobs.push((i, o[0], o[1])));
    for (i, ox, oy) in jobs {
        let a = if tx { Operand::t(&x.data[ox..ox + xs], ldx) } else { Operand::n(&x.data[ox..ox + xs], ldx) };
        let b = if ty { Operand::t(&y.data[oy..oy + ys], ldy) } else { Operand::n(&y.data[oy..oy + ys], ldy) };
        sgemm(par, m, n, k, a, b, &mut data[i * m * n..(i + 1) * m * n], n, false);
    }
    for v in &mut data {
        *v = if v.abs() > MATMUL_SATURATION { f32::INFINITY.copysign(*v) } else { r16(*v) };
    }
    Tensor { shape: out_shape.to_vec(), data }
}

/// The simulator as a `KernelRunner`: each slot's inputs are plain fp16 vectors.
pub struct SimRunner {
    par: Par,
    /// `None` once unloaded (handles are never reused).
    kernels: Vec<Option<SimKernel>>,
}

struct SimKernel {
    sim: Sim,
    /// `[slot][input]` fp16 buffers
    inputs: Vec<Vec<Vec<f16>>>,
    outputs: Vec<Vec<f16>>,
}

impl SimRunner {
    pub fn new(par: Par) -> Self {
        SimRunner { par, kernels: Vec::new() }
    }
}

impl KernelRunner for SimRunner {
    fn name(&self) -> &'static str {
        "mil-sim"
    }

    fn load(&mut self, program: &KernelProgram, slots: usize) -> Result<usize> {
        // What the hardware runner would refuse, the simulator refuses too.
        super::rules::check_program(program, slots)?;
        let sim = Sim::load(program, self.par)?;
        let inputs = (0..slots).map(|_| program.inputs.iter().map(|s| vec![f16::ZERO; s.elems()]).collect()).collect();
        let outputs = program.outputs.iter().map(|s| vec![f16::ZERO; s.elems()]).collect();
        self.kernels.push(Some(SimKernel { sim, inputs, outputs }));
        Ok(self.kernels.len() - 1)
    }

    fn write_input(
        &mut self,
        kernel: usize,
        slot: usize,
        input: usize,
        fill: &mut dyn FnMut(&mut [f16]),
    ) -> Result<()> {
        let k = self
            .kernels
            .get_mut(kernel)
            .and_then(Option::as_mut)
            .context("no such kernel (never loaded, or unloaded)")?;
        let buf = k.inputs.get_mut(slot).and_then(|s| s.get_mut(input)).context("no such slot or input")?;
        fill(buf);
        Ok(())
    }

    fn eval(&mut self, kernel: usize, slot: usize) -> Result<()> {
        let k = self
            .kernels
            .get_mut(kernel)
            .and_then(Option::as_mut)
            .context("no such kernel (never loaded, or unloaded)")?;
        let ins: Vec<&[f16]> = k.inputs.get(slot).context("no such slot")?.iter().map(|v| v.as_slice()).collect();
        let outs = k.sim.run(&ins)?;
        for (dst, src) in k.outputs.iter_mut().zip(outs) {
            for (d, s) in dst.iter_mut().zip(&src.data) {
                *d = f16::from_f32(*s);
            }
        }
        Ok(())
    }

    fn read_output(&mut self, kernel: usize, output: usize, read: &mut dyn FnMut(&[f16])) -> Result<()> {
        let k =
            self.kernels.get(kernel).and_then(Option::as_ref).context("no such kernel (never loaded, or unloaded)")?;
        read(k.outputs.get(output).context("no such output")?);
        Ok(())
    }

    fn compiles(&self) -> usize {
        self.kernels.len()
    }

    fn unload(&mut self, kernel: usize) -> Result<()> {
        let k = self.kernels.get_mut(kernel).context("no such kernel")?;
        ensure!(k.take().is_some(), "kernel {kernel} is already unloaded");
        Ok(())
    }
}
