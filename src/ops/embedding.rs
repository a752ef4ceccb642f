//! Token embedding lookup: row `tokens[n]` of the table `[V, C]`.

use rayon::prelude::*;

/// out `[N, C]`, tokens `[N]` (each < V; checked when data is loaded), table `[V, C]`.
pub fn embedding_forward(out: &mut [f32], tokens: &[u32], table: &[f32], c: usize) {
    out[..tokens.len() * c].par_chunks_mut(c).zip(tokens).for_each(|(row, &tok)| {
        let at = tok as usize * c;
        row.copy_from_slice(&table[at..at + c]);
    });
}

/// dtable[tokens[n]] += dout[n]. Sequential: repeated tokens hit the same row, and a fixed
/// order keeps the sum bit-reproducible. O(N·C), negligible next to the GEMMs.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], tokens: &[u32], c: usize) {
    for (row, &tok) in dout.chunks_exact(c).zip(tokens) {
        let at = tok as usize * c;
        super::axpy(&mut dtable[at..at + c], 1.0, row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_scatter_add() {
        let (v, c) = (5, 3);
        let table: Vec<f32> = (0..v * c).map(|i| i as f32).collect();
        let tokens = [4u32, 0, 4, 2];
        let mut out = vec![0.0; tokens.len() * c];
        embedding_forward(&mut out, &tokens, &table, c);
        assert_eq!(&out[..3], &[12.0, 13.0, 14.0]);
        assert_eq!(&out[6..9], &[12.0, 13.0, 14.0]);
        let dout: Vec<f32> = (0..tokens.len() * c).map(|i| i as f32).collect();
        let mut dt = vec![0.0; v * c];
        embedding_backward(&mut dt, &dout, &tokens, c);
        // Row 4 receives positions 0 and 2: [0,1,2] + [6,7,8].
        assert_eq!(&dt[12..15], &[6.0, 8.0, 10.0]);
        assert_eq!(&dt[0..3], &[3.0, 4.0, 5.0]);
        assert!(dt[3..6].iter().all(|&x| x == 0.0));
    }
}
