//! The AVX-512 kernels of `super`: the same fused chains as the portable twins, bit for bit.
//! Register tiles are arrays of vectors indexed by row and column, which is how they read.
#![allow(clippy::needless_range_loop)]

use super::{L, R, SW, WC, WR};
use std::arch::x86_64::*;

/// Lanes `0..n` of a 16-lane mask (n clamped to 0..=16).
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= L { 0xffff } else { ((1u32 << n) - 1) as __mmask16 }
}

/// The skinny tile: rows `rows[ii]` of x (k-th element at `+ k·xcs`) times columns 0..nr of
/// `bt`, in 8 × ⌈nr/16⌉ zmm accumulators (lanes past nr masked off on load).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn skinny_tile(
    k: usize,
    x: &[f32],
    rows: &[usize; R],
    xcs: usize,
    bt: &[f32],
    ldb: usize,
    nr: usize,
    tile: &mut [[f32; SW]; R],
) {
    debug_assert!(k == 0 || rows.iter().all(|&r| r + (k - 1) * xcs < x.len()));
    debug_assert!((1..=SW).contains(&nr) && (k == 0 || (k - 1) * ldb + nr <= bt.len()));
    // SAFETY: forwarded from the caller (AVX-512F present, indices in range).
    unsafe {
        match nr.div_ceil(L) {
            1 => skinny_nv::<1>(k, x, rows, xcs, bt, ldb, nr, tile),
            2 => skinny_nv::<2>(k, x, rows, xcs, bt, ldb, nr, tile),
            _ => skinny_nv::<3>(k, x, rows, xcs, bt, ldb, nr, tile),
        }
    }
}

/// `skinny_tile` with NV vectors per row (the last one masked to nr).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_nv<const NV: usize>(
    k: usize,
    x: &[f32],
    rows: &[usize; R],
    xcs: usize,
    bt: &[f32],
    ldb: usize,
    nr: usize,
    tile: &mut [[f32; SW]; R],
) {
    let mask: [__mmask16; NV] = std::array::from_fn(|v| lanes(nr.saturating_sub(v * L)));
    let xp: [*const f32; R] = std::array::from_fn(|ii| x.as_ptr().wrapping_add(rows[ii]));
    let bp = bt.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for kk in 0..k {
        // SAFETY: indices bounded as the caller's debug asserts state; masked lanes are not
        // read.
        unsafe {
            let b: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(mask[v], bp.add(kk * ldb + v * L)));
            let off = kk * xcs;
            for ii in 0..R {
                let a = _mm512_set1_ps(*xp[ii].add(off));
                for v in 0..NV {
                    acc[ii][v] = _mm512_fmadd_ps(a, b[v], acc[ii][v]);
                }
            }
        }
    }
    for ii in 0..R {
        for v in 0..NV {
            // SAFETY: tile rows hold SW = 3·L floats and v < NV ≤ 3.
            unsafe { _mm512_storeu_ps(tile[ii].as_mut_ptr().add(v * L), acc[ii][v]) };
        }
    }
}

/// Rows of X ahead of the current one that `skinny_t_tile` prefetches (a prefetch hint never
/// faults, past the end included).
const PF: usize = 16;

/// The transposed skinny tile: rows i0..i0+mr (≤ 16) of a column-contiguous X (one masked
/// vector per k) times columns 0..nr (≤ 16) of `bt` (broadcasts), into `tile[j][i]`.
/// Columns past nr compute on a repeat of the last column (their results are not used).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn skinny_t_tile(
    k: usize,
    x: &[f32],
    i0: usize,
    mr: usize,
    xcs: usize,
    bt: &[f32],
    ldb: usize,
    nr: usize,
    tile: &mut [[f32; L]; L],
) {
    let mask = lanes(mr);
    let (xp, bp) = (x.as_ptr().wrapping_add(i0), bt.as_ptr());
    let mut acc = [_mm512_setzero_ps(); L];
    // SAFETY (both loops): x's rows i0..i0+mr at every k < k and bt's columns < nr at every
    // k < k are in range (asserted by the caller); masked lanes are not read.
    if nr == L {
        for kk in 0..k {
            unsafe {
                // X's rows are far apart (a whole [.., OC] row per k) and cross pages, which
                // the hardware prefetcher does not follow: ask for the line PF rows ahead, into
                // L2 only: strides of 6 or 12 KB put every row's line in one or two L1 sets,
                // and 16 prefetched lines there evict each other (into L1 this ran the
                // [1536 × 16]·[16 × 1024] dA at 28 GFLOP/s, against 72 without a prefetch).
                _mm_prefetch::<_MM_HINT_T1>(xp.wrapping_add((kk + PF) * xcs) as *const i8);
                let a = _mm512_maskz_loadu_ps(mask, xp.add(kk * xcs));
                let b = bp.add(kk * ldb);
                for jj in 0..L {
                    acc[jj] = _mm512_fmadd_ps(a, _mm512_set1_ps(*b.add(jj)), acc[jj]);
                }
            }
        }
    } else {
        for kk in 0..k {
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(xp.wrapping_add((kk + PF) * xcs) as *const i8);
                let a = _mm512_maskz_loadu_ps(mask, xp.add(kk * xcs));
                let b = bp.add(kk * ldb);
                for jj in 0..L {
                    acc[jj] = _mm512_fmadd_ps(a, _mm512_set1_ps(*b.add(jj.min(nr - 1))), acc[jj]);
                }
            }
        }
    }
    for jj in 0..L {
        // SAFETY: tile rows hold L floats.
        unsafe { _mm512_storeu_ps(tile[jj].as_mut_ptr(), acc[jj]) };
    }
}

/// The wide tile: mr (≤ 6) rows × nr (≤ 64) columns of y in 24 zmm accumulators, loaded once
/// (or zeroed), r rank-1 updates from u's rows and W's rows (64 readable columns each), stored
/// once. Rows past mr compute on a repeat of the last row and are not stored.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn wide_tile(
    mr: usize,
    u: &[f32],
    ldu: usize,
    r: usize,
    w: &[f32],
    ldw: usize,
    y: &mut [f32],
    ldy: usize,
    nr: usize,
    zero: bool,
) {
    const NV: usize = WC / L;
    debug_assert!((1..=WR).contains(&mr) && (1..=WC).contains(&nr));
    let mask: [__mmask16; NV] = std::array::from_fn(|v| lanes(nr.saturating_sub(v * L)));
    let up: [*const f32; WR] = std::array::from_fn(|ii| u.as_ptr().wrapping_add(ii.min(mr - 1) * ldu));
    let (wp, yp) = (w.as_ptr(), y.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); NV]; WR];
    // The next strip of these rows (a hint: prefetches never fault), so that its first loads
    // do not wait on L3 while this tile's FMAs run.
    for ii in 0..mr {
        for v in 0..NV {
            _mm_prefetch::<_MM_HINT_T0>(yp.wrapping_add(ii * ldy + WC + v * L) as *const i8);
        }
    }
    if !zero {
        for ii in 0..mr {
            for v in 0..NV {
                // SAFETY: row ii < mr and columns under nr are inside y (asserted by the
                // caller); masked lanes are not read.
                acc[ii][v] = unsafe { _mm512_maskz_loadu_ps(mask[v], yp.add(ii * ldy + v * L)) };
            }
        }
    }
    for kk in 0..r {
        // SAFETY: W's row kk holds 64 readable floats and u's rows hold r (asserted by the
        // caller).
        unsafe {
            let b: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(wp.add(kk * ldw + v * L)));
            for ii in 0..WR {
                let a = _mm512_set1_ps(*up[ii].add(kk));
                for v in 0..NV {
                    acc[ii][v] = _mm512_fmadd_ps(a, b[v], acc[ii][v]);
                }
            }
        }
    }
    for ii in 0..mr {
        for v in 0..NV {
            // SAFETY: as for the loads.
            unsafe { _mm512_mask_storeu_ps(yp.add(ii * ldy + v * L), mask[v], acc[ii][v]) };
        }
    }
}
