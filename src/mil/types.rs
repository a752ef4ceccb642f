//! Type inference for every op of the subset: the one place that knows each op's arguments
//! and output shape. The emitter uses it to write declared types, the parser to check them,
//! and the interpreter trusts programs that passed it.
//!
//! Ops and arguments (names as the original system used them, facts §4.4):
//! `slice_by_size(x, begin, size)`, `reshape(x, shape)`, `transpose(x, perm)`,
//! `matmul(x, y, transpose_x, transpose_y)`, `concat(values, axis, interleave)`,
//! `softmax(x, axis)`, `reduce_sum(x, axes, keep_dims)`, `pow(x, y)`, `mul/add/sub(x, y)`,
//! `sigmoid(x)`, `conv(x, weight, strides, pad_type, pad, dilations, groups)` (1×1 only);
//! int8: `quantize(input, scale, output_dtype, zero_point?)`, `dequantize(input, scale,
//! zero_point?)` and the attribute-only `constexpr_affine_dequantize()[quantized_data, scale,
//! zero_point, axis]` (per-tensor scale, or a per-channel fp16 vector for the constexpr).
//! Index arguments must be constants; float tensors are fp16.
//!
//! Quantization semantics (Apple's MIL op definitions, coremltools `iOS16/constexpr_ops.py`
//! and `iOS17/quantization_ops.py`): `quantize` = clip(round(x / scale) + zero_point, −128,
//! 127) with round = round-half-to-even (numpy's `around`), the division done on fp16
//! values; `dequantize` and `constexpr_affine_dequantize` = scale · (q − zero_point), rounded
//! to fp16. Only zero point 0 (symmetric) is accepted.

use super::ast::{DType, Literal, Type};
use anyhow::{Result, bail, ensure};

/// What the checker knows about an argument: its type and, for constants, its value.
#[derive(Clone, Debug)]
pub enum ArgInfo {
    Value(Type, Option<Literal>),
    Tuple(Vec<Type>),
}

/// Per-op argument names: every one required except those `optional` lists.
fn signature(op: &str) -> Option<&'static [&'static str]> {
    Some(match op {
        "slice_by_size" => &["x", "begin", "size"],
        "reshape" => &["x", "shape"],
        "transpose" => &["x", "perm"],
        "matmul" => &["x", "y", "transpose_x", "transpose_y"],
        "concat" => &["values", "axis", "interleave"],
        "softmax" => &["x", "axis"],
        "reduce_sum" => &["x", "axes", "keep_dims"],
        "pow" | "mul" | "add" | "sub" => &["x", "y"],
        "sigmoid" => &["x"],
        "conv" => &["x", "weight", "strides", "pad_type", "pad", "dilations", "groups"],
        "quantize" => &["input", "scale", "output_dtype", "zero_point"],
        "dequantize" => &["input", "scale", "zero_point"],
        "constexpr_affine_dequantize" => &["quantized_data", "scale", "zero_point", "axis"],
        _ => return None,
    })
}

fn optional(op: &str, arg: &str) -> bool {
    matches!((op, arg), ("quantize" | "dequantize", "zero_point"))
}

/// Ops whose parameters are all attributes (`op()[name = …, quantized_data = …]`), not
/// arguments: the compile-time `constexpr_*` family.
pub fn attribute_only(op: &str) -> bool {
    op.starts_with("constexpr_")
}

/// The oldest opset (`iosNN`) that defines `op` (Apple's MIL op definitions:
/// `constexpr_affine_dequantize` came with iOS 16, `quantize`/`dequantize` with iOS 17, the
/// rest with iOS 15).
pub fn min_opset(op: &str) -> u32 {
    match op {
        "constexpr_affine_dequantize" => 16,
        "quantize" | "dequantize" => 17,
        _ => 15,
    }
}

pub fn is_supported(op: &str) -> bool {
    op == "const" || signature(op).is_some()
}

struct Args<'a>(&'a [(String, ArgInfo)]);

impl<'a> Args<'a> {
    fn has(&self, k: &str) -> bool {
        self.0.iter().any(|(n, _)| n == k)
    }

    /// A constant fp16 scalar that is finite and above zero (a quantization scale).
    fn scale(&self, k: &str) -> Result<f32> {
        match self.konst(k)? {
            Literal::Fp16(x) if x.is_finite() && *x > 0.0 => Ok(*x),
            Literal::Fp16(x) => bail!("`{k}` must be a positive finite scale, found {x}"),
            l => bail!("`{k}` must be an fp16 scalar constant, found {}", l.ty().text()),
        }
    }

    /// An optional int8 zero point; only 0 (symmetric quantization) is supported.
    fn zero_point(&self, k: &str) -> Result<()> {
        if self.has(k) {
            match self.konst(k)? {
                Literal::Int8(0) => {}
                Literal::Int8(z) => bail!("`{k}` = {z}: only symmetric quantization (zero point 0) is supported"),
                l => bail!("`{k}` must be an int8 scalar constant, found {}", l.ty().text()),
            }
        }
        Ok(())
    }

    fn tensor_of(&self, k: &str, d: DType) -> Result<&'a [usize]> {
        match self.ty(k)? {
            Type::Tensor(t, s) if *t == d => Ok(s),
            t => bail!("argument `{k}` must be an {} tensor, found {}", d.as_str(), t.text()),
        }
    }

    fn get(&self, k: &str) -> Result<&'a ArgInfo> {
        match self.0.iter().find(|(n, _)| n == k) {
            Some((_, a)) => Ok(a),
            None => bail!("missing argument `{k}`"),
        }
    }

    fn ty(&self, k: &str) -> Result<&'a Type> {
        match self.get(k)? {
            ArgInfo::Value(t, _) => Ok(t),
            ArgInfo::Tuple(_) => bail!("argument `{k}` must be a single value, not a tuple"),
        }
    }

    /// An fp16 tensor argument's shape.
    fn fp16(&self, k: &str) -> Result<&'a [usize]> {
        match self.ty(k)? {
            Type::Tensor(DType::Fp16, s) => Ok(s),
            t => bail!("argument `{k}` must be an fp16 tensor, found {}", t.text()),
        }
    }

    fn konst(&self, k: &str) -> Result<&'a Literal> {
        match self.get(k)? {
            ArgInfo::Value(_, Some(l)) => Ok(l),
            _ => bail!("argument `{k}` must be a constant"),
        }
    }

    fn ints(&self, k: &str) -> Result<&'a [i64]> {
        match self.konst(k)? {
            Literal::IntTensor(s, v) if s.len() == 1 => Ok(v),
            l => bail!("argument `{k}` must be a rank-1 int32 tensor constant, found {}", l.ty().text()),
        }
    }

    fn int(&self, k: &str) -> Result<i64> {
        match self.konst(k)? {
            Literal::Int32(i) => Ok(*i),
            l => bail!("argument `{k}` must be an int32 constant, found {}", l.ty().text()),
        }
    }

    fn boolean(&self, k: &str) -> Result<bool> {
        match self.konst(k)? {
            Literal::Bool(b) => Ok(*b),
            l => bail!("argument `{k}` must be a bool constant, found {}", l.ty().text()),
        }
    }
}

/// Element count of a shape, or `None` if it overflows.
pub fn elems(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Normalises a possibly negative axis against `rank`.
pub fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    ensure!(-r <= a && a < r, "axis {a} out of range for rank {rank}");
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

/// Numpy-style broadcast of two shapes (aligned at the last axis).
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        ensure!(da == db || da == 1 || db == 1, "shapes {a:?} and {b:?} do not broadcast");
        out[i] = da.max(db);
    }
    Ok(out)
}

/// Output shape of `matmul` (batch dims broadcast, last two multiplied).
pub fn matmul_shape(x: &[usize], y: &[usize], tx: bool, ty: bool) -> Result<Vec<usize>> {
    ensure!(x.len() >= 2 && x.len() == y.len(), "matmul needs operands of equal rank ≥ 2, got {x:?} and {y:?}");
    let r = x.len();
    let (m, kx) = if tx { (x[r - 1], x[r - 2]) } else { (x[r - 2], x[r - 1]) };
    let (ky, n) = if ty { (y[r - 1], y[r - 2]) } else { (y[r - 2], y[r - 1]) };
    ensure!(
        kx == ky,
        "matmul inner dimensions differ: {x:?}{} · {y:?}{}",
        if tx { "ᵀ" } else { "" },
        if ty { "ᵀ" } else { "" }
    );
    let mut out = broadcast(&x[..r - 2], &y[..r - 2])?;
    out.extend([m, n]);
    Ok(out)
}

/// Infers the output type of `op` applied to `args`, or says what is wrong.
pub fn infer(op: &str, args: &[(String, ArgInfo)]) -> Result<Type> {
    let Some(sig) = signature(op) else { bail!("unsupported op `{op}`") };
    for (k, _) in args {
        ensure!(sig.contains(&k.as_str()), "unexpected argument `{k}`");
    }
    for k in sig {
        ensure!(optional(op, k) || args.iter().any(|(n, _)| n == k), "missing argument `{k}`");
    }
    let a = Args(args);
    let shape = match op {
        "slice_by_size" => {
            let x = a.fp16("x")?;
            let (begin, size) = (a.ints("begin")?, a.ints("size")?);
            ensure!(begin.len() == x.len() && size.len() == x.len(), "begin/size must have rank {}", x.len());
            for i in 0..x.len() {
                ensure!(
                    begin[i] >= 0 && size[i] > 0 && begin[i].saturating_add(size[i]) <= x[i] as i64,
                    "slice [{}, {}) of axis {i} is outside 0..{}",
                    begin[i],
                    begin[i].saturating_add(size[i]),
                    x[i]
                );
            }
            size.iter().map(|&s| s as usize).collect()
        }
        "reshape" => {
            let x = a.fp16("x")?;
            let s = a.ints("shape")?;
            ensure!(s.iter().all(|&d| d > 0), "reshape dims must be positive, got {s:?}");
            let s: Vec<usize> = s.iter().map(|&d| d as usize).collect();
            ensure!(
                elems(&s).is_some() && elems(&s) == elems(x),
                "cannot reshape {x:?} into {s:?}: element counts differ"
            );
            s
        }
        "transpose" => {
            let x = a.fp16("x")?;
            let p = a.ints("perm")?;
            let mut seen = vec![false; x.len()];
            ensure!(p.len() == x.len(), "perm must have rank {}", x.len());
            for &i in p {
                ensure!(0 <= i && (i as usize) < x.len() && !seen[i as usize], "perm {p:?} is not a permutation");
                seen[i as usize] = true;
            }
            p.iter().map(|&i| x[i as usize]).collect()
        }
        "matmul" => matmul_shape(a.fp16("x")?, a.fp16("y")?, a.boolean("transpose_x")?, a.boolean("transpose_y")?)?,
        "concat" => {
            let ArgInfo::Tuple(vals) = a.get("values")? else { bail!("`values` must be a tuple") };
            ensure!(!vals.is_empty(), "concat of nothing");
            ensure!(!a.boolean("interleave")?, "interleave = true is not supported");
            let first = match &vals[0] {
                Type::Tensor(DType::Fp16, s) => s.clone(),
                t => bail!("concat values must be fp16 tensors, found {}", t.text()),
            };
            let ax = axis(a.int("axis")?, first.len())?;
            let mut out = first.clone();
            out[ax] = 0;
            for v in vals {
                let Type::Tensor(DType::Fp16, s) = v else { bail!("concat values must be fp16 tensors") };
                ensure!(s.len() == first.len(), "concat values differ in rank");
                for i in 0..s.len() {
                    ensure!(i == ax || s[i] == first[i], "concat values {first:?} and {s:?} differ off axis {ax}");
                }
                out[ax] += s[ax];
            }
            out
        }
        "softmax" => {
            let x = a.fp16("x")?;
            axis(a.int("axis")?, x.len())?;
            x.to_vec()
        }
        "reduce_sum" => {
            let x = a.fp16("x")?;
            let keep = a.boolean("keep_dims")?;
            let mut axes = Vec::new();
            for &ax in a.ints("axes")? {
                axes.push(axis(ax, x.len())?);
            }
            let mut out = Vec::new();
            for (i, &d) in x.iter().enumerate() {
                if !axes.contains(&i) {
                    out.push(d);
                } else if keep {
                    out.push(1);
                }
            }
            out
        }
        "pow" => {
            let x = a.fp16("x")?;
            ensure!(matches!(a.konst("y")?, Literal::Fp16(_)), "pow exponent `y` must be an fp16 constant");
            x.to_vec()
        }
        "mul" | "add" | "sub" => {
            let shape = |k: &str| -> Result<Vec<usize>> {
                match a.ty(k)? {
                    Type::Tensor(DType::Fp16, s) => Ok(s.clone()),
                    Type::Scalar(DType::Fp16) => Ok(vec![]),
                    t => bail!("argument `{k}` must be fp16, found {}", t.text()),
                }
            };
            let (x, y) = (shape("x")?, shape("y")?);
            ensure!(!(x.is_empty() && y.is_empty()), "{op} of two scalars");
            broadcast(&x, &y)?
        }
        "sigmoid" => a.fp16("x")?.to_vec(),
        "conv" => {
            let x = a.fp16("x")?;
            let w = a.fp16("weight")?;
            ensure!(x.len() == 4 && w.len() == 4, "conv takes rank-4 x [N, C, H, W] and weight [OC, C, KH, KW]");
            ensure!(w[2] == 1 && w[3] == 1, "only 1×1 convolutions are supported, weight is {w:?}");
            ensure!(w[1] == x[1], "conv weight {w:?} expects {} input channels, x {x:?} has {}", w[1], x[1]);
            ensure!(a.int("groups")? == 1, "only groups = 1 is supported");
            ensure!(
                a.ints("strides")? == [1, 1] && a.ints("dilations")? == [1, 1],
                "strides and dilations must be [1, 1]"
            );
            ensure!(a.ints("pad")? == [0, 0, 0, 0], "pad must be [0, 0, 0, 0]");
            ensure!(matches!(a.konst("pad_type")?, Literal::Str(p) if p == "valid"), "pad_type must be \"valid\"");
            vec![x[0], w[0], x[2], x[3]]
        }
        "quantize" => {
            let x = a.fp16("input")?;
            a.scale("scale")?;
            a.zero_point("zero_point")?;
            match a.konst("output_dtype")? {
                Literal::Str(d) if d == "int8" => {}
                Literal::Str(d) => bail!("output_dtype \"{d}\" is not supported; this subset quantizes to \"int8\""),
                l => bail!("output_dtype must be a string constant, found {}", l.ty().text()),
            }
            return Ok(Type::Tensor(DType::Int8, x.to_vec()));
        }
        "dequantize" => {
            let x = a.tensor_of("input", DType::Int8)?;
            a.scale("scale")?;
            a.zero_point("zero_point")?;
            x.to_vec()
        }
        "constexpr_affine_dequantize" => {
            let q = match a.konst("quantized_data")? {
                Literal::Blob { ty: Type::Tensor(DType::Int8, s), .. } => s,
                l => bail!("quantized_data must be an int8 BLOBFILE tensor, found {}", l.ty().text()),
            };
            let ax = axis(a.int("axis")?, q.len())?;
            match a.konst("scale")? {
                Literal::Fp16(x) => ensure!(x.is_finite() && *x > 0.0, "scale must be positive and finite, found {x}"),
                Literal::Blob { ty: Type::Tensor(DType::Fp16, s), .. } => ensure!(
                    s.len() == 1 && s[0] == q[ax],
                    "a scale vector needs quantized_data's axis-{ax} size {}, found shape {s:?}",
                    q[ax]
                ),
                l => bail!("scale must be an fp16 scalar or fp16 vector, found {}", l.ty().text()),
            }
            a.zero_point("zero_point")?;
            q.clone()
        }
        _ => unreachable!("signature() lists every op"),
    };
    Ok(Type::Tensor(DType::Fp16, shape))
}
