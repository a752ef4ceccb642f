//! Parser for the MIL subset in `ast`: syntax, name resolution and op type checking, with
//! every error located by line and column (1-based) of the offending token.

use super::ast::{Arg, DType, Function, Literal, Program, Stmt, Syntax, Type};
use super::types::{ArgInfo, attribute_only, infer, min_opset};
use anyhow::{Result, anyhow, bail};
use std::collections::HashMap;

/// Shapes the parser accepts: each dimension up to 2³¹ (the hardware's limit is 65,536; the
/// emitter checks that), and at most 2³² elements per tensor.
const MAX_DIM: usize = 1 << 31;
const MAX_ELEMS: usize = 1 << 32;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Num(String),
    Str(String),
    /// One of `( ) [ ] { } < > , = ;` or `->`
    Punct(&'static str),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Num(s) => format!("number {s}"),
            Tok::Str(s) => format!("string \"{s}\""),
            Tok::Punct(p) => format!("`{p}`"),
            Tok::Eof => "end of input".to_string(),
        }
    }
}

struct Lexer {
    toks: Vec<(Tok, usize, usize)>,
    at: usize,
    /// How scalars are spelled, fixed by `program(<version>)`.
    syntax: Syntax,
}

fn lex(text: &str) -> Result<Vec<(Tok, usize, usize)>> {
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut col) = (0, 1, 1);
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        let (l0, c0) = (line, col);
        let advance = |i: &mut usize, line: &mut usize, col: &mut usize| {
            if chars[*i] == '\n' {
                *line += 1;
                *col = 1;
            } else {
                *col += 1;
            }
            *i += 1;
        };
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut s = String::new();
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                s.push(chars[i]);
                advance(&mut i, &mut line, &mut col);
            }
            out.push((Tok::Ident(s), l0, c0));
        } else if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let mut s = String::new();
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "-+.".contains(chars[i])) {
                // a sign only starts the number or follows an exponent marker
                if "-+".contains(chars[i]) && !(s.is_empty() || s.ends_with(['e', 'E'])) {
                    break;
                }
                s.push(chars[i]);
                advance(&mut i, &mut line, &mut col);
            }
            out.push((Tok::Num(s), l0, c0));
        } else if c == '"' {
            advance(&mut i, &mut line, &mut col);
            let mut s = String::new();
            loop {
                match chars.get(i) {
                    None | Some('\n') => bail!("line {l0}, column {c0}: unterminated string"),
                    Some('"') => break,
                    Some(&ch) => {
                        s.push(ch);
                        advance(&mut i, &mut line, &mut col);
                    }
                }
            }
            advance(&mut i, &mut line, &mut col);
            out.push((Tok::Str(s), l0, c0));
        } else if c == '-' && chars.get(i + 1) == Some(&'>') {
            advance(&mut i, &mut line, &mut col);
            advance(&mut i, &mut line, &mut col);
            out.push((Tok::Punct("->"), l0, c0));
        } else {
            let p = match c {
                '(' => "(",
                ')' => ")",
                '[' => "[",
                ']' => "]",
                '{' => "{",
                '}' => "}",
                '<' => "<",
                '>' => ">",
                ',' => ",",
                '=' => "=",
                ';' => ";",
                _ => bail!("line {l0}, column {c0}: unexpected character {c:?}"),
            };
            advance(&mut i, &mut line, &mut col);
            out.push((Tok::Punct(p), l0, c0));
        }
    }
    out.push((Tok::Eof, line, col));
    Ok(out)
}

impl Lexer {
    fn peek(&self) -> &Tok {
        &self.toks[self.at].0
    }

    fn pos(&self) -> (usize, usize) {
        (self.toks[self.at].1, self.toks[self.at].2)
    }

    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        let (l, c) = self.pos();
        anyhow!("line {l}, column {c}: {msg}")
    }

    fn expected(&self, what: &str) -> anyhow::Error {
        self.err(format!("expected {what}, found {}", self.peek().describe()))
    }

    fn next(&mut self) -> Tok {
        let t = self.toks[self.at].0.clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        t
    }

    fn punct(&mut self, p: &str) -> Result<()> {
        match self.peek() {
            Tok::Punct(q) if *q == p => {
                self.next();
                Ok(())
            }
            _ => Err(self.expected(&format!("`{p}`"))),
        }
    }

    fn is_punct(&self, p: &str) -> bool {
        matches!(self.peek(), Tok::Punct(q) if *q == p)
    }

    fn ident(&mut self) -> Result<String> {
        match self.peek() {
            Tok::Ident(s) => {
                let s = s.clone();
                self.next();
                Ok(s)
            }
            _ => Err(self.expected("a name")),
        }
    }

    fn keyword(&mut self, k: &str) -> Result<()> {
        match self.peek() {
            Tok::Ident(s) if s == k => {
                self.next();
                Ok(())
            }
            _ => Err(self.expected(&format!("`{k}`"))),
        }
    }

    fn string(&mut self) -> Result<String> {
        match self.peek() {
            Tok::Str(s) => {
                let s = s.clone();
                self.next();
                Ok(s)
            }
            _ => Err(self.expected("a string literal")),
        }
    }

    fn number<T: std::str::FromStr>(&mut self, what: &str) -> Result<T> {
        match self.peek() {
            Tok::Num(s) => match s.parse() {
                Ok(v) => {
                    self.next();
                    Ok(v)
                }
                Err(_) => Err(self.err(format!("`{s}` is not a valid {what}"))),
            },
            _ => Err(self.expected(what)),
        }
    }

    fn int32(&mut self) -> Result<i64> {
        let v: i64 = self.number("int32")?;
        if i32::try_from(v).is_err() {
            return Err(self.err(format!("{v} does not fit in int32")));
        }
        Ok(v)
    }

    /// `string("...")` (or `tensor<string, []>("...")` in program(1.0))
    fn string_lit(&mut self) -> Result<String> {
        match self.literal()? {
            Literal::Str(s) => Ok(s),
            l => Err(self.err(format!("expected a string, found {}", l.ty().text_in(self.syntax)))),
        }
    }

    fn dtype(&mut self) -> Result<DType> {
        match self.peek() {
            Tok::Ident(s) => match DType::parse(s) {
                Some(d) => {
                    self.next();
                    Ok(d)
                }
                None => Err(self.err(format!("unknown type `{s}`"))),
            },
            _ => Err(self.expected("a type")),
        }
    }

    fn ty(&mut self) -> Result<Type> {
        if matches!(self.peek(), Tok::Ident(s) if s == "tensor") {
            let pos = self.pos();
            self.next();
            self.punct("<")?;
            let d = self.dtype()?;
            self.punct(",")?;
            self.punct("[")?;
            let mut shape = Vec::new();
            while !self.is_punct("]") {
                if !shape.is_empty() {
                    self.punct(",")?;
                }
                let dim: usize = self.number("dimension")?;
                if dim == 0 || dim > MAX_DIM {
                    return Err(self.err(format!("dimension {dim} outside 1..={MAX_DIM}")));
                }
                shape.push(dim);
            }
            if shape.len() > 6 || super::types::elems(&shape).is_none_or(|n| n > MAX_ELEMS) {
                return Err(self.err(format!("tensor shape {shape:?} is larger than this simulator supports")));
            }
            self.punct("]")?;
            self.punct(">")?;
            if !shape.is_empty() {
                return Ok(Type::Tensor(d, shape));
            }
            if self.syntax == Syntax::Compact {
                bail!(
                    "line {}, column {}: `tensor<{d}, []>` is program(1.0) syntax; this program(1.3) text writes the scalar as `{d}`",
                    pos.0,
                    pos.1,
                    d = d.as_str()
                );
            }
            Ok(Type::Scalar(d))
        } else {
            let pos = self.pos();
            let d = self.dtype()?;
            if self.syntax == Syntax::Verbose {
                bail!(
                    "line {}, column {}: program(1.0) writes scalars as `tensor<{}, []>`, not `{}` (program(1.3) syntax)",
                    pos.0,
                    pos.1,
                    d.as_str(),
                    d.as_str()
                );
            }
            Ok(Type::Scalar(d))
        }
    }

    fn literal(&mut self) -> Result<Literal> {
        let ty = self.ty()?;
        self.punct("(")?;
        let lit = match &ty {
            Type::Scalar(DType::Bool) => match self.ident()?.as_str() {
                "true" => Literal::Bool(true),
                "false" => Literal::Bool(false),
                other => return Err(self.err(format!("expected true or false, found `{other}`"))),
            },
            Type::Scalar(DType::Int32) => Literal::Int32(self.int32()?),
            Type::Scalar(DType::Int8) => {
                let v: i64 = self.number("int8")?;
                if i8::try_from(v).is_err() {
                    return Err(self.err(format!("{v} does not fit in int8")));
                }
                Literal::Int8(v)
            }
            Type::Scalar(DType::Uint64) => Literal::Uint64(self.number("uint64")?),
            Type::Scalar(DType::Str) => Literal::Str(self.string()?),
            Type::Scalar(DType::Fp16) => {
                let x: f32 = self.number("fp16 value")?;
                let h = half::f16::from_f32(x);
                if h.to_f32() != x || !x.is_finite() {
                    return Err(self.err(format!("{x} is not exactly representable in fp16")));
                }
                Literal::Fp16(x)
            }
            Type::Scalar(d) => return Err(self.err(format!("{} scalars are not supported", d.as_str()))),
            Type::Tensor(d, shape) => {
                if matches!(self.peek(), Tok::Ident(s) if s == "BLOBFILE") {
                    self.next();
                    self.punct("(")?;
                    self.keyword("path")?;
                    self.punct("=")?;
                    let path = self.string_lit()?;
                    self.punct(",")?;
                    self.keyword("offset")?;
                    self.punct("=")?;
                    let offset = match self.literal()? {
                        Literal::Uint64(o) => o,
                        l => return Err(self.err(format!("offset must be a uint64, found {}", l.ty().text()))),
                    };
                    self.punct(")")?;
                    if !matches!(d, DType::Fp16 | DType::Int8) {
                        return Err(self.err("BLOBFILE weights must be fp16 or int8"));
                    }
                    Literal::Blob { ty: ty.clone(), path, offset }
                } else if *d == DType::Int32 {
                    self.punct("[")?;
                    let mut v = Vec::new();
                    while !self.is_punct("]") {
                        if !v.is_empty() {
                            self.punct(",")?;
                        }
                        v.push(self.int32()?);
                    }
                    self.punct("]")?;
                    if v.len() != shape.iter().product::<usize>() {
                        return Err(self.err(format!("{} values for a tensor of shape {shape:?}", v.len())));
                    }
                    Literal::IntTensor(shape.clone(), v)
                } else {
                    return Err(self.err("inline tensors must be int32; put fp16 tensors in a BLOBFILE"));
                }
            }
        };
        self.punct(")")?;
        Ok(lit)
    }
}

/// Parses and type-checks a program. Errors carry `line L, column C`.
pub fn parse(text: &str) -> Result<Program> {
    let mut lx = Lexer { toks: lex(text)?, at: 0, syntax: Syntax::Compact };
    lx.keyword("program")?;
    lx.punct("(")?;
    let version = match lx.next() {
        Tok::Num(v) => v,
        _ => {
            lx.at -= 1;
            return Err(lx.expected("a version number"));
        }
    };
    lx.punct(")")?;
    lx.syntax = Syntax::of_version(&version);
    lx.punct("[")?;
    lx.keyword("buildInfo")?;
    lx.punct("=")?;
    lx.keyword("dict")?;
    lx.punct("<")?;
    for i in 0..2 {
        if i == 1 {
            lx.punct(",")?;
        }
        if lx.ty()? != Type::Scalar(DType::Str) {
            return Err(lx.err("buildInfo maps strings to strings"));
        }
    }
    lx.punct(">")?;
    lx.punct("(")?;
    lx.punct("{")?;
    let mut build_info = Vec::new();
    while !lx.is_punct("}") {
        if !build_info.is_empty() {
            lx.punct(",")?;
        }
        lx.punct("{")?;
        let k = lx.string()?;
        lx.punct(",")?;
        let v = lx.string()?;
        lx.punct("}")?;
        build_info.push((k, v));
    }
    lx.punct("}")?;
    lx.punct(")")?;
    lx.punct("]")?;
    lx.punct("{")?;
    let func = function(&mut lx)?;
    lx.punct("}")?;
    if lx.peek() != &Tok::Eof {
        return Err(lx.expected("end of input"));
    }
    Ok(Program { version, build_info, func })
}

fn function(lx: &mut Lexer) -> Result<Function> {
    lx.keyword("func")?;
    let name = lx.ident()?;
    lx.punct("<")?;
    let opset_pos = lx.pos();
    let opset = lx.ident()?;
    let Some(ios) = opset.strip_prefix("ios").and_then(|v| v.parse::<u32>().ok()).filter(|v| (15..=26).contains(v))
    else {
        bail!("line {}, column {}: unknown opset `{opset}` (expected ios15 … ios18)", opset_pos.0, opset_pos.1);
    };
    lx.punct(">")?;
    lx.punct("(")?;
    let mut inputs: Vec<(String, Type)> = Vec::new();
    let mut env: HashMap<String, (Type, Option<Literal>)> = HashMap::new();
    while !lx.is_punct(")") {
        if !inputs.is_empty() {
            lx.punct(",")?;
        }
        let ty = lx.ty()?;
        if !matches!(ty, Type::Tensor(DType::Fp16, _)) {
            return Err(lx.err("function inputs must be fp16 tensors"));
        }
        let pos = lx.pos();
        let n = lx.ident()?;
        if env.insert(n.clone(), (ty.clone(), None)).is_some() {
            bail!("line {}, column {}: input `{n}` declared twice", pos.0, pos.1);
        }
        inputs.push((n, ty));
    }
    lx.punct(")")?;
    lx.punct("{")?;
    let mut body = Vec::new();
    while !lx.is_punct("}") {
        body.push(statement(lx, &mut env, ios)?);
    }
    lx.punct("}")?;
    lx.punct("->")?;
    lx.punct("(")?;
    let mut outputs = Vec::new();
    while !lx.is_punct(")") {
        if !outputs.is_empty() {
            lx.punct(",")?;
        }
        let pos = lx.pos();
        let o = lx.ident()?;
        if outputs.contains(&o) {
            bail!("line {}, column {}: output `{o}` is listed twice", pos.0, pos.1);
        }
        match env.get(&o) {
            Some((Type::Tensor(DType::Fp16, _), _)) => outputs.push(o),
            Some(_) => bail!("line {}, column {}: output `{o}` is not an fp16 tensor", pos.0, pos.1),
            None => bail!("line {}, column {}: output `{o}` is not defined", pos.0, pos.1),
        }
    }
    if outputs.is_empty() {
        return Err(lx.err("a function needs at least one output"));
    }
    lx.punct(")")?;
    lx.punct(";")?;
    Ok(Function { name, opset, inputs, body, outputs })
}

fn statement(lx: &mut Lexer, env: &mut HashMap<String, (Type, Option<Literal>)>, ios: u32) -> Result<Stmt> {
    let stmt_pos = lx.pos();
    let ty = lx.ty()?;
    let name_pos = lx.pos();
    let name = lx.ident()?;
    if env.contains_key(&name) {
        bail!("line {}, column {}: `{name}` is already defined", name_pos.0, name_pos.1);
    }
    lx.punct("=")?;
    let op_pos = lx.pos();
    let op = lx.ident()?;
    lx.punct("(")?;
    let mut args: Vec<(String, Arg)> = Vec::new();
    let mut infos: Vec<(String, ArgInfo)> = Vec::new();
    while !lx.is_punct(")") {
        if !args.is_empty() {
            lx.punct(",")?;
        }
        let key_pos = lx.pos();
        let key = lx.ident()?;
        if args.iter().any(|(k, _)| *k == key) {
            bail!("line {}, column {}: argument `{key}` given twice", key_pos.0, key_pos.1);
        }
        lx.punct("=")?;
        let lookup = |lx: &mut Lexer| -> Result<(String, (Type, Option<Literal>))> {
            let pos = lx.pos();
            let n = lx.ident()?;
            match env.get(&n) {
                Some(v) => Ok((n, v.clone())),
                None => bail!("line {}, column {}: `{n}` is not defined", pos.0, pos.1),
            }
        };
        if lx.is_punct("(") {
            lx.next();
            let (mut names, mut types) = (Vec::new(), Vec::new());
            while !lx.is_punct(")") {
                if !names.is_empty() {
                    lx.punct(",")?;
                }
                let (n, (t, _)) = lookup(lx)?;
                names.push(n);
                types.push(t);
            }
            lx.punct(")")?;
            infos.push((key.clone(), ArgInfo::Tuple(types)));
            args.push((key, Arg::Tuple(names)));
        } else {
            let (n, (t, k)) = lookup(lx)?;
            infos.push((key.clone(), ArgInfo::Value(t, k)));
            args.push((key, Arg::Name(n)));
        }
    }
    lx.punct(")")?;
    // Attributes, in any order: `name` always, `val` for const, the parameters of
    // attribute-only ops.
    lx.punct("[")?;
    let (mut attr_name, mut val, mut attrs) = (None, None, Vec::new());
    while !lx.is_punct("]") {
        if attr_name.is_some() || val.is_some() || !attrs.is_empty() {
            lx.punct(",")?;
        }
        let key_pos = lx.pos();
        let key = lx.ident()?;
        lx.punct("=")?;
        let twice = || anyhow!("line {}, column {}: attribute `{key}` given twice", key_pos.0, key_pos.1);
        match key.as_str() {
            "name" => {
                let pos = lx.pos();
                let n = lx.string_lit()?;
                if n != name {
                    bail!("line {}, column {}: name attribute \"{n}\" differs from `{name}`", pos.0, pos.1);
                }
                if attr_name.replace(n).is_some() {
                    return Err(twice());
                }
            }
            "val" => {
                if val.replace(lx.literal()?).is_some() {
                    return Err(twice());
                }
            }
            _ => {
                if attrs.iter().any(|(k, _)| *k == key) {
                    return Err(twice());
                }
                let lit = lx.literal()?;
                attrs.push((key, lit));
            }
        }
    }
    if attr_name.is_none() {
        return Err(lx.err(format!("`{name}` has no name attribute")));
    }
    lx.punct("]")?;
    lx.punct(";")?;
    let here = |msg: String| anyhow!("line {}, column {}: {msg}", op_pos.0, op_pos.1);
    if min_opset(&op) > ios {
        return Err(here(format!(
            "{op} needs opset ios{} or later; this function targets ios{ios} (the older-chip dialect has no {op})",
            min_opset(&op)
        )));
    }
    if !attrs.is_empty() && !attribute_only(&op) {
        return Err(here(format!("{op} takes no attribute `{}`", attrs[0].0)));
    }
    let inferred = if op == "const" {
        if !args.is_empty() {
            return Err(here("const takes no arguments".into()));
        }
        match &val {
            Some(v) => v.ty(),
            None => return Err(here(format!("const `{name}` has no val"))),
        }
    } else {
        if val.is_some() {
            return Err(here(format!("only const takes a val attribute ({op} does not)")));
        }
        if attribute_only(&op) {
            if !args.is_empty() {
                return Err(here(format!("{op} takes its parameters as attributes, not arguments")));
            }
            infos = attrs.iter().map(|(k, l)| (k.clone(), ArgInfo::Value(l.ty(), Some(l.clone())))).collect();
        }
        infer(&op, &infos).map_err(|e| here(format!("{op} `{name}`: {e}")))?
    };
    if inferred != ty {
        bail!(
            "line {}, column {}: `{name}` is declared {} but {op} produces {}",
            stmt_pos.0,
            stmt_pos.1,
            ty.text(),
            inferred.text()
        );
    }
    env.insert(name.clone(), (ty.clone(), val.clone()));
    Ok(Stmt { ty, name, op, args, val, attrs })
}
