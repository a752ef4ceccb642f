//! Token data and micro-batch sampling.
//!
//! Two file kinds, read through mmap (never loaded whole):
//! - llama2.c's pretokenized `.bin`: a flat little-endian `u16` array, no header;
//! - this project's token file: a 64-byte header — magic `ANETOKS\0`, u32 version (2), u32
//!   bytes per token (2 or 4), u32 vocabulary size, u32 flags, u64 token count, 32 bytes
//!   of tokenizer fingerprint (ASCII, zero-padded) — then the little-endian ids, then, when
//!   flag bit 0 is set, a loss mask of one byte per token (1: the token is a training target,
//!   0: it is context only, such as the user's side of a conversation). Version 1 files (the
//!   same header with the flags field reserved as 0, never a mask) still load. A file made for
//!   another vocabulary or tokenizer is refused by name.
//!
//! Every id is checked against the vocabulary once at open, so the hot path can index
//! embeddings without checks.

use crate::ops::cross_entropy::IGNORE;
use crate::rng::Rng;
use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

enum Backing {
    /// Ids of `width` bytes starting at byte `offset` of the map.
    Mapped {
        map: Mmap,
        offset: usize,
        width: usize,
    },
    Owned(Vec<u32>),
}

/// Where the loss mask lives.
enum Mask {
    /// Every token is a target.
    All,
    /// One byte per token starting at byte `offset` of the token file's map.
    Mapped(usize),
    Owned(Vec<u8>),
}

/// Flag bit: a loss mask follows the ids.
const FLAG_MASK: u32 = 1;

pub const MAGIC: &[u8; 8] = b"ANETOKS\0";
pub const HEADER_LEN: usize = 64;

/// A read-only sequence of token ids, all below `vocab_size`.
pub struct TokenData {
    backing: Backing,
    mask: Mask,
    len: usize,
    /// Where the tokens came from, for messages and telemetry.
    pub source: String,
    /// Fingerprint of the tokenizer that made the file (headed files only).
    pub tokenizer: Option<String>,
}

impl TokenData {
    /// Opens a token file of either kind. `tokenizer`, when given, must match the fingerprint
    /// in a headed file's header.
    pub fn open(path: &Path, vocab_size: usize, tokenizer: Option<&str>) -> Result<Self> {
        ensure!(
            !path.is_dir(),
            "{} is a directory; give a token file (a directory made by prepare holds train.tok and val.tok)",
            path.display()
        );
        let mut head = [0u8; 8];
        let is_headed = File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok_and(|_| &head == MAGIC);
        if !is_headed {
            return Self::open_u16(path, vocab_size);
        }
        let file = File::open(path).with_context(|| format!("cannot open token file {}", path.display()))?;
        // SAFETY: as in open_u16.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot mmap {}", path.display()))?;
        let bad = |what: String| anyhow::anyhow!("token file {}: {what}", path.display());
        ensure!(map.len() >= HEADER_LEN, bad(format!("header truncated ({} bytes)", map.len())));
        let u32_at = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().expect("4 bytes"));
        let (version, width, vocab) = (u32_at(8), u32_at(12) as usize, u32_at(16) as usize);
        ensure!(
            version == 1 || version == 2,
            bad(format!("format version {version} is not supported (this build reads 1 and 2)"))
        );
        ensure!(width == 2 || width == 4, bad(format!("{width} bytes per token is not 2 or 4")));
        let flags = if version == 1 { 0 } else { u32_at(20) };
        ensure!(flags & !FLAG_MASK == 0, bad(format!("unknown flags {flags:#x} (made by a newer build?)")));
        let masked = flags & FLAG_MASK != 0;
        let count = u64::from_le_bytes(map[24..32].try_into().expect("8 bytes"));
        let body = (map.len() - HEADER_LEN) as u64;
        let per_token = width as u64 + masked as u64;
        ensure!(
            count.checked_mul(per_token) == Some(body),
            bad(format!(
                "header says {count} tokens of {width} bytes{}, the file holds {body} bytes (truncated?)",
                if masked { " plus a mask byte each" } else { "" }
            ))
        );
        ensure!(count > 0, bad("it holds no tokens".into()));
        let fingerprint = String::from_utf8_lossy(&map[32..64]).trim_end_matches('\0').to_string();
        ensure!(
            vocab == vocab_size,
            bad(format!(
                "it was made for a vocabulary of {vocab}, the model has {vocab_size}; re-run prepare with the model's tokenizer"
            ))
        );
        if let Some(want) = tokenizer
            && want != fingerprint
        {
            bail!(bad(format!(
                "it was made with tokenizer {fingerprint}, not {want}; re-run prepare with this tokenizer"
            )));
        }
        let mask = if masked { Mask::Mapped(HEADER_LEN + count as usize * width) } else { Mask::All };
        let data = TokenData {
            backing: Backing::Mapped { map, offset: HEADER_LEN, width },
            mask,
            len: count as usize,
            source: path.display().to_string(),
            tokenizer: Some(fingerprint),
        };
        data.check_vocab(vocab_size)?;
        data.check_mask()?;
        Ok(data)
    }

    /// The tokenizer fingerprint in a headed token file's header (None for other files),
    /// without opening the tokens.
    pub fn recorded_tokenizer(path: &Path) -> Result<Option<String>> {
        let mut head = [0u8; HEADER_LEN];
        let mut file = File::open(path).with_context(|| format!("cannot open token file {}", path.display()))?;
        if std::io::Read::read_exact(&mut file, &mut head).is_err() || &head[..8] != MAGIC {
            return Ok(None);
        }
        Ok(Some(String::from_utf8_lossy(&head[32..64]).trim_end_matches('\0').to_string()))
    }

    /// Records that these tokens were made with `tok` (for data tokenized in memory).
    pub fn made_with(mut self, tok: &crate::tokenizer::Tokenizer) -> Self {
        self.tokenizer = Some(tok.fingerprint.clone());
        self
    }

    /// Writes a headed token file atomically (ids must be below `vocab_size`).
    pub fn write(path: &Path, tokens: &[u32], vocab_size: usize, tokenizer: &str) -> Result<()> {
        Self::write_masked(path, tokens, None, vocab_size, tokenizer)
    }

    /// `write` with a loss mask `[tokens.len()]` (1: a training target).
    pub fn write_masked(
        path: &Path,
        tokens: &[u32],
        mask: Option<&[u8]>,
        vocab_size: usize,
        tokenizer: &str,
    ) -> Result<()> {
        ensure!(tokenizer.len() <= 32, "tokenizer fingerprint '{tokenizer}' is longer than 32 bytes");
        if let Some(m) = mask {
            ensure!(m.len() == tokens.len(), "the mask has {} entries for {} tokens", m.len(), tokens.len());
            ensure!(m.iter().all(|&b| b <= 1), "mask entries must be 0 or 1");
        }
        ensure!(vocab_size <= u32::MAX as usize, "vocabulary too large");
        let width = if vocab_size <= 1 << 16 { 2 } else { 4 };
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        let flags = if mask.is_some() { FLAG_MASK } else { 0 };
        for v in [2u32, width as u32, vocab_size as u32, flags] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        header.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
        header.extend_from_slice(tokenizer.as_bytes());
        header.resize(HEADER_LEN, 0);
        crate::fsio::write_atomically(path, |out| {
            std::io::Write::write_all(out, &header)?;
            for &t in tokens {
                let bytes = t.to_le_bytes();
                std::io::Write::write_all(out, &bytes[..width])?;
            }
            if let Some(m) = mask {
                std::io::Write::write_all(out, m)?;
            }
            Ok(())
        })
    }

    /// Opens a flat `u16` token file and checks every id is below `vocab_size`.
    pub fn open_u16(path: &Path, vocab_size: usize) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open token file {}", path.display()))?;
        let bytes = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        if bytes == 0 {
            bail!("token file {} is empty", path.display());
        }
        if bytes % 2 != 0 {
            bail!(
                "token file {} has an odd size ({bytes} bytes): not a flat u16 token file (truncated?)",
                path.display()
            );
        }
        // SAFETY: the file is opened read-only and we never write through the map; a file
        // truncated underneath a running process is outside what any mmap reader can guard.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot mmap {}", path.display()))?;
        let data = TokenData {
            backing: Backing::Mapped { map, offset: 0, width: 2 },
            mask: Mask::All,
            len: bytes as usize / 2,
            source: path.display().to_string(),
            tokenizer: None,
        };
        data.check_vocab(vocab_size)?;
        Ok(data)
    }

    pub fn from_vec(tokens: Vec<u32>, vocab_size: usize, source: &str) -> Result<Self> {
        Self::from_vec_masked(tokens, None, vocab_size, source)
    }

    /// In-memory tokens with an optional loss mask `[tokens.len()]` (1: a training target).
    pub fn from_vec_masked(tokens: Vec<u32>, mask: Option<Vec<u8>>, vocab_size: usize, source: &str) -> Result<Self> {
        ensure!(!tokens.is_empty(), "token data '{source}' is empty");
        if let Some(m) = &mask {
            ensure!(m.len() == tokens.len(), "{source}: the mask has {} entries for {} tokens", m.len(), tokens.len());
        }
        let data = TokenData {
            len: tokens.len(),
            backing: Backing::Owned(tokens),
            mask: mask.map_or(Mask::All, Mask::Owned),
            source: source.to_string(),
            tokenizer: None,
        };
        data.check_vocab(vocab_size)?;
        data.check_mask()?;
        Ok(data)
    }

    /// Mask bytes are 0 or 1, and at least one token after the first is a target.
    fn check_mask(&self) -> Result<()> {
        if !self.is_masked() {
            return Ok(());
        }
        let mut any = false;
        for i in 0..self.len {
            let b = self.mask_byte(i);
            ensure!(b <= 1, "{}: mask byte {b} at position {i} is not 0 or 1 (corrupt file?)", self.source);
            any |= i > 0 && b == 1;
        }
        ensure!(any, "{}: the loss mask marks no token as a training target", self.source);
        Ok(())
    }

    /// Whether the data carries a loss mask.
    pub fn is_masked(&self) -> bool {
        !matches!(self.mask, Mask::All)
    }

    fn mask_byte(&self, i: usize) -> u8 {
        match (&self.mask, &self.backing) {
            (Mask::All, _) => 1,
            (Mask::Mapped(offset), Backing::Mapped { map, .. }) => map[offset + i],
            (Mask::Owned(m), _) => m[i],
            (Mask::Mapped(_), Backing::Owned(_)) => unreachable!("a mapped mask lives in a mapped file"),
        }
    }

    /// Whether token `i` counts as a training target (always, without a mask).
    #[inline]
    pub fn is_target(&self, i: usize) -> bool {
        self.mask_byte(i) == 1
    }

    fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        let (max, at) = (0..self.len).map(|i| (self.get(i), i)).fold((0, 0), |a, b| if b.0 > a.0 { b } else { a });
        if max as usize >= vocab_size {
            bail!(
                "{}: token id {max} at position {at} is outside the model's vocabulary ({vocab_size}); \
                 was it made with another tokenizer?",
                self.source
            );
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        match &self.backing {
            Backing::Mapped { map, offset, width: 2 } => {
                let at = offset + 2 * i;
                u16::from_le_bytes([map[at], map[at + 1]]) as u32
            }
            Backing::Mapped { map, offset, .. } => {
                let at = offset + 4 * i;
                u32::from_le_bytes([map[at], map[at + 1], map[at + 2], map[at + 3]])
            }
            Backing::Owned(v) => v[i],
        }
    }
}

/// Draws micro-batches of B random windows of T+1 tokens: inputs are the first T, targets the
/// last T; with a loss mask, targets the mask leaves out are `IGNORE` (no loss, no gradient),
/// and a window is redrawn (up to 32 times) while it holds no target at all. Deterministic for
/// a seed; the RNG state is the whole loader position.
pub struct Sampler {
    pub rng: Rng,
    pub b: usize,
    pub t: usize,
}

impl Sampler {
    pub fn new(seed: u64, b: usize, t: usize) -> Self {
        Sampler { rng: Rng::derive(seed, 0xDA7A), b, t }
    }

    /// Fills tokens and targets `[B·T]`.
    pub fn next_batch(&mut self, data: &TokenData, tokens: &mut [u32], targets: &mut [u32]) -> Result<()> {
        let t = self.t;
        ensure!(data.len() > t, "{} holds {} tokens; --seq {t} needs at least {}", data.source, data.len(), t + 1);
        for (toks, tgts) in tokens.chunks_exact_mut(t).zip(targets.chunks_exact_mut(t)) {
            let mut start = self.rng.below((data.len() - t) as u64) as usize;
            if data.is_masked() {
                for _ in 0..32 {
                    if (start + 1..=start + t).any(|j| data.is_target(j)) {
                        break;
                    }
                    start = self.rng.below((data.len() - t) as u64) as usize;
                }
            }
            for i in 0..t {
                toks[i] = data.get(start + i);
                tgts[i] = if data.is_target(start + i + 1) { data.get(start + i + 1) } else { IGNORE };
            }
        }
        debug_assert!(data.is_masked() || targets.iter().all(|&x| x != IGNORE));
        Ok(())
    }
}

/// Synthetic data with learnable structure (`--data synthetic`, and tests that need no
/// tokenizer): a Markov chain where each token has four possible successors with
/// probabilities 0.55 / 0.25 / 0.15 / 0.05. Its entropy, ≈ 1.11 nats per token, is the floor a
/// model can reach, far below the ln(V) it starts from.
pub fn synthetic_tokens(vocab_size: usize, n_tokens: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::derive(seed, 0x5EED);
    let successors: Vec<[u32; 4]> =
        (0..vocab_size).map(|_| std::array::from_fn(|_| rng.below(vocab_size as u64) as u32)).collect();
    let mut out = Vec::with_capacity(n_tokens);
    let mut cur = 0u32;
    for _ in 0..n_tokens {
        out.push(cur);
        let u = rng.uniform();
        let pick = if u < 0.55 {
            0
        } else if u < 0.80 {
            1
        } else if u < 0.95 {
            2
        } else {
            3
        };
        cur = successors[cur as usize][pick];
    }
    out
}

/// Entropy in nats of the synthetic chain's next-token distribution (its loss floor).
pub const SYNTHETIC_ENTROPY: f64 = 1.1098;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_entropy_constant_is_right() {
        let h: f64 = [0.55f64, 0.25, 0.15, 0.05].iter().map(|p| -p * p.ln()).sum();
        assert!((h - SYNTHETIC_ENTROPY).abs() < 1e-4, "{h}");
    }

    #[test]
    fn u16_file_round_trip_and_errors() {
        let tmp_dir = tempfile::Builder::new().prefix("anetrain-data-").tempdir().unwrap();
        let dir = tmp_dir.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("toks.bin");
        let toks: Vec<u16> = (0..100).map(|i| (i * 7 % 50) as u16).collect();
        std::fs::write(&path, toks.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let data = TokenData::open_u16(&path, 50).unwrap();
        assert_eq!(data.len(), 100);
        assert_eq!(data.get(3), 21);
        let err = TokenData::open_u16(&path, 40).err().unwrap().to_string();
        assert!(err.contains("outside the model's vocabulary"), "{err}");
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        assert!(TokenData::open_u16(&path, 50).err().unwrap().to_string().contains("odd size"));
        std::fs::write(&path, []).unwrap();
        assert!(TokenData::open_u16(&path, 50).err().unwrap().to_string().contains("empty"));
    }

    #[test]
    fn headed_files_round_trip_and_refuse_other_tokenizers() {
        let tmp_dir = tempfile::Builder::new().prefix("anetrain-headed-").tempdir().unwrap();
        let dir = tmp_dir.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        for (vocab, name) in [(500usize, "small.tok"), (151_936, "large.tok")] {
            let path = dir.join(name);
            let toks: Vec<u32> = (0..1000).map(|i| (i * 7919 % vocab) as u32).collect();
            TokenData::write(&path, &toks, vocab, "bpe:abc123").unwrap();
            let data = TokenData::open(&path, vocab, Some("bpe:abc123")).unwrap();
            assert_eq!((0..1000).map(|i| data.get(i)).collect::<Vec<_>>(), toks);
            assert_eq!(data.tokenizer.as_deref(), Some("bpe:abc123"));
            let err = TokenData::open(&path, vocab, Some("hf:other")).err().unwrap().to_string();
            assert!(err.contains("made with tokenizer bpe:abc123, not hf:other"), "{err}");
            let err = TokenData::open(&path, vocab + 1, None).err().unwrap().to_string();
            assert!(err.contains("made for a vocabulary of"), "{err}");
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
            assert!(TokenData::open(&path, vocab, None).err().unwrap().to_string().contains("truncated"));
        }
        // A flat llama2.c file still opens through the same entry point.
        let flat = dir.join("flat.bin");
        std::fs::write(&flat, [3u8, 0, 4, 0]).unwrap();
        let data = TokenData::open(&flat, 10, Some("ignored for headerless files")).unwrap();
        assert_eq!((data.get(0), data.get(1), data.tokenizer.clone()), (3, 4, None));
    }

    #[test]
    fn masked_files_round_trip_and_version_1_still_loads() {
        let dir = std::env::temp_dir().join(format!("anetrain-masked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chat.tok");
        let toks: Vec<u32> = (0..50).map(|i| i % 20).collect();
        let mask: Vec<u8> = (0..50).map(|i| (i % 5 >= 3) as u8).collect();
        for vocab in [20, 70_000] {
            TokenData::write_masked(&path, &toks, Some(&mask), vocab, "hf:x").unwrap();
            let data = TokenData::open(&path, vocab, Some("hf:x")).unwrap();
            assert!(data.is_masked());
            assert_eq!((0..50).map(|i| data.get(i)).collect::<Vec<_>>(), toks);
            assert_eq!((0..50).map(|i| data.is_target(i) as u8).collect::<Vec<_>>(), mask);
            // Losing the mask's last byte is caught by the size check.
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
            let err = TokenData::open(&path, vocab, None).err().unwrap().to_string();
            assert!(err.contains("plus a mask byte each") && err.contains("truncated"), "{err}");
            let mut bad = bytes.clone();
            *bad.last_mut().unwrap() = 7;
            std::fs::write(&path, &bad).unwrap();
            assert!(TokenData::open(&path, vocab, None).err().unwrap().to_string().contains("mask byte 7"));
        }
        // A mask with no target is refused.
        TokenData::write_masked(&path, &toks, Some(&[0; 50]), 20, "hf:x").unwrap();
        assert!(TokenData::open(&path, 20, None).err().unwrap().to_string().contains("no token as a training target"));
        // A version 1 file, byte for byte as the previous build wrote it, loads unmasked.
        let mut v1 = MAGIC.to_vec();
        for v in [1u32, 2, 20, 0] {
            v1.extend_from_slice(&v.to_le_bytes());
        }
        v1.extend_from_slice(&3u64.to_le_bytes());
        v1.resize(HEADER_LEN, 0);
        v1.extend_from_slice(&[5, 0, 6, 0, 7, 0]);
        std::fs::write(&path, &v1).unwrap();
        let data = TokenData::open(&path, 20, None).unwrap();
        assert!(!data.is_masked() && data.is_target(1));
        assert_eq!((data.get(0), data.get(2)), (5, 7));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sampler_ignores_masked_targets() {
        // Token i is id i, so a window's position is its first input.
        let toks: Vec<u32> = (0..400).collect();
        // Targets only in every 10th block of 10 tokens.
        let mask: Vec<u8> = (0..400).map(|i| (i / 10 % 10 == 0) as u8).collect();
        let data = TokenData::from_vec_masked(toks, Some(mask.clone()), 400, "masked").unwrap();
        let (b, t) = (4, 6);
        let mut s = Sampler::new(9, b, t);
        let (mut x, mut y) = (vec![0; b * t], vec![0; b * t]);
        for _ in 0..20 {
            s.next_batch(&data, &mut x, &mut y).unwrap();
            for w in 0..b {
                let row = &y[w * t..(w + 1) * t];
                // Windows without any target are redrawn.
                assert!(row.iter().any(|&v| v != IGNORE));
                for i in 0..t {
                    let next = x[w * t + i] as usize + 1;
                    let want = if mask[next] == 1 { next as u32 } else { IGNORE };
                    assert_eq!(row[i], want);
                }
            }
        }
        let n_ignored = y.iter().filter(|&&v| v == IGNORE).count();
        assert!(n_ignored > 0, "some targets must be masked");
    }

    #[test]
    fn sampler_is_deterministic_and_shifted() {
        let data = TokenData::from_vec(synthetic_tokens(64, 1000, 1), 64, "synthetic").unwrap();
        let (b, t) = (3, 8);
        let mut a = Sampler::new(5, b, t);
        let mut c = Sampler::new(5, b, t);
        let (mut x1, mut y1, mut x2, mut y2) = (vec![0; b * t], vec![0; b * t], vec![0; b * t], vec![0; b * t]);
        a.next_batch(&data, &mut x1, &mut y1).unwrap();
        c.next_batch(&data, &mut x2, &mut y2).unwrap();
        assert_eq!((&x1, &y1), (&x2, &y2));
        for s in 0..b {
            assert_eq!(&x1[s * t + 1..(s + 1) * t], &y1[s * t..(s + 1) * t - 1]);
        }
        let short = TokenData::from_vec(vec![1, 2, 3], 64, "short").unwrap();
        assert!(a.next_batch(&short, &mut x1, &mut y1).is_err());
    }
}
