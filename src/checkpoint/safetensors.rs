//! The safetensors format, read through mmap and written atomically.
//!
//! Layout: `u64` little-endian header length H, H bytes of JSON
//! (`{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data; offsets are relative to the end of the header. Every offset, length and
//! dtype is checked when a file is opened, so a truncated or foreign file is refused there,
//! with its name, rather than failing later.

use anyhow::{Context, Result, bail, ensure};
use half::{bf16, f16};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    I64,
    I32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I64 => 8,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The bytes of a model file (safetensors, GGUF): mapped from disk, or owned (parsed from
/// memory, as the fuzz tests do).
pub(crate) enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open, validated safetensors file.
pub struct SafeTensors {
    map: Bytes,
    data_start: usize,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    pub path: PathBuf,
}

/// Headers beyond this are refused (the format's reference implementation uses 100 MB).
const MAX_HEADER: u64 = 100 << 20;

impl SafeTensors {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map of a file we do not modify; see data.rs for the caveat.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot mmap {}", path.display()))?;
        Self::parse(Bytes::Mapped(map), path)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))
    }

    /// Parses a file's contents held in memory; `name` stands in for its path in messages.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes), Path::new(name))
            .with_context(|| format!("{name} is not a valid safetensors file"))
    }

    fn parse(map: Bytes, path: &Path) -> Result<Self> {
        ensure!(map.len() >= 8, "file is {} bytes, shorter than the 8-byte header length", map.len());
        let header_len = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
        ensure!(header_len <= MAX_HEADER, "header length {header_len} is implausible");
        let data_start = 8 + header_len as usize;
        ensure!(data_start <= map.len(), "header length {header_len} runs past the end of the file (truncated?)");
        let header: BTreeMap<String, Value> =
            serde_json::from_slice(&map[8..data_start]).context("header is not a JSON object")?;
        let data_len = map.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(entry).context("__metadata__ must map names to strings")?;
                continue;
            }
            let HeaderEntry { dtype: dtype_name, shape, data_offsets: offsets } = serde_json::from_value(entry)
                .with_context(|| format!("entry '{name}' is not {{dtype, shape, data_offsets: [begin, end]}}"))?;
            let dtype_name = dtype_name.as_str();
            let dtype =
                Dtype::parse(dtype_name).with_context(|| format!("'{name}' has unsupported dtype {dtype_name}"))?;
            let (start, end) = (offsets[0], offsets[1]);
            ensure!(
                start <= end && end <= data_len,
                "'{name}': bytes {start}..{end} lie outside the {data_len}-byte data section (truncated?)"
            );
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("shape overflows")?;
            ensure!(
                numel.checked_mul(dtype.size()) == Some(end - start),
                "'{name}': {} bytes for shape {shape:?} of {dtype_name}",
                end - start
            );
            tensors.insert(name, TensorInfo { dtype, shape, start, end });
        }
        let mut spans: Vec<(usize, usize, &String)> = tensors.iter().map(|(n, t)| (t.start, t.end, n)).collect();
        spans.sort();
        for pair in spans.windows(2) {
            ensure!(pair[0].1 <= pair[1].0, "tensors '{}' and '{}' overlap", pair[0].2, pair[1].2);
        }
        // Bytes past the last tensor belong to nothing: a concatenated or half-overwritten file.
        let used = spans.iter().map(|s| s.1).max().unwrap_or(0);
        ensure!(
            used == data_len,
            "{} trailing bytes after the last tensor (the data section is {data_len} bytes, tensors end at {used})",
            data_len - used
        );
        Ok(SafeTensors { map, data_start, tensors, metadata, path: path.to_path_buf() })
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).with_context(|| format!("{} has no tensor '{name}'", self.path.display()))
    }

    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[self.data_start + info.start..self.data_start + info.end]
    }

    /// Converts a float tensor (F32, F16 or BF16) into `out`, whose length must match.
    pub fn read_f32(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let info = self.info(name)?;
        ensure!(
            info.numel() == out.len(),
            "{}: '{name}' has {} values (shape {:?}), expected {}",
            self.path.display(),
            info.numel(),
            info.shape,
            out.len()
        );
        let bytes = self.bytes(info);
        match info.dtype {
            Dtype::F32 => {
                bytes.chunks_exact(4).zip(out).for_each(|(b, o)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            Dtype::BF16 => {
                bytes.chunks_exact(2).zip(out).for_each(|(b, o)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            Dtype::F16 => {
                bytes.chunks_exact(2).zip(out).for_each(|(b, o)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            other => bail!("{}: '{name}' is {}, not a float tensor", self.path.display(), other.name()),
        }
        Ok(())
    }

    /// An integer tensor (I64 or I32) as `i64`s.
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let info = self.info(name)?;
        let bytes = self.bytes(info);
        Ok(match info.dtype {
            Dtype::I64 => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(),
            Dtype::I32 => {
                bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64).collect()
            }
            other => bail!("{}: '{name}' is {}, not an integer tensor", self.path.display(), other.name()),
        })
    }
}

/// A tensor to write: name, dtype, shape and its little-endian bytes.
pub struct TensorOut<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: TensorData<'a>,
}

/// A tensor's contents: bytes already in `dtype`, or f32 values encoded to `dtype` (F32 or
/// BF16) as they are written — no copy of a multi-gigabyte arena is ever made.
pub enum TensorData<'a> {
    Bytes(std::borrow::Cow<'a, [u8]>),
    F32(&'a [f32]),
}

impl From<Vec<u8>> for TensorData<'_> {
    fn from(bytes: Vec<u8>) -> Self {
        TensorData::Bytes(bytes.into())
    }
}

impl TensorData<'_> {
    fn byte_len(&self, dtype: Dtype) -> usize {
        match self {
            TensorData::Bytes(b) => b.len(),
            TensorData::F32(v) => v.len() * dtype.size(),
        }
    }

    fn write_to(&self, dtype: Dtype, out: &mut impl Write) -> std::io::Result<()> {
        match self {
            TensorData::Bytes(b) => out.write_all(b),
            TensorData::F32(values) => {
                let mut buf = Vec::with_capacity(4 * 4096);
                for chunk in values.chunks(4096) {
                    buf.clear();
                    match dtype {
                        Dtype::BF16 => {
                            chunk.iter().for_each(|&v| buf.extend_from_slice(&bf16::from_f32(v).to_le_bytes()))
                        }
                        _ => chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
                    }
                    out.write_all(&buf)?;
                }
                Ok(())
            }
        }
    }
}

/// One tensor's entry in the JSON header (the data offsets are relative to the data section).
#[derive(Serialize, Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Writes a safetensors file atomically: into `<path>.tmp`, fsync, rename, fsync the
/// directory. A failure at any point leaves an existing file at `path` untouched.
pub fn write(path: &Path, tensors: &[TensorOut], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0usize;
    for t in tensors {
        ensure!(
            t.shape.iter().product::<usize>() * t.dtype.size() == t.data.byte_len(t.dtype),
            "tensor '{}' size mismatch",
            t.name
        );
        header.insert(
            t.name.clone(),
            serde_json::to_value(HeaderEntry {
                dtype: t.dtype.name().to_string(),
                shape: t.shape.clone(),
                data_offsets: [offset, offset + t.data.byte_len(t.dtype)],
            })?,
        );
        offset += t.data.byte_len(t.dtype);
    }
    let mut json = serde_json::to_vec(&Value::Object(header))?;
    // The format pads the header with spaces so the data starts 8-byte aligned.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    write_atomically(path, |out| {
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        for t in tensors {
            t.data.write_to(t.dtype, out)?;
        }
        Ok(())
    })
}

pub use crate::fsio::write_atomically;

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 values as little-endian bytes in the requested float dtype.
    fn encode_f32(values: &[f32], dtype: Dtype) -> Vec<u8> {
        match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
            other => panic!("encode_f32: unsupported dtype {}", other.name()),
        }
    }

    /// What the readers and the bf16 writer rely on from `half`: exact f16 decoding (subnormals,
    /// infinities, NaN) and torch's round-to-nearest-even for f32 → bf16.
    #[test]
    fn half_conversions() {
        let f16 = |bits: u16| f16::from_bits(bits).to_f32();
        assert_eq!(f16(0x3C00), 1.0);
        assert_eq!(f16(0xC000), -2.0);
        assert_eq!(f16(0x7BFF), 65504.0);
        assert_eq!(f16(0x0001), 2f32.powi(-24));
        assert_eq!(f16(0x8001), -(2f32.powi(-24)));
        assert!(f16(0x7C00).is_infinite());
        assert!(f16(0x7E00).is_nan());
        assert_eq!(bf16::from_bits(0x3F80).to_f32(), 1.0);
        assert_eq!(bf16::from_f32(1.0).to_bits(), 0x3F80);
        // 1 + 2⁻⁸ is halfway between bf16 neighbours 1 and 1 + 2⁻⁷: ties to even (1.0).
        assert_eq!(bf16::from_f32(1.0 + 2f32.powi(-8)).to_bits(), 0x3F80);
        assert_eq!(bf16::from_f32(1.0 + 3.0 * 2f32.powi(-8)).to_bits(), 0x3F82);
        assert!(bf16::from_f32(f32::NAN).to_f32().is_nan());
    }

    #[test]
    fn round_trip_and_corruption_is_refused() {
        let tmp_dir = tempfile::Builder::new().prefix("anetrain-st-").tempdir().unwrap();
        let dir = tmp_dir.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let tensors = [
            TensorOut {
                name: "a".into(),
                dtype: Dtype::F32,
                shape: vec![2, 3],
                data: encode_f32(&a, Dtype::F32).into(),
            },
            TensorOut {
                name: "b".into(),
                dtype: Dtype::BF16,
                shape: vec![6],
                data: encode_f32(&a, Dtype::BF16).into(),
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write(&path, &tensors, &meta).unwrap();
        let st = SafeTensors::open(&path).unwrap();
        assert_eq!(st.metadata["format"], "pt");
        let mut out = vec![0.0; 6];
        st.read_f32("a", &mut out).unwrap();
        assert_eq!(out, a);
        st.read_f32("b", &mut out).unwrap();
        assert_eq!(out, a, "these values are exact in bf16");
        assert!(st.read_f32("a", &mut [0.0; 5]).is_err());
        assert!(st.read_f32("missing", &mut out).is_err());

        let good = std::fs::read(&path).unwrap();
        for cut in [0, 4, 8, 20, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let err = format!("{:#}", SafeTensors::open(&path).err().expect("truncated file accepted"));
            assert!(err.contains("not a valid safetensors file"), "cut {cut}: {err}");
        }
        let mut garbage = good.clone();
        garbage[10] = b'{';
        std::fs::write(&path, &garbage).unwrap();
        assert!(SafeTensors::open(&path).is_err());
    }
}
