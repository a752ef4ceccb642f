//! Token data and micro-batch sampling.
//!
//! Two file kinds, read through mmap (never loaded whole):
//! - llama2.c's pretokenized `.bin`: a flat little-endian `u16` array, no header;
//! - this project's token file: a 64-byte header — magic `ANETOKS\0`, u32 version (1), u32
//!   bytes per token (2 or 4), u32 vocabulary size, u32 reserved (0), u64 token count, 32 bytes
//!   of tokenizer fingerprint (ASCII, zero-padded) — then the little-endian ids. A file made for
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

pub const MAGIC: &[u8; 8] = b"ANETOKS\0";
pub const HEADER_LEN: usize = 64;

/// A read-only sequence of token ids, all below `vocab_size`.
pub struct TokenData {
    backing: Backing,
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
        ensure!(version == 1, bad(format!("format version {version} is not supported (this build reads 1)")));
        ensure!(width == 2 || width == 4, bad(format!("{width} bytes per token is not 2 or 4")));
        let count = u64::from_le_bytes(map[24..32].try_into().expect("8 bytes"));
        let body = (map.len() - HEADER_LEN) as u64;
        ensure!(
            count.checked_mul(width as u64) == Some(body),
            bad(format!("header says {count} tokens of {width} bytes, the file holds {body} bytes (truncated?)"))
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
        let data = TokenData {
            backing: Backing::Mapped { map, offset: HEADER_LEN, width },
            len: count as usize,
            source: path.display().to_string(),
            tokenizer: Some(fingerprint),
        };
        data.check_vocab(vocab_size)?;
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
        ensure!(tokenizer.len() <= 32, "tokenizer fingerprint '{tokenizer}' is longer than 32 bytes");
        ensure!(vocab_size <= u32::MAX as usize, "vocabulary too large");
        let width = if vocab_size <= 1 << 16 { 2 } else { 4 };
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        for v in [1u32, width as u32, vocab_size as u32, 0] {
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
            len: bytes as usize / 2,
            source: path.display().to_string(),
            tokenizer: None,
        };
        data.check_vocab(vocab_size)?;
        Ok(data)
    }

    pub fn from_vec(tokens: Vec<u32>, vocab_size: usize, source: &str) -> Result<Self> {
        ensure!(!tokens.is_empty(), "token data '{source}' is empty");
        let data = TokenData {
            len: tokens.len(),
            backing: Backing::Owned(tokens),
            source: source.to_string(),
            tokenizer: None,
        };
        data.check_vocab(vocab_size)?;
        Ok(data)
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
/// last T. Deterministic for a seed; the RNG state is the whole loader position.
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
            let start = self.rng.below((data.len() - t) as u64) as usize;
            for i in 0..t {
                toks[i] = data.get(start + i);
                tgts[i] = data.get(start + i + 1);
            }
        }
        debug_assert!(targets.iter().all(|&x| x != IGNORE));
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
