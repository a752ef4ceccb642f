//! The MIL subset this crate emits, as data, and its one text form. The emitter builds a
//! `Program`, `Program::text` prints it, `parse::parse` reads text back into the same
//! `Program`; printing is the only formatter, so `parse(p.text()) == p` is the round-trip
//! invariant the tests check.
//!
//! Text shape (one function; every op argument is a name; literals appear only in `const`):
//! ```text
//! program(1.3)
//! [buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
//! {
//!     func main<ios18>(tensor<fp16, [1, 64, 1, 48]> i0_x) {
//!         tensor<int32, [4]> c0 = const()[name = string("c0"), val = tensor<int32, [4]>([0, 0, 0, 0])];
//!         tensor<fp16, [1, 64, 1, 16]> xn = slice_by_size(x = i0_x, begin = c0, size = c1)[name = string("xn")];
//!     } -> (out);
//! }
//! ```

use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Fp16,
    Int8,
    Fp32,
    Int32,
    Bool,
    Str,
    Uint64,
}

impl DType {
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Fp16 => "fp16",
            DType::Int8 => "int8",
            DType::Fp32 => "fp32",
            DType::Int32 => "int32",
            DType::Bool => "bool",
            DType::Str => "string",
            DType::Uint64 => "uint64",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "fp16" => DType::Fp16,
            "int8" => DType::Int8,
            "fp32" => DType::Fp32,
            "int32" => DType::Int32,
            "bool" => DType::Bool,
            "string" => DType::Str,
            "uint64" => DType::Uint64,
            _ => return None,
        })
    }
}

/// A value's type: a tensor of known static shape, or a scalar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Type {
    Tensor(DType, Vec<usize>),
    Scalar(DType),
}

impl Type {
    pub fn fp16(shape: &[usize]) -> Type {
        Type::Tensor(DType::Fp16, shape.to_vec())
    }

    pub fn dtype(&self) -> DType {
        match self {
            Type::Tensor(d, _) | Type::Scalar(d) => *d,
        }
    }

    /// Shape of a tensor; a scalar is rank 0.
    pub fn shape(&self) -> &[usize] {
        match self {
            Type::Tensor(_, s) => s,
            Type::Scalar(_) => &[],
        }
    }

    /// The compact (program 1.3) spelling: scalars as `int32`.
    pub fn text(&self) -> String {
        self.text_in(Syntax::Compact)
    }

    /// `Verbose` (program 1.0) writes a scalar as the rank-0 tensor `tensor<int32, []>`.
    pub fn text_in(&self, syntax: Syntax) -> String {
        match (self, syntax) {
            (Type::Tensor(d, s), _) => {
                let dims: Vec<String> = s.iter().map(|x| x.to_string()).collect();
                format!("tensor<{}, [{}]>", d.as_str(), dims.join(", "))
            }
            (Type::Scalar(d), Syntax::Compact) => d.as_str().to_string(),
            (Type::Scalar(d), Syntax::Verbose) => format!("tensor<{}, []>", d.as_str()),
        }
    }
}

/// How scalars are spelled: `int32(1)` in `program(1.3)` text, `tensor<int32, []>(1)` in the
/// older `program(1.0)` text that M1/M2-era compilers take (facts §4.7). Nothing else differs
/// between the two spellings; the opset (`ios18` / `ios16`) is the function's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    Compact,
    Verbose,
}

impl Syntax {
    /// The spelling a program version uses: `1.0` is verbose, later versions compact.
    pub fn of_version(version: &str) -> Syntax {
        if version == "1.0" { Syntax::Verbose } else { Syntax::Compact }
    }
}

/// A literal, the `val` of a `const` (or an attribute value).
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Bool(bool),
    Int32(i64),
    /// int8 scalar (a zero point)
    Int8(i64),
    /// fp16 scalar; the stored value is exactly representable in fp16
    Fp16(f32),
    Str(String),
    Uint64(u64),
    /// Inline tensor of int32 (`tensor<int32, [4]>([0, 0, 0, 16])`)
    IntTensor(Vec<usize>, Vec<i64>),
    /// External weights: `tensor<fp16, [..]>(BLOBFILE(path = string(".."), offset = uint64(64)))`
    /// (fp16, or int8 for quantized weights)
    Blob {
        ty: Type,
        path: String,
        offset: u64,
    },
}

impl Literal {
    pub fn ty(&self) -> Type {
        match self {
            Literal::Bool(_) => Type::Scalar(DType::Bool),
            Literal::Int32(_) => Type::Scalar(DType::Int32),
            Literal::Int8(_) => Type::Scalar(DType::Int8),
            Literal::Fp16(_) => Type::Scalar(DType::Fp16),
            Literal::Str(_) => Type::Scalar(DType::Str),
            Literal::Uint64(_) => Type::Scalar(DType::Uint64),
            Literal::IntTensor(shape, _) => Type::Tensor(DType::Int32, shape.clone()),
            Literal::Blob { ty, .. } => ty.clone(),
        }
    }

    pub fn text(&self) -> String {
        self.text_in(Syntax::Compact)
    }

    pub fn text_in(&self, syntax: Syntax) -> String {
        // A scalar is `<type>(<value>)`, where the type is `int32` or `tensor<int32, []>`.
        let scalar = |v: String| format!("{}({v})", self.ty().text_in(syntax));
        match self {
            Literal::Bool(b) => scalar(b.to_string()),
            Literal::Int32(i) | Literal::Int8(i) => scalar(i.to_string()),
            // `{:?}` prints the shortest decimal that reads back as the same f32, and every
            // fp16 value is an f32, so this round-trips exactly.
            Literal::Fp16(x) => scalar(format!("{x:?}")),
            Literal::Str(s) => scalar(format!("\"{s}\"")),
            Literal::Uint64(u) => scalar(u.to_string()),
            Literal::IntTensor(shape, v) => {
                let vals: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                format!("{}([{}])", Type::Tensor(DType::Int32, shape.clone()).text(), vals.join(", "))
            }
            Literal::Blob { ty, path, offset } => {
                let (p, o) = (Literal::Str(path.clone()).text_in(syntax), Literal::Uint64(*offset).text_in(syntax));
                format!("{}(BLOBFILE(path = {p}, offset = {o}))", ty.text())
            }
        }
    }
}

/// An op argument: a named value or a tuple of them (`values = (a, b)` of `concat`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    Name(String),
    Tuple(Vec<String>),
}

/// `<ty> <name> = <op>(<args>)[name = string("<name>")(, val = <literal>)];`
#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub ty: Type,
    pub name: String,
    pub op: String,
    pub args: Vec<(String, Arg)>,
    /// The `val` attribute: present exactly for `const`.
    pub val: Option<Literal>,
    /// Other attributes: the parameters of attribute-only ops (`constexpr_affine_dequantize`
    /// takes all of its constants this way, as the original system wrote it); empty otherwise.
    pub attrs: Vec<(String, Literal)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    /// Target opset, e.g. `ios18`
    pub opset: String,
    pub inputs: Vec<(String, Type)>,
    pub body: Vec<Stmt>,
    pub outputs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// `program(<version>)`, e.g. "1.3"
    pub version: String,
    pub build_info: Vec<(String, String)>,
    pub func: Function,
}

/// The build-info the original system's programs carry (facts §4.1).
pub fn default_build_info() -> Vec<(String, String)> {
    [
        ("coremlc-component-MIL", "3510.2.1"),
        ("coremlc-version", "3505.4.1"),
        ("coremltools-component-milinternal", ""),
        ("coremltools-version", "9.0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Program {
    pub fn syntax(&self) -> Syntax {
        Syntax::of_version(&self.version)
    }

    pub fn text(&self) -> String {
        let syntax = self.syntax();
        let mut s = String::new();
        let info: Vec<String> = self.build_info.iter().map(|(k, v)| format!("{{\"{k}\", \"{v}\"}}")).collect();
        let f = &self.func;
        let inputs: Vec<String> = f.inputs.iter().map(|(n, t)| format!("{} {n}", t.text())).collect();
        let string = Type::Scalar(DType::Str).text_in(syntax);
        writeln!(s, "program({})", self.version).unwrap();
        writeln!(s, "[buildInfo = dict<{string}, {string}>({{{}}})]", info.join(", ")).unwrap();
        writeln!(s, "{{").unwrap();
        writeln!(s, "    func {}<{}>({}) {{", f.name, f.opset, inputs.join(", ")).unwrap();
        for st in &f.body {
            let args: Vec<String> = st
                .args
                .iter()
                .map(|(k, a)| match a {
                    Arg::Name(n) => format!("{k} = {n}"),
                    Arg::Tuple(v) => format!("{k} = ({})", v.join(", ")),
                })
                .collect();
            // Attributes in alphabetical order, `name` among them, as Apple's printer does.
            let mut attrs: Vec<(&str, String)> = vec![("name", Literal::Str(st.name.clone()).text_in(syntax))];
            if let Some(v) = &st.val {
                attrs.push(("val", v.text_in(syntax)));
            }
            attrs.extend(st.attrs.iter().map(|(k, v)| (k.as_str(), v.text_in(syntax))));
            attrs.sort_by(|a, b| a.0.cmp(b.0));
            let attrs: Vec<String> = attrs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            writeln!(
                s,
                "        {} {} = {}({})[{}];",
                st.ty.text_in(syntax),
                st.name,
                st.op,
                args.join(", "),
                attrs.join(", ")
            )
            .unwrap();
        }
        writeln!(s, "    }} -> ({});", f.outputs.join(", ")).unwrap();
        writeln!(s, "}}").unwrap();
        s
    }
}
