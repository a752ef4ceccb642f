//! Vocabulary compaction (`train --compact-vocab`, facts §2.5): the classifier and the loss
//! run over the token ids that occur in the training (and validation) data only.
//!
//! Semantics: the softmax is taken over that subset `S` of the vocabulary, so the loss is
//! `−log softmax_S(xf · E_Sᵀ)[target]`, every target in `S`. Rows of the classifier (and
//! the embedding) outside `S` get no gradient and are left out of AdamW entirely, weight
//! decay included: they stay bit-for-bit as initialised or loaded. Parameters are always
//! the full vocabulary, so checkpoints, exports and generation see a full model; a model
//! trained this way has untrained logits for ids outside `S` (generation should not sample
//! them — they never occurred in its data).
//!
//! Per micro-batch: the classifier rows of `S` are gathered into `E_S [CV, C]`, the logits
//! are `[N, CV]`, targets are renumbered into `S`, and `dE_S` is scatter-added into the
//! full gradient's rows.

use anyhow::{Result, bail, ensure};

/// A subset of the vocabulary and the buffers to run the classifier over it.
#[derive(Debug)]
pub struct CompactVocab {
    /// `[CV]` full ids in ascending order (compact id i ↔ full id `ids[i]`)
    pub ids: Vec<u32>,
    /// `[V]` full id → compact id, `u32::MAX` outside the subset
    map: Vec<u32>,
    /// `[CV, C]` the subset's classifier rows (gathered every forward)
    pub(crate) e: Vec<f32>,
    /// `[CV, C]` their gradient for one micro-batch
    pub(crate) de: Vec<f32>,
    /// `[N]` the micro-batch's targets renumbered into the subset
    pub(crate) targets: Vec<u32>,
}

/// The ids that occur in `sources` (each a `(len, get)` token sequence), ascending.
pub fn occurring_ids(v: usize, sources: &[&crate::data::TokenData]) -> Result<Vec<u32>> {
    let mut seen = vec![false; v];
    for data in sources {
        for i in 0..data.len() {
            let id = data.get(i) as usize;
            ensure!(id < v, "token id {id} at position {i} of {} is outside the vocabulary of {v}", data.source);
            seen[id] = true;
        }
    }
    Ok((0..v as u32).filter(|&i| seen[i as usize]).collect())
}

impl CompactVocab {
    /// The subset `ids` (ascending, distinct, each < V) for a model of dim C and micro-
    /// batches of N positions.
    pub fn new(ids: Vec<u32>, v: usize, c: usize, n: usize) -> Result<Self> {
        ensure!(!ids.is_empty(), "--compact-vocab: the data holds no token ids");
        let mut map = vec![u32::MAX; v];
        for (k, &id) in ids.iter().enumerate() {
            ensure!((id as usize) < v, "--compact-vocab: id {id} is outside the vocabulary of {v}");
            ensure!(k == 0 || ids[k - 1] < id, "--compact-vocab: ids must be ascending and distinct");
            map[id as usize] = k as u32;
        }
        let cv = ids.len();
        let e = crate::memory::try_vec_f32(cv * c, "the compact classifier")?;
        let de = crate::memory::try_vec_f32(cv * c, "the compact classifier's gradient")?;
        Ok(CompactVocab { ids, map, e, de, targets: vec![0; n] })
    }

    /// CV, the subset's size.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// `e [CV, C]` ← the subset's rows of the full classifier `full [V, C]`.
    pub fn gather(&mut self, full: &[f32], c: usize) {
        for (dst, &id) in self.e.chunks_exact_mut(c).zip(&self.ids) {
            dst.copy_from_slice(&full[id as usize * c..(id as usize + 1) * c]);
        }
    }

    /// Renumbers `targets` into the subset (the ignore id stays); an id outside it is an error.
    pub fn remap(&mut self, targets: &[u32]) -> Result<()> {
        use crate::ops::cross_entropy::IGNORE;
        for (dst, &t) in self.targets.iter_mut().zip(targets) {
            *dst = if t == IGNORE {
                IGNORE
            } else {
                match self.map.get(t as usize) {
                    Some(&k) if k != u32::MAX => k,
                    _ => bail!(
                        "target id {t} is not in the compacted vocabulary ({} ids from the training data); \
                         run without --compact-vocab for data with other ids",
                        self.ids.len()
                    ),
                }
            };
        }
        Ok(())
    }

    /// `full [V, C]` rows of the subset += `de`.
    pub fn scatter_add(&self, full: &mut [f32], c: usize) {
        for (src, &id) in self.de.chunks_exact(c).zip(&self.ids) {
            for (d, s) in full[id as usize * c..(id as usize + 1) * c].iter_mut().zip(src) {
                *d += s;
            }
        }
    }

    /// Row ranges `[first, end)` of a `[V, C]` tensor that the subset covers, merged runs.
    pub fn row_runs(&self) -> Vec<std::ops::Range<usize>> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for &id in &self.ids {
            let id = id as usize;
            match runs.last_mut() {
                Some(r) if r.end == id => r.end = id + 1,
                _ => runs.push(id..id + 1),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_remap_scatter_and_runs() {
        let mut cv = CompactVocab::new(vec![1, 2, 5], 6, 2, 3).unwrap();
        let full: Vec<f32> = (0..12).map(|x| x as f32).collect();
        cv.gather(&full, 2);
        assert_eq!(cv.e, [2.0, 3.0, 4.0, 5.0, 10.0, 11.0]);
        cv.remap(&[5, crate::ops::cross_entropy::IGNORE, 1]).unwrap();
        assert_eq!(cv.targets, [2, crate::ops::cross_entropy::IGNORE, 0]);
        let err = cv.remap(&[3, 1, 1]).unwrap_err().to_string();
        assert!(err.contains("target id 3 is not in the compacted vocabulary"), "{err}");
        cv.de = vec![1.0; 6];
        let mut g = vec![0.0; 12];
        cv.scatter_add(&mut g, 2);
        assert_eq!(g, [0., 0., 1., 1., 1., 1., 0., 0., 0., 0., 1., 1.]);
        assert_eq!(cv.row_runs(), [1..3, 5..6]);
        assert!(CompactVocab::new(vec![2, 1], 6, 2, 1).is_err());
        assert!(CompactVocab::new(vec![6], 6, 2, 1).is_err());
        assert!(CompactVocab::new(vec![], 6, 2, 1).is_err());
    }
}
