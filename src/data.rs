//! Token data and micro-batch sampling.
//!
//! Files are llama2.c's pretokenized `.bin`: a flat little-endian `u16` array, no header,
//! read through mmap (never loaded whole). Every id is checked against the vocabulary once at
//! open, so the hot path can index embeddings without checks.

use crate::ops::cross_entropy::IGNORE;
use crate::rng::Rng;
use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

enum Backing {
    U16(Mmap),
    Owned(Vec<u32>),
}

/// A read-only sequence of token ids, all below `vocab_size`.
pub struct TokenData {
    backing: Backing,
    len: usize,
    /// Where the tokens came from, for messages and telemetry.
    pub source: String,
}

impl TokenData {
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
        let data =
            TokenData { backing: Backing::U16(map), len: bytes as usize / 2, source: path.display().to_string() };
        data.check_vocab(vocab_size)?;
        Ok(data)
    }

    pub fn from_vec(tokens: Vec<u32>, vocab_size: usize, source: &str) -> Result<Self> {
        ensure!(!tokens.is_empty(), "token data '{source}' is empty");
        let data = TokenData { len: tokens.len(), backing: Backing::Owned(tokens), source: source.to_string() };
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
            Backing::U16(map) => u16::from_le_bytes([map[2 * i], map[2 * i + 1]]) as u32,
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

/// Synthetic data with learnable structure, for the default run and tests until the built-in
/// story corpus exists: a Markov chain where each token has four possible successors with
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
        let dir = std::env::temp_dir().join(format!("anetrain-data-{}", std::process::id()));
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
        std::fs::remove_dir_all(&dir).unwrap();
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
