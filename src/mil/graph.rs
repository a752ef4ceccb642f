//! Building MIL function bodies: a `Builder` that infers each statement's type with
//! `types::infer` (so the emitted declarations are right by construction and checked again
//! by the parser), dedupes constants, collects blob files, and the sub-graphs the kernels
//! share (linear layers, head reshapes, RoPE, per-head RMSNorm).

use super::ast::DType;
use super::ast::{Arg, Function, Literal, Program, Stmt, Type, default_build_info};
use super::blob::{CHUNK_OFFSET, blob_file, blob_file_i8};
use super::dialect::Dialect;
use super::types::{ArgInfo, infer};
use super::{KernelProgram, TensorSig};
use half::f16;
use std::collections::HashMap;

/// A named value and its shape, as the builder tracks it.
#[derive(Clone, Debug)]
pub(super) struct V(pub String, pub Vec<usize>);

/// Builds one function body, inferring every statement's type with `types::infer` and
/// reusing identical constants.
pub(super) struct Builder {
    pub(super) body: Vec<Stmt>,
    env: HashMap<String, (Type, Option<Literal>)>,
    consts: Vec<(Literal, String)>,
    pub(super) blobs: Vec<(String, Vec<u8>)>,
}

impl Builder {
    pub(super) fn new(inputs: &[TensorSig]) -> Self {
        let mut env = HashMap::new();
        for i in inputs {
            env.insert(i.name.clone(), (Type::fp16(&i.shape), None));
        }
        Builder { body: Vec::new(), env, consts: Vec::new(), blobs: Vec::new() }
    }

    pub(super) fn konst(&mut self, lit: Literal) -> String {
        if let Some((_, n)) = self.consts.iter().find(|(l, _)| *l == lit) {
            return n.clone();
        }
        let name = format!("c{}", self.consts.len());
        self.push_const(&name, lit.clone());
        self.consts.push((lit, name.clone()));
        name
    }

    pub(super) fn push_const(&mut self, name: &str, lit: Literal) {
        let ty = lit.ty();
        self.env.insert(name.to_string(), (ty.clone(), Some(lit.clone())));
        self.body.push(Stmt {
            ty,
            name: name.to_string(),
            op: "const".into(),
            args: vec![],
            val: Some(lit),
            attrs: vec![],
        });
    }

    pub(super) fn ints(&mut self, v: &[usize]) -> String {
        self.konst(Literal::IntTensor(vec![v.len()], v.iter().map(|&x| x as i64).collect()))
    }

    /// An fp16 tensor constant stored in its own blob file `weights/<name>.bin`.
    pub(super) fn blob(&mut self, name: &str, shape: &[usize], data: &[f32]) -> V {
        let path = format!("weights/{name}.bin");
        let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
        self.blobs.push((path.clone(), blob_file(&h)));
        let lit = Literal::Blob { ty: Type::fp16(shape), path: format!("@model_path/{path}"), offset: CHUNK_OFFSET };
        self.push_const(name, lit);
        V(name.to_string(), shape.to_vec())
    }

    pub(super) fn op(&mut self, name: &str, op: &str, args: &[(&str, Arg)]) -> V {
        let infos: Vec<(String, ArgInfo)> = args
            .iter()
            .map(|(k, a)| {
                let info = match a {
                    Arg::Name(n) => {
                        let (t, l) = self.env[n].clone();
                        ArgInfo::Value(t, l)
                    }
                    Arg::Tuple(ns) => ArgInfo::Tuple(ns.iter().map(|n| self.env[n].0.clone()).collect()),
                };
                (k.to_string(), info)
            })
            .collect();
        let ty = infer(op, &infos).unwrap_or_else(|e| panic!("emitter bug: {op} `{name}`: {e}"));
        assert!(!self.env.contains_key(name), "emitter bug: `{name}` defined twice");
        self.env.insert(name.to_string(), (ty.clone(), None));
        let shape = ty.shape().to_vec();
        let args = args.iter().map(|(k, a)| (k.to_string(), a.clone())).collect();
        self.body.push(Stmt { ty, name: name.to_string(), op: op.into(), args, val: None, attrs: vec![] });
        V(name.to_string(), shape)
    }

    pub(super) fn slice(&mut self, name: &str, x: &V, begin: &[usize], size: &[usize]) -> V {
        let (b, s) = (self.ints(begin), self.ints(size));
        self.op(name, "slice_by_size", &[("x", n(x)), ("begin", Arg::Name(b)), ("size", Arg::Name(s))])
    }

    pub(super) fn reshape(&mut self, name: &str, x: &V, shape: &[usize]) -> V {
        let s = self.ints(shape);
        self.op(name, "reshape", &[("shape", Arg::Name(s)), ("x", n(x))])
    }

    /// Swaps the last two axes (the only permutation the original system's programs use).
    pub(super) fn transpose(&mut self, name: &str, x: &V) -> V {
        let p = self.ints(&[0, 1, 3, 2]);
        self.op(name, "transpose", &[("perm", Arg::Name(p)), ("x", n(x))])
    }

    pub(super) fn matmul(&mut self, name: &str, x: &V, y: &V, tx: bool, ty: bool) -> V {
        let (a, b) = (self.konst(Literal::Bool(tx)), self.konst(Literal::Bool(ty)));
        self.op(
            name,
            "matmul",
            &[("transpose_x", Arg::Name(a)), ("transpose_y", Arg::Name(b)), ("x", n(x)), ("y", n(y))],
        )
    }

    pub(super) fn concat(&mut self, name: &str, axis: i64, values: &[&V]) -> V {
        let (a, i) = (self.konst(Literal::Int32(axis)), self.konst(Literal::Bool(false)));
        let vals = Arg::Tuple(values.iter().map(|v| v.0.clone()).collect());
        self.op(name, "concat", &[("axis", Arg::Name(a)), ("interleave", Arg::Name(i)), ("values", vals)])
    }

    pub(super) fn binary(&mut self, name: &str, op: &str, x: &V, y: &V) -> V {
        self.op(name, op, &[("x", n(x)), ("y", n(y))])
    }

    pub(super) fn scalar(&mut self, x: f32) -> V {
        let h = f16::from_f32(x).to_f32();
        V(self.konst(Literal::Fp16(h)), vec![])
    }

    pub(super) fn unary(&mut self, name: &str, op: &str, x: &V) -> V {
        self.op(name, op, &[("x", n(x))])
    }

    pub(super) fn softmax(&mut self, name: &str, x: &V) -> V {
        let a = self.konst(Literal::Int32(-1));
        self.op(name, "softmax", &[("axis", Arg::Name(a)), ("x", n(x))])
    }

    pub(super) fn reduce_sum_last(&mut self, name: &str, x: &V) -> V {
        let (a, k) = (self.konst(Literal::IntTensor(vec![1], vec![-1])), self.konst(Literal::Bool(true)));
        self.op(name, "reduce_sum", &[("axes", Arg::Name(a)), ("keep_dims", Arg::Name(k)), ("x", n(x))])
    }

    /// `quantize(input, scale, output_dtype = "int8")`: per-tensor int8 activations.
    pub(super) fn quantize(&mut self, name: &str, x: &V, scale: f32) -> V {
        let s = self.konst(Literal::Fp16(f16::from_f32(scale).to_f32()));
        let d = self.konst(Literal::Str("int8".into()));
        self.op(name, "quantize", &[("input", n(x)), ("output_dtype", Arg::Name(d)), ("scale", Arg::Name(s))])
    }

    pub(super) fn dequantize(&mut self, name: &str, x: &V, scale: f32) -> V {
        let s = self.konst(Literal::Fp16(f16::from_f32(scale).to_f32()));
        self.op(name, "dequantize", &[("input", n(x)), ("scale", Arg::Name(s))])
    }

    /// A 1×1 convolution (stride 1, no padding, one group) of `x [1, C, H, W]` by
    /// `w [OC, C, 1, 1]`.
    pub(super) fn conv(&mut self, name: &str, x: &V, w: &V) -> V {
        let one = self.ints(&[1, 1]);
        let pad = self.ints(&[0, 0, 0, 0]);
        let groups = self.konst(Literal::Int32(1));
        let valid = self.konst(Literal::Str("valid".into()));
        self.op(
            name,
            "conv",
            &[
                ("dilations", Arg::Name(one.clone())),
                ("groups", Arg::Name(groups)),
                ("pad", Arg::Name(pad)),
                ("pad_type", Arg::Name(valid)),
                ("strides", Arg::Name(one)),
                ("weight", n(w)),
                ("x", n(x)),
            ],
        )
    }

    /// int8 weights `q` (row-major in `shape`) in their own blob file, dequantized at compile
    /// time: `w = scale[axis 0] · (q − 0)`. `scales` has one entry (per tensor) or `shape[0]`
    /// (per output channel; stored as an fp16 blob beside the data).
    pub(super) fn int8_weight(&mut self, name: &str, shape: &[usize], q: &[i8], scales: &[f32]) -> V {
        let path = format!("weights/{name}.bin");
        self.blobs.push((path.clone(), blob_file_i8(q)));
        let data = Literal::Blob {
            ty: Type::Tensor(DType::Int8, shape.to_vec()),
            path: format!("@model_path/{path}"),
            offset: CHUNK_OFFSET,
        };
        let scale = if scales.len() == 1 {
            Literal::Fp16(f16::from_f32(scales[0]).to_f32())
        } else {
            let spath = format!("weights/{name}_scale.bin");
            let h: Vec<f16> = scales.iter().map(|&x| f16::from_f32(x)).collect();
            self.blobs.push((spath.clone(), blob_file(&h)));
            Literal::Blob {
                ty: Type::fp16(&[scales.len()]),
                path: format!("@model_path/{spath}"),
                offset: CHUNK_OFFSET,
            }
        };
        let attrs = vec![
            ("axis".to_string(), Literal::Int32(0)),
            ("quantized_data".to_string(), data),
            ("scale".to_string(), scale),
            ("zero_point".to_string(), Literal::Int8(0)),
        ];
        let infos: Vec<(String, ArgInfo)> =
            attrs.iter().map(|(k, l)| (k.clone(), ArgInfo::Value(l.ty(), Some(l.clone())))).collect();
        let op = "constexpr_affine_dequantize";
        let ty = infer(op, &infos).unwrap_or_else(|e| panic!("emitter bug: {op} `{name}`: {e}"));
        assert!(!self.env.contains_key(name), "emitter bug: `{name}` defined twice");
        self.env.insert(name.to_string(), (ty.clone(), None));
        self.body.push(Stmt { ty, name: name.to_string(), op: op.into(), args: vec![], val: None, attrs });
        V(name.to_string(), shape.to_vec())
    }

    pub(super) fn pow(&mut self, name: &str, x: &V, y: f32) -> V {
        let e = self.scalar(y);
        self.binary(name, "pow", x, &e)
    }
}

/// `body` as the `main` function of a program in the emitter's own dialect (ios18, program
/// 1.3), with the fp16 inputs `sigs` and the one output `out`: every emitted kernel's header.
pub(super) fn main_program(sigs: &[TensorSig], body: Vec<Stmt>, out: &str) -> Program {
    Program {
        version: Dialect::Ios18.version().into(),
        build_info: default_build_info(),
        func: Function {
            name: "main".into(),
            opset: Dialect::Ios18.name().into(),
            inputs: sigs.iter().map(|s| (s.name.clone(), Type::fp16(&s.shape))).collect(),
            body,
            outputs: vec![out.to_string()],
        },
    }
}

/// A builder for a program of one fp16 input `i0_x` of `shape`, and that input's value (the
/// benchmark and W8A8 programs).
pub(super) fn one_input(shape: [usize; 4]) -> (Builder, TensorSig, V) {
    let sig = TensorSig { name: "i0_x".into(), shape };
    let b = Builder::new(std::slice::from_ref(&sig));
    let x = V(sig.name.clone(), shape.to_vec());
    (b, sig, x)
}

/// The one-input kernel `b` has built, with output `out`.
pub(super) fn one_input_kernel(name: &str, b: Builder, sig: TensorSig, out: V) -> KernelProgram {
    let shape = [out.1[0], out.1[1], out.1[2], out.1[3]];
    let program = main_program(std::slice::from_ref(&sig), b.body, &out.0);
    KernelProgram {
        name: name.into(),
        mil: program.text(),
        blobs: b.blobs,
        inputs: vec![sig],
        outputs: vec![TensorSig { name: out.0, shape }],
    }
}

pub(super) fn n(v: &V) -> Arg {
    Arg::Name(v.0.clone())
}

/// `y [1, OC, 1, S]` = Wᵀ·act for `w` staged `[1, IC, 1, OC]` and `act` `[1, IC, 1, S]`.
pub(super) fn linear(b: &mut Builder, name: &str, w: &V, act4: &V) -> V {
    let (ic, oc, s) = (w.1[1], w.1[3], act4.1[3]);
    let w4 = b.reshape(&format!("{name}_w"), w, &[1, 1, ic, oc]);
    let y = b.matmul(&format!("{name}_mm"), &w4, act4, true, false);
    b.reshape(name, &y, &[1, oc, 1, s])
}

/// `[1, IC, 1, S]` → `[1, 1, IC, S]`, the matmul view of an activation.
pub(super) fn as_rows(b: &mut Builder, x: &V) -> V {
    let (ic, s) = (x.1[1], x.1[3]);
    b.reshape(&format!("{}_r", x.0), x, &[1, 1, ic, s])
}

/// `[1, NH·D, 1, S]` → `[1, NH, S, D]`
pub(super) fn to_heads(b: &mut Builder, name: &str, x: &V, nh: usize, d: usize, s: usize) -> V {
    let r = b.reshape(&format!("{name}_hds"), x, &[1, nh, d, s]);
    b.transpose(name, &r)
}

/// `[1, NH, S, D]` → `[1, NH·D, 1, S]`
pub(super) fn from_heads(b: &mut Builder, name: &str, x: &V) -> V {
    let (nh, s, d) = (x.1[1], x.1[2], x.1[3]);
    let t = b.transpose(&format!("{name}_t"), x);
    b.reshape(name, &t, &[1, nh * d, 1, s])
}

/// Rotate-half RoPE on `[1, NH, S, D]`: x·cos + rot(x)·sin with rot(x) = (−x₂, x₁); the
/// inverse (the backward) rotates by −θ: rot = (x₂, −x₁). The halves are split on a third
/// axis (`[1, NH·S, 2, D/2]`) rather than sliced at last-axis offset D/2: before A16, slices
/// at a last-axis offset are reported to saturate above 4,094, and the backward's inputs are
/// loss-scaled gradients.
pub(super) fn rope(b: &mut Builder, name: &str, x: &V, cos: &V, sin: &V, inverse: bool) -> V {
    let (nh, s, d) = (x.1[1], x.1[2], x.1[3]);
    let half = d / 2;
    let pairs = b.reshape(&format!("{name}_pairs"), x, &[1, nh * s, 2, half]);
    let x1 = b.slice(&format!("{name}_x1"), &pairs, &[0, 0, 0, 0], &[1, nh * s, 1, half]);
    let x2 = b.slice(&format!("{name}_x2"), &pairs, &[0, 0, 1, 0], &[1, nh * s, 1, half]);
    let m1 = b.scalar(-1.0);
    let rot = if inverse {
        let n1 = b.binary(&format!("{name}_nx1"), "mul", &x1, &m1);
        b.concat(&format!("{name}_rot_pairs"), 2, &[&x2, &n1])
    } else {
        let n2 = b.binary(&format!("{name}_nx2"), "mul", &x2, &m1);
        b.concat(&format!("{name}_rot_pairs"), 2, &[&n2, &x1])
    };
    let rot = b.reshape(&format!("{name}_rot"), &rot, &[1, nh, s, d]);
    let xc = b.binary(&format!("{name}_xc"), "mul", x, cos);
    let rs = b.binary(&format!("{name}_rs"), "mul", &rot, sin);
    b.binary(name, "add", &xc, &rs)
}

/// Per-head RMSNorm over the last axis of `[1, NH, S, D]` with gain `g` `[1, 1, 1, D]`.
/// The squares are taken of x·2⁻ᵏ (2ᵏ ≈ √D, an exact scaling), and the sum rescaled by
/// 2²ᵏ/D afterwards: squaring x itself would overflow fp16's sum once the RMS passed
/// √(65504/D) (22.6 for D = 128), and inf → rstd 0 → q silently all zeros. Now the sum
/// overflows only past an RMS of about 256.
pub(super) fn head_norm(b: &mut Builder, name: &str, x: &V, g: &V, eps: f64) -> V {
    let d = x.1[3];
    let k = (d as f64).sqrt().log2().floor() as i32;
    let pre = b.scalar(2f32.powi(-k));
    let xs = b.binary(&format!("{name}_xs"), "mul", x, &pre);
    let sq = b.binary(&format!("{name}_sq"), "mul", &xs, &xs);
    let ss = b.reduce_sum_last(&format!("{name}_ss"), &sq);
    let post = b.scalar(2f32.powi(2 * k) / d as f32);
    let ms = b.binary(&format!("{name}_ms"), "mul", &ss, &post);
    let e = b.scalar(eps as f32);
    let mse = b.binary(&format!("{name}_mse"), "add", &ms, &e);
    let r = b.pow(&format!("{name}_r"), &mse, -0.5);
    let xr = b.binary(&format!("{name}_xr"), "mul", x, &r);
    b.binary(name, "mul", &xr, g)
}
