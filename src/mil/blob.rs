//! Weight blob files referenced by `BLOBFILE(path = ..., offset = uint64(64))` (facts §4.6).
//!
//! Layout, all little-endian, one tensor per file (multi-blob files fail on M1):
//! ```text
//! 0   file header, 64 bytes: byte 0 = 0x01, byte 4 = 0x02, rest zero
//! 64  chunk header, 64 bytes: bytes 0..4 = EF BE AD DE (0xDEADBEEF), u32 at +4 = data type
//!     (1 = fp16, 4 = int8, Apple's blob-storage numbering),
//!     u32 at +8 = data size in bytes, u32 at +16 = absolute offset of the data (= 128),
//!     rest zero
//! 128 data: fp16 (or int8), row-major in the tensor's declared shape
//! ```
//! The MIL offset names the chunk header (64), not the data.

use anyhow::{Result, bail, ensure};
use half::f16;

pub const FILE_HEADER: usize = 64;
pub const CHUNK_HEADER: usize = 64;
/// The `offset` a program's BLOBFILE gives for a single-blob file.
pub const CHUNK_OFFSET: u64 = FILE_HEADER as u64;
const MAGIC: [u8; 4] = [0xEF, 0xBE, 0xAD, 0xDE];

/// The chunk header's data-type tag (u32 at +4), as Apple's blob storage numbers them.
pub const TAG_FP16: u8 = 1;
pub const TAG_INT8: u8 = 4;

fn chunk_file(tag: u8, payload: impl ExactSizeIterator<Item = u8>) -> Vec<u8> {
    let size = payload.len();
    let mut out = Vec::with_capacity(FILE_HEADER + CHUNK_HEADER + size);
    out.resize(FILE_HEADER + CHUNK_HEADER, 0);
    out[0] = 0x01;
    out[4] = 0x02;
    let chunk = &mut out[FILE_HEADER..FILE_HEADER + CHUNK_HEADER];
    chunk[..4].copy_from_slice(&MAGIC);
    chunk[4] = tag;
    chunk[8..12].copy_from_slice(&(size as u32).to_le_bytes());
    chunk[16..20].copy_from_slice(&((FILE_HEADER + CHUNK_HEADER) as u32).to_le_bytes());
    out.extend(payload);
    out
}

/// A single-blob file holding `data`.
pub fn blob_file(data: &[f16]) -> Vec<u8> {
    chunk_file(TAG_FP16, data.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into_iter())
}

/// A single-blob file holding int8 `data` (quantized weights), with the same headers as
/// the fp16 files (the original system's bridge wrote int8 blobs without the file header,
/// facts §1.6; this one does not).
pub fn blob_file_i8(data: &[i8]) -> Vec<u8> {
    chunk_file(TAG_INT8, data.iter().map(|&x| x as u8).collect::<Vec<u8>>().into_iter())
}

/// The `bytes` data bytes of the chunk at `offset`, checking the file header, the chunk
/// magic, the data-type tag, and that the chunk's size and data offset agree with the
/// program's declared tensor.
fn read_chunk<'a>(file: &'a [u8], offset: u64, tag: u8, bytes: usize, what: &str) -> Result<&'a [u8]> {
    ensure!(file.len() >= FILE_HEADER, "{what}: {} bytes is too short for the 64-byte file header", file.len());
    ensure!(file[0] == 0x01 && file[4] == 0x02, "{what}: not a weight blob file (bad file header)");
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    let Some(chunk) = file.get(at..at.saturating_add(CHUNK_HEADER)) else {
        bail!("{what}: offset {offset} leaves no room for a chunk header in a {}-byte file", file.len());
    };
    ensure!(chunk[..4] == MAGIC, "{what}: no 0xDEADBEEF chunk header at offset {offset}");
    let name = |t: u8| match t {
        TAG_FP16 => "fp16".to_string(),
        TAG_INT8 => "int8".to_string(),
        t => format!("data type {t}"),
    };
    ensure!(chunk[4] == tag, "{what}: the chunk holds {}, the program declares {}", name(chunk[4]), name(tag));
    let size = u32::from_le_bytes(chunk[8..12].try_into().unwrap()) as usize;
    let data_at = u32::from_le_bytes(chunk[16..20].try_into().unwrap()) as usize;
    ensure!(size == bytes, "{what}: chunk holds {size} bytes, the program's tensor needs {bytes}");
    ensure!(data_at == at + CHUNK_HEADER, "{what}: chunk data offset {data_at} is not {}", at + CHUNK_HEADER);
    let Some(data) = file.get(data_at..data_at + size) else {
        bail!("{what}: truncated: data needs bytes {data_at}..{} of {}", data_at + size, file.len());
    };
    Ok(data)
}

/// Reads `elems` fp16 values from the chunk at `offset` of a blob file.
pub fn read_blob(file: &[u8], offset: u64, elems: usize, what: &str) -> Result<Vec<f16>> {
    let data = read_chunk(file, offset, TAG_FP16, elems.saturating_mul(2), what)?;
    Ok(data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect())
}

/// Reads `elems` int8 values from the chunk at `offset` of a blob file.
pub fn read_blob_i8(file: &[u8], offset: u64, elems: usize, what: &str) -> Result<Vec<i8>> {
    Ok(read_chunk(file, offset, TAG_INT8, elems, what)?.iter().map(|&b| b as i8).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_layout_matches_the_documented_format() {
        let data: Vec<f16> = [1.0f32, -2.0, 0.5].iter().map(|&x| f16::from_f32(x)).collect();
        let f = blob_file(&data);
        assert_eq!(f.len(), 128 + 6);
        let mut header = [0u8; 64];
        header[0] = 1;
        header[4] = 2;
        assert_eq!(&f[..64], &header);
        assert_eq!(&f[64..69], &[0xEF, 0xBE, 0xAD, 0xDE, 0x01]);
        assert_eq!(&f[72..76], &6u32.to_le_bytes());
        assert_eq!(&f[80..84], &128u32.to_le_bytes());
        assert!(f[69..72].iter().chain(&f[76..80]).chain(&f[84..128]).all(|&b| b == 0));
        // fp16 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, little-endian
        assert_eq!(&f[128..], &[0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38]);
        assert_eq!(read_blob(&f, 64, 3, "t").unwrap(), data);
    }

    #[test]
    fn damaged_files_are_refused() {
        let f = blob_file(&[f16::ONE; 4]);
        assert!(read_blob(&f, 64, 5, "t").unwrap_err().to_string().contains("needs 10"));
        assert!(read_blob(&f[..130], 64, 4, "t").unwrap_err().to_string().contains("truncated"));
        assert!(read_blob(&f, 0, 4, "t").unwrap_err().to_string().contains("DEADBEEF"));
        assert!(read_blob(&f, 1 << 40, 4, "t").is_err());
        let mut bad = f.clone();
        bad[4] = 7;
        assert!(read_blob(&bad, 64, 4, "t").unwrap_err().to_string().contains("file header"));
        // an int8 chunk read as fp16 (and the reverse) names both types
        let q = blob_file_i8(&[1, -2, 127, -128]);
        assert_eq!(&q[64..69], &[0xEF, 0xBE, 0xAD, 0xDE, 0x04]);
        assert_eq!(read_blob_i8(&q, 64, 4, "q").unwrap(), vec![1, -2, 127, -128]);
        let e = read_blob(&q, 64, 2, "q").unwrap_err().to_string();
        assert!(e.contains("holds int8") && e.contains("declares fp16"), "{e}");
        assert!(read_blob_i8(&f, 64, 8, "t").unwrap_err().to_string().contains("holds fp16"));
        let mut bad = f;
        bad[80] = 200;
        assert!(read_blob(&bad, 64, 4, "t").unwrap_err().to_string().contains("data offset"));
    }
}
