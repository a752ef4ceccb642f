//! GGUF container parsing (versions 2 and 3), over a memory map or any byte slice.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; the metadata
//! entries (u64-length-prefixed UTF-8 key, u32 value type, value); the tensor infos (name,
//! u32 dims, u64 per dim with the fastest-varying first, u32 ggml type, u64 offset into the
//! data section); padding to `general.alignment` (default 32); the data section.
//!
//! Nothing is allocated from a count in the file before the count is checked against the
//! bytes that remain: every element of an array takes at least one byte (a string at least
//! eight), so a claimed count larger than the rest of the file is refused up front.

use crate::quant::GgmlType;
use anyhow::{Context, Result, anyhow, bail, ensure};
use std::collections::BTreeMap;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF value-type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
}

/// One tensor's entry: where its bytes are in the data section.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (a row-major `[rows, cols]` matrix is `[cols, rows]`).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte range in the whole file (data section start + offset), checked to lie within it.
    pub start: usize,
    pub len: usize,
}

impl TensorEntry {
    /// Elements in the tensor.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major shape, slowest dimension first (safetensors / PyTorch order).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF header: metadata and tensor entries.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorEntry>,
    pub alignment: u64,
    pub data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

/// Value types by id, for the element type of an array.
const MAX_ARRAY_DEPTH: usize = 2;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(n <= self.remaining(), "the file ends {} bytes early (truncated)", n - self.remaining());
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64()?;
        ensure!(
            len <= self.remaining() as u64,
            "{what}: a string length of {len} bytes exceeds the {} bytes left in the file",
            self.remaining()
        );
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{what}: string is not valid UTF-8"))
    }

    /// The smallest encoding of a value of type `ty` (for bounding array counts).
    fn min_size(ty: u32) -> Result<usize> {
        Ok(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => 8,
            9 => 12,
            10..=12 => 8,
            other => bail!("unknown metadata value type {other}"),
        })
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{what}: boolean byte is {b}, not 0 or 1"),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                ensure!(depth < MAX_ARRAY_DEPTH, "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels");
                let elem = self.u32()?;
                let n = self.u64()?;
                let min = Self::min_size(elem).with_context(|| what.to_string())?;
                ensure!(
                    n <= (self.remaining() / min) as u64,
                    "{what}: an array of {n} elements cannot fit in the {} bytes left in the file",
                    self.remaining()
                );
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => bail!("{what}: unknown metadata value type {other}"),
        })
    }
}

/// Parses the header of a GGUF file held in `b`, checking every tensor's bytes lie within it.
pub fn parse(b: &[u8]) -> Result<Header> {
    let mut c = Cursor { b, at: 0 };
    ensure!(b.len() >= 4 && &b[..4] == b"GGUF", "not a GGUF file (no 'GGUF' magic)");
    c.at = 4;
    let version = c.u32()?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (re-convert the model with a current llama.cpp)"),
        v => bail!("GGUF version {v} is not supported (2 and 3 are)"),
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // A metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor info at
    // least 8 + 4 + 4 + 8.
    ensure!(
        n_kv <= (c.remaining() / 13) as u64,
        "the header claims {n_kv} metadata entries, more than the file's size allows"
    );
    ensure!(
        n_tensors <= (c.remaining() / 24) as u64,
        "the header claims {n_tensors} tensors, more than the file's size allows"
    );
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata entry {i}"))?;
        let ty = c.u32()?;
        let value = c.value(ty, &format!("metadata '{key}'"), 0)?;
        ensure!(metadata.insert(key.clone(), value).is_none(), "metadata key '{key}' appears twice");
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => {
            let a = v.as_u64().context("metadata 'general.alignment' is not an integer")?;
            ensure!(
                a > 0 && a.is_power_of_two() && a <= 1 << 20,
                "metadata 'general.alignment' = {a} is not a power of two up to 1 MiB"
            );
            a
        }
    };
    let mut entries = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor info {i}"))?;
        let n_dims = c.u32()?;
        ensure!((1..=4).contains(&n_dims), "tensor '{name}' has {n_dims} dimensions (1 to 4 are valid)");
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64()?);
        }
        let ty = GgmlType::from_id(c.u32()?).with_context(|| format!("tensor '{name}'"))?;
        let offset = c.u64()?;
        entries.push((name, dims, ty, offset));
    }
    let data_start = (c.at as u64).next_multiple_of(alignment);
    ensure!(
        data_start <= b.len() as u64,
        "the file ends before its tensor data begins (truncated after {} bytes)",
        b.len()
    );
    let data_len = b.len() as u64 - data_start;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut names = std::collections::BTreeSet::new();
    for (name, dims, ty, offset) in entries {
        ensure!(names.insert(name.clone()), "tensor '{name}' appears twice");
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n < 1 << 40)
            .ok_or_else(|| anyhow!("tensor '{name}' has implausible dimensions {dims:?}"))?;
        ensure!(
            dims[0].is_multiple_of(ty.block_len() as u64),
            "tensor '{name}': rows of {} values are not a whole number of {} blocks",
            dims[0],
            ty.name()
        );
        let len = ty.bytes_for(numel).with_context(|| format!("tensor '{name}'"))?;
        ensure!(offset.is_multiple_of(alignment), "tensor '{name}': offset {offset} is not aligned to {alignment}");
        ensure!(
            offset.checked_add(len).is_some_and(|end| end <= data_len),
            "tensor '{name}': bytes {offset}..{} lie past the end of the data section ({data_len} bytes; truncated file?)",
            offset.saturating_add(len)
        );
        tensors.push(TensorEntry { name, dims, ty, start: (data_start + offset) as usize, len: len as usize });
    }
    Ok(Header { version, metadata, tensors, alignment, data_start: data_start as usize })
}
