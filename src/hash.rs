//! The two hashes of the crate. FNV-1a (64-bit) fingerprints small things cheaply and stably
//! (tokenizers, token data samples, staged weights): its values are recorded in token files
//! and checkpoints, so it must never change. XXH3-64 checksums whole files: at several GB/s
//! it verifies a multi-gigabyte checkpoint in well under a second, and a 64-bit hash detects
//! accidental corruption (bit flips, truncation, a file overwritten by another tool) with
//! certainty for all practical purposes. It is not a defence against deliberate tampering
//! (that would take a keyed or cryptographic hash, at several times the cost).

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;

/// Streaming FNV-1a, 64-bit.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Mixes in each byte.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    /// Mixes in a whole word at once (not the same as its bytes one by one).
    pub fn word(&mut self, x: u64) -> &mut Self {
        self.0 = (self.0 ^ x).wrapping_mul(0x0000_0100_0000_01b3);
        self
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    Fnv1a::default().bytes(bytes).finish()
}

/// `xxh3:` + 16 hex digits of the XXH3-64 of a file's contents, read in 1 MiB blocks.
pub fn file_checksum(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("xxh3:{:016x}", hasher.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn file_checksum_is_xxh3_of_the_contents() {
        let path = std::env::temp_dir().join(format!("anetrain-hash-{}", std::process::id()));
        // Longer than one read block, so the streaming path is exercised.
        let bytes: Vec<u8> = (0..(3 << 19) + 7).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let want = format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
        assert_eq!(file_checksum(&path).unwrap(), want);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(file_checksum(&path).unwrap(), "xxh3:2d06800538d394c2");
        std::fs::remove_file(&path).unwrap();
    }
}
