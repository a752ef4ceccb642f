//! Thin f32 GEMMs for rank-r adapters (LoRA: r ≈ 8–64, or a stack of a few adapters with
//! R = r·members, against N ≈ 1,024 rows and 192–3,072 features): the six products of an
//! adapter's forward, input gradient and weight gradients. A general GEMM is far from peak on
//! them — one dimension is r, so its packing and blocking cost as much as the arithmetic, and
//! the K = r products re-read and re-write their whole `[N, OC]` output for little work. Two
//! kernels cover all six:
//!
//! - **skinny** (`Thin::x_at`, `dy_b`, `dyt_u`, `vt_x`): an output `[M, r]` (or its
//!   transpose) with a long reduction. A tile of 8 output rows × up to 48 columns lives in up
//!   to 24 vector registers while k streams once: per k, up to three 16-wide loads of the
//!   right operand and 8 broadcasts of the left.
//! - **wide** (`Thin::u_bt`, `Thin::v_a`): an output `[M, OC]` with k = r. alpha·W is packed
//!   once per call into rows of the padded width; a tile of 6 rows × 64 columns of the output
//!   is loaded once, gets all r rank-1 updates in 24 registers, and is stored once, whatever r.
//!
//! Every output is touched once per call (read and written when accumulating, written
//! otherwise), and the adapter scale s is the `alpha` of each call (no separate pass).
//!
//! Numerics (the same in the AVX-512 kernels and their portable twins, bit for bit): every
//! output element is one fused multiply-add chain over k in increasing order. The skinny
//! kernel's chain starts at 0 and the result is then `alpha·acc` (or `fma(alpha, acc, old)`
//! when accumulating); the wide kernel's chain starts at the old value (or 0) and multiplies by
//! `alpha·w` rounded to f32. On x86-64 with AVX-512F the vector kernels run; elsewhere the
//! portable ones (`f32::mul_add`, one instruction on aarch64 and on x86-64 with FMA).
//!
//! Layouts: every matrix is row-major with an explicit row stride (`ld*`) where callers hold
//! it inside a wider buffer (a stack's `[N, R]` u and v, a fused `[N, q|k|v]` output); the
//! adapter weights are dense: A `[r, IC]`, B `[OC, r]`, dA `[r, IC]`, dB `[OC, r]`. Each call
//! asserts that its slices hold the shape it was given and panics otherwise (a caller bug).

use super::Par;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

/// Rows per skinny tile.
const R: usize = 8;
/// Lanes of a vector.
const L: usize = 16;
/// Columns per skinny tile (three vectors).
const SW: usize = 3 * L;
/// Rows per wide tile.
const WR: usize = 6;
/// Columns per wide tile (four vectors); packed W rows are padded to a multiple of it.
const WC: usize = 4 * L;
/// Rows per wide task (the unit of work handed to a thread).
const GROUP: usize = 48;

/// Whether the AVX-512 kernels run on this machine (else the portable ones do).
pub fn available() -> bool {
    isa() == Isa::Avx512
}

/// Which kernel family runs: AVX-512, portable compiled with FMA (x86-64 without AVX-512),
/// or portable as compiled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Avx512,
    // Detected only on x86-64; elsewhere (aarch64) the portable kernels run as compiled.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Fma,
    Plain,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return Isa::Fma;
        }
    }
    Isa::Plain
}

/// Packing scratch for the products that need it, sized once: Aᵀ `[IC, r]` for `x_at`, and
/// alpha·W `[r, ⌈width/64⌉·64]` for `u_bt` and `v_a`. A call never allocates.
pub struct Thin {
    at: Vec<f32>,
    wp: Vec<f32>,
}

impl Thin {
    /// Scratch for adapters (or stacks) of up to `max_r` rows on features (IC or OC) up to
    /// `max_width`: max_r·(max_width + ⌈max_width/64⌉·64) floats, allocated fallibly.
    pub fn new(max_width: usize, max_r: usize) -> anyhow::Result<Self> {
        let what = "the thin GEMMs' packing scratch";
        let at = crate::memory::try_vec_f32(max_width * max_r, what)?;
        let wp = crate::memory::try_vec_f32(max_r * max_width.div_ceil(WC) * WC, what)?;
        Ok(Thin { at, wp })
    }

    /// `u [N, r] = alpha · x [N, IC] · aᵀ` (overwritten), `u` of row stride `ldu`, `x` of
    /// `ldx`, `a` `[r, IC]`: an adapter's (or a stack's) down-projection s·x·Aᵀ.
    #[allow(clippy::too_many_arguments)]
    pub fn x_at(
        &mut self,
        par: Par,
        u: &mut [f32],
        ldu: usize,
        x: &[f32],
        ldx: usize,
        a: &[f32],
        n: usize,
        ic: usize,
        r: usize,
        alpha: f32,
    ) {
        assert!(ic * r <= self.at.len(), "thin x_at: A of {r}×{ic}, scratch holds {}", self.at.len());
        assert!(a.len() >= r * ic, "thin x_at: A holds {}, [{r}, {ic}] needs {}", a.len(), r * ic);
        let at = &mut self.at[..ic * r];
        for (k, row) in at.chunks_exact_mut(r.max(1)).enumerate() {
            row.iter_mut().enumerate().for_each(|(j, v)| *v = a[j * ic + k]);
        }
        let out = Out { data: u, rs: ldu, cs: 1 };
        skinny(par, n, r, ic, alpha, Lhs { data: x, rs: ldx, cs: 1 }, &self.at[..ic * r], r, out, false);
    }

    /// `y [N, OC] (+)= alpha · u [N, r] · bᵀ`, `y` of row stride `ldy`, `u` of `ldu`, `b`
    /// `[OC, r]`: an adapter's up-projection added into the base projection's output.
    #[allow(clippy::too_many_arguments)]
    pub fn u_bt(
        &mut self,
        par: Par,
        y: &mut [f32],
        ldy: usize,
        u: &[f32],
        ldu: usize,
        b: &[f32],
        n: usize,
        oc: usize,
        r: usize,
        alpha: f32,
        acc: bool,
    ) {
        wide(par, &mut self.wp, n, oc, r, alpha, u, ldu, Rhs { data: b, ks: 1, js: r }, y, ldy, acc);
    }

    /// `dx [N, IC] (+)= alpha · v [N, r] · a`, `dx` of row stride `ldx`, `v` of `ldv`, `a`
    /// `[r, IC]`: an adapter's (or a stack's) input gradient through A.
    #[allow(clippy::too_many_arguments)]
    pub fn v_a(
        &mut self,
        par: Par,
        dx: &mut [f32],
        ldx: usize,
        v: &[f32],
        ldv: usize,
        a: &[f32],
        n: usize,
        ic: usize,
        r: usize,
        alpha: f32,
        acc: bool,
    ) {
        wide(par, &mut self.wp, n, ic, r, alpha, v, ldv, Rhs { data: a, ks: ic, js: 1 }, dx, ldx, acc);
    }
}

/// `v [N, r] = alpha · dy [N, OC] · b` (overwritten), `v` of row stride `ldv`, `dy` of `ldy`,
/// `b` `[OC, r]`: an adapter's s·dy·B.
#[allow(clippy::too_many_arguments)]
pub fn dy_b(
    par: Par,
    v: &mut [f32],
    ldv: usize,
    dy: &[f32],
    ldy: usize,
    b: &[f32],
    n: usize,
    oc: usize,
    r: usize,
    alpha: f32,
) {
    let out = Out { data: v, rs: ldv, cs: 1 };
    skinny(par, n, r, oc, alpha, Lhs { data: dy, rs: ldy, cs: 1 }, b, r, out, false);
}

/// `db [OC, r] (+)= alpha · dyᵀ · u` with `dy` `[N, OC]` of row stride `ldy` and `u` `[N, r]`
/// of `ldu`: an adapter's B gradient.
#[allow(clippy::too_many_arguments)]
pub fn dyt_u(
    par: Par,
    db: &mut [f32],
    dy: &[f32],
    ldy: usize,
    u: &[f32],
    ldu: usize,
    n: usize,
    oc: usize,
    r: usize,
    alpha: f32,
    acc: bool,
) {
    let out = Out { data: db, rs: r, cs: 1 };
    skinny(par, oc, r, n, alpha, Lhs { data: dy, rs: 1, cs: ldy }, u, ldu, out, acc);
}

/// `da [r, IC] (+)= alpha · vᵀ · x` with `v` `[N, r]` of row stride `ldv` and `x` `[N, IC]` of
/// `ldx`: an adapter's (or a stack's) A gradient. Computed as its transpose `xᵀ·v`, written
/// transposed (the output is small; the long operands are read in their own layout).
#[allow(clippy::too_many_arguments)]
pub fn vt_x(
    par: Par,
    da: &mut [f32],
    v: &[f32],
    ldv: usize,
    x: &[f32],
    ldx: usize,
    n: usize,
    ic: usize,
    r: usize,
    alpha: f32,
    acc: bool,
) {
    let out = Out { data: da, rs: 1, cs: ic };
    skinny(par, ic, r, n, alpha, Lhs { data: x, rs: 1, cs: ldx }, v, ldv, out, acc);
}

/// The left operand of `skinny`: element (i, k) at `data[i·rs + k·cs]`.
#[derive(Clone, Copy)]
struct Lhs<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// The output of `skinny`: element (i, j) at `data[i·rs + j·cs]`.
struct Out<'a> {
    data: &'a mut [f32],
    rs: usize,
    cs: usize,
}

/// The right operand of `wide`: element (k, j) at `data[k·ks + j·js]`.
#[derive(Clone, Copy)]
struct Rhs<'a> {
    data: &'a [f32],
    ks: usize,
    js: usize,
}

/// Index span of a strided `rows × cols` view (0 when empty).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 }
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used to hand tasks disjoint sets of output elements (see `skinny`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Element `i` (a method, so that closures capture the whole Send + Sync wrapper rather
    /// than its raw-pointer field). Safety: `i` must be inside the output.
    unsafe fn at(self, i: usize) -> *mut f32 {
        // SAFETY: forwarded to the caller.
        unsafe { self.0.add(i) }
    }
}

/// `out (+)= alpha · X [M, K] · bt [K, r]` (bt row-major with row stride `ldb`): per tile of
/// R rows × up to 48 columns, k streamed once.
#[allow(clippy::too_many_arguments)]
fn skinny(par: Par, m: usize, r: usize, k: usize, alpha: f32, x: Lhs, bt: &[f32], ldb: usize, out: Out, acc: bool) {
    if m == 0 || r == 0 {
        return;
    }
    assert!(x.data.len() >= span(m, k, x.rs, x.cs), "thin: left operand holds {}, too short", x.data.len());
    assert!(ldb >= r && bt.len() >= span(k, r, ldb, 1), "thin: right operand too short (or stride < r)");
    assert!(out.data.len() >= span(m, r, out.rs, out.cs), "thin: output holds {}, too short", out.data.len());
    // Distinct (i, j) must be distinct elements: tasks write disjoint row ranges through a
    // shared pointer.
    assert!((out.cs == 1 && out.rs >= r) || (out.rs == 1 && out.cs >= m), "thin: output layout overlaps itself");
    let isa = isa();
    // Column-contiguous X (the transpose of a row-major matrix: dB's dyᵀ, dA's xᵀ) takes 16
    // rows per tile as one vector load per k, so each k reads one whole cache line of the long
    // operand; row-contiguous X takes 8 rows by broadcasts.
    let tr = x.rs == 1 && x.cs != 1;
    let (ti, tj) = if tr { (L, L) } else { (R, SW) };
    let tiles = m.div_ceil(ti);
    let parts = if par.threads > 1 && tiles > 1 { par.threads.min(tiles) } else { 1 };
    let per = tiles.div_ceil(parts);
    let (ors, ocs) = (out.rs, out.cs);
    let ptr = OutPtr(out.data.as_mut_ptr());
    let task = |p: usize| {
        // SAFETY: (i, j) < (m, r) is inside the asserted span, and task p alone owns rows
        // [p·per·ti, (p+1)·per·ti), whose elements are disjoint from other rows' by the layout
        // assert.
        let put = |i: usize, j: usize, v: f32| unsafe {
            let o = ptr.at(i * ors + j * ocs);
            *o = if acc { alpha.mul_add(v, *o) } else { alpha * v };
        };
        for t in p * per..((p + 1) * per).min(tiles) {
            let (i0, mr) = (t * ti, ti.min(m - t * ti));
            for j0 in (0..r).step_by(tj) {
                let nr = tj.min(r - j0);
                if tr {
                    let mut tile = [[0.0f32; L]; L];
                    skinny_t_tile(isa, k, x.data, i0, mr, x.cs, &bt[j0..], ldb, nr, &mut tile);
                    for (jj, col) in tile.iter().enumerate().take(nr) {
                        col.iter().enumerate().take(mr).for_each(|(ii, &v)| put(i0 + ii, j0 + jj, v));
                    }
                } else {
                    let mut tile = [[0.0f32; SW]; R];
                    skinny_tile(isa, k, &x, i0, mr, &bt[j0..], ldb, nr, &mut tile);
                    for (ii, row) in tile.iter().enumerate().take(mr) {
                        row.iter().enumerate().take(nr).for_each(|(jj, &v)| put(i0 + ii, j0 + jj, v));
                    }
                }
            }
        }
    };
    if parts > 1 {
        (0..parts).into_par_iter().for_each(task);
    } else {
        task(0);
    }
}

/// Rows i0..i0+mr (≤ 16) of a column-contiguous X (element (i, k) at `x[i + k·xcs]`) times
/// columns 0..nr (≤ 16) of `bt`, transposed into `tile[j][i]` (chains start at 0).
#[allow(clippy::too_many_arguments)]
fn skinny_t_tile(
    isa: Isa,
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
    assert!((1..=L).contains(&mr) && (1..=L).contains(&nr));
    assert!(k == 0 || (i0 + (k - 1) * xcs + mr <= x.len() && (k - 1) * ldb + nr <= bt.len()));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: AVX-512F was detected; the index ranges were asserted above.
            unsafe { x86::skinny_t_tile(k, x, i0, mr, xcs, bt, ldb, nr, tile) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Fma => {
            // SAFETY: FMA was detected.
            unsafe { skinny_t_tile_fma(k, x, i0, mr, xcs, bt, ldb, nr, tile) }
        }
        _ => skinny_t_tile_portable(k, x, i0, mr, xcs, bt, ldb, nr, tile),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_t_tile_fma(
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
    skinny_t_tile_portable(k, x, i0, mr, xcs, bt, ldb, nr, tile)
}

/// The portable transposed skinny tile: per element, `acc = fma(x, b, acc)` over k from 0.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn skinny_t_tile_portable(
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
    for kk in 0..k {
        let xs = &x[i0 + kk * xcs..i0 + kk * xcs + mr];
        for (col, &b) in tile.iter_mut().zip(&bt[kk * ldb..kk * ldb + nr]) {
            col.iter_mut().zip(xs).for_each(|(t, &a)| *t = a.mul_add(b, *t));
        }
    }
}

/// Rows i0..i0+mr of X times columns 0..nr (≤ 48) of `bt` into `tile` (chains start at 0).
#[allow(clippy::too_many_arguments)]
fn skinny_tile(
    isa: Isa,
    k: usize,
    x: &Lhs,
    i0: usize,
    mr: usize,
    bt: &[f32],
    ldb: usize,
    nr: usize,
    tile: &mut [[f32; SW]; R],
) {
    // Rows past mr repeat the last row (valid memory; their results are not stored).
    let rows: [usize; R] = std::array::from_fn(|ii| (i0 + ii.min(mr - 1)) * x.rs);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: AVX-512F was detected; every index read is inside the spans asserted in
            // `skinny` (rows < m, k' < k, columns < nr ≤ r ≤ ldb).
            unsafe { x86::skinny_tile(k, x.data, &rows, x.cs, bt, ldb, nr, tile) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Fma => {
            // SAFETY: FMA was detected.
            unsafe { skinny_tile_fma(k, x.data, &rows, x.cs, bt, ldb, nr, tile) }
        }
        _ => skinny_tile_portable(k, x.data, &rows, x.cs, bt, ldb, nr, tile),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_tile_fma(
    k: usize,
    x: &[f32],
    rows: &[usize; R],
    xcs: usize,
    bt: &[f32],
    ldb: usize,
    nr: usize,
    tile: &mut [[f32; SW]; R],
) {
    skinny_tile_portable(k, x, rows, xcs, bt, ldb, nr, tile)
}

/// The portable skinny tile: per element, `acc = fma(x, b, acc)` over k in order from 0.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn skinny_tile_portable(
    k: usize,
    x: &[f32],
    rows: &[usize; R],
    xcs: usize,
    bt: &[f32],
    ldb: usize,
    nr: usize,
    tile: &mut [[f32; SW]; R],
) {
    for kk in 0..k {
        let b = &bt[kk * ldb..kk * ldb + nr];
        for (ii, row) in tile.iter_mut().enumerate() {
            let a = x[rows[ii] + kk * xcs];
            row.iter_mut().zip(b).for_each(|(t, &bv)| *t = a.mul_add(bv, *t));
        }
    }
}

/// `y [M, N] (+)= alpha · u [M, r] · W [r, N]`: alpha·W packed once into `wp` as `[r, np]`
/// (np = N rounded up to 64, zero-padded); per task of GROUP rows, per 6-row tile, per
/// 64-column strip, the tile's output is loaded once (or zeroed), gets its r updates, stored once.
#[allow(clippy::too_many_arguments)]
fn wide(
    par: Par,
    wp: &mut [f32],
    m: usize,
    n: usize,
    r: usize,
    alpha: f32,
    u: &[f32],
    ldu: usize,
    w: Rhs,
    y: &mut [f32],
    ldy: usize,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldu >= r && u.len() >= span(m, r, ldu, 1), "thin: left operand too short (or stride < r)");
    assert!(w.data.len() >= span(r, n, w.ks, w.js), "thin: right operand holds {}, too short", w.data.len());
    assert!(ldy >= n && y.len() >= span(m, n, ldy, 1), "thin: output too short (or stride < width)");
    let np = n.div_ceil(WC) * WC;
    assert!(wp.len() >= r * np, "thin: scratch holds {}, alpha·W needs {}", wp.len(), r * np);
    let wp = &mut wp[..r * np];
    for (kk, row) in wp.chunks_exact_mut(np).enumerate() {
        let (data, base) = (w.data, kk * w.ks);
        row[..n].iter_mut().enumerate().for_each(|(j, v)| *v = alpha * data[base + j * w.js]);
        row[n..].fill(0.0);
    }
    let wp = &*wp;
    let isa = isa();
    let y = &mut y[..span(m, n, ldy, 1)];
    // Row-major over tiles (all strips of 6 rows, then the next 6): y streams through 6 rows
    // at a time, which the hardware prefetcher follows; strip-major order (48 rows per strip)
    // ran 1.5x slower than sgemm on [1024, 1536] outputs. alpha·W (r × np) is re-read from L2
    // per 6 rows.
    let task = |(g, yc): (usize, &mut [f32])| {
        let (i0, rows) = (g * GROUP, GROUP.min(m - g * GROUP));
        for it in (0..rows).step_by(WR) {
            let mr = WR.min(rows - it);
            let ut = &u[(i0 + it) * ldu..];
            for j0 in (0..n).step_by(WC) {
                let nr = WC.min(n - j0);
                wide_tile(isa, mr, ut, ldu, r, &wp[j0.min(wp.len())..], np, &mut yc[it * ldy + j0..], ldy, nr, !acc);
            }
        }
    };
    if par.threads > 1 && m > GROUP {
        y.par_chunks_mut(GROUP * ldy).enumerate().for_each(task);
    } else {
        y.chunks_mut(GROUP * ldy).enumerate().for_each(task);
    }
}

/// `mr` (≤ 6) rows × `nr` (≤ 64) columns of `y` (+)= u[.., 0..r] · W[0..r, 0..nr], W of row
/// stride `ldw` with at least 64 readable columns per row; chains from y or from 0 (`zero`).
#[allow(clippy::too_many_arguments)]
fn wide_tile(
    isa: Isa,
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
    assert!((1..=WR).contains(&mr) && (1..=WC).contains(&nr));
    assert!((mr - 1) * ldu + r <= u.len() && (mr - 1) * ldy + nr <= y.len());
    assert!(r == 0 || (r - 1) * ldw + WC <= w.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: AVX-512F was detected; the index ranges were asserted above.
            unsafe { x86::wide_tile(mr, u, ldu, r, w, ldw, y, ldy, nr, zero) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Fma => {
            // SAFETY: FMA was detected.
            unsafe { wide_tile_fma(mr, u, ldu, r, w, ldw, y, ldy, nr, zero) }
        }
        _ => wide_tile_portable(mr, u, ldu, r, w, ldw, y, ldy, nr, zero),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn wide_tile_fma(
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
    wide_tile_portable(mr, u, ldu, r, w, ldw, y, ldy, nr, zero)
}

/// The portable wide tile: per element, `acc = y (or 0)`, then `acc = fma(u, w, acc)` over k.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn wide_tile_portable(
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
    for i in 0..mr {
        let (yr, ur) = (&mut y[i * ldy..i * ldy + nr], &u[i * ldu..i * ldu + r]);
        for (j, yv) in yr.iter_mut().enumerate() {
            let mut t = if zero { 0.0 } else { *yv };
            for (kk, &uv) in ur.iter().enumerate() {
                t = uv.mul_add(w[kk * ldw + j], t);
            }
            *yv = t;
        }
    }
}
