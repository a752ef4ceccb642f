use super::*;
use crate::ops::testing::randn;
use crate::rng::Rng;

/// f64 `out(i, j) = Σ_k X(i, k)·Y(k, j)` and `Σ_k |X·Y|` for the error bound.
fn reference(
    m: usize,
    n: usize,
    k: usize,
    x: impl Fn(usize, usize) -> f32,
    y: impl Fn(usize, usize) -> f32,
) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let p = x(i, kk) as f64 * y(kk, j) as f64;
                out[i * n + j] += p;
                mag[i * n + j] += p.abs();
            }
        }
    }
    (out, mag)
}

/// `got(i, j)` against `init(i, j) + alpha·want` (init only when `acc`): f32 chains of length
/// k err by at most k·ε·Σ|x·y| (times a small constant), plus the rounding of the final
/// scale-and-add.
#[allow(clippy::too_many_arguments)]
fn check(
    what: &str,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    want: &(Vec<f64>, Vec<f64>),
    init: impl Fn(usize, usize) -> f32,
    acc: bool,
    got: impl Fn(usize, usize) -> f32,
) {
    let eps = f32::EPSILON as f64;
    for i in 0..m {
        for j in 0..n {
            let base = if acc { init(i, j) as f64 } else { 0.0 };
            let expect = base + alpha as f64 * want.0[i * n + j];
            let tol = 2.0 * (k as f64 + 2.0) * eps * (alpha.abs() as f64 * want.1[i * n + j] + base.abs()) + 1e-30;
            let g = got(i, j) as f64;
            assert!(
                (g - expect).abs() <= tol,
                "{what} m{m} n{n} k{k} acc {acc} [{i},{j}]: {g} vs {expect} (tol {tol:e})"
            );
        }
    }
}

/// `buf` equals `orig` outside rows 0..rows × columns 0..cols of a view of row stride `ld`.
fn untouched_outside(what: &str, buf: &[f32], orig: &[f32], rows: usize, cols: usize, ld: usize) {
    for (idx, (b, o)) in buf.iter().zip(orig).enumerate() {
        let (i, j) = (idx / ld, idx % ld);
        if i >= rows || j >= cols {
            assert_eq!(b.to_bits(), o.to_bits(), "{what} wrote outside its view at [{i},{j}]");
        }
    }
}

/// (n, r, k): rows past a tile of 8 or 6 (and fewer than one) and past a wide task of 48; r = 1,
/// past a vector of 16, past a skinny tile of 48; k odd, past a wide strip of 64.
const SHAPES: [(usize, usize, usize); 8] =
    [(1, 1, 1), (7, 5, 13), (13, 16, 37), (37, 17, 64), (64, 33, 9), (130, 48, 200), (50, 50, 70), (97, 49, 130)];

fn pars() -> [Par; 2] {
    [Par::seq(), Par { threads: 2, ..Par::seq() }]
}

#[test]
fn x_at_and_dy_b_match_f64_with_strides() {
    let mut rng = Rng::new(21);
    for (n, r, k) in SHAPES {
        let (ld, ldo) = (k + 3, r + 5);
        let x = randn(&mut rng, n * ld);
        let a = randn(&mut rng, r * k); // [r, K]
        let b = randn(&mut rng, k * r); // [K, r] (dy·B with OC = k)
        let want_a = reference(n, r, k, |i, kk| x[i * ld + kk], |kk, j| a[j * k + kk]);
        let want_b = reference(n, r, k, |i, kk| x[i * ld + kk], |kk, j| b[kk * r + j]);
        for par in pars() {
            let o0 = randn(&mut rng, n * ldo);
            let mut u = o0.clone();
            Thin::new(k, r).unwrap().x_at(par, &mut u, ldo, &x, ld, &a, n, k, r, 0.5);
            check("x_at", n, r, k, 0.5, &want_a, |_, _| 0.0, false, |i, j| u[i * ldo + j]);
            untouched_outside("x_at", &u, &o0, n, r, ldo);
            let mut v = o0.clone();
            dy_b(par, &mut v, ldo, &x, ld, &b, n, k, r, -2.0);
            check("dy_b", n, r, k, -2.0, &want_b, |_, _| 0.0, false, |i, j| v[i * ldo + j]);
            untouched_outside("dy_b", &v, &o0, n, r, ldo);
        }
    }
}

#[test]
fn weight_gradients_match_f64_accumulating_or_not() {
    let mut rng = Rng::new(22);
    for (n, r, k) in SHAPES {
        // Here k of SHAPES is the feature count (OC or IC) and n the token count.
        let (f, ld, ldu) = (k, k + 5, r + 3);
        let dy = randn(&mut rng, n * ld);
        let u = randn(&mut rng, n * ldu);
        let db0 = randn(&mut rng, f * r);
        let da0 = randn(&mut rng, r * f);
        let want_db = reference(f, r, n, |o, t| dy[t * ld + o], |t, j| u[t * ldu + j]);
        let want_da = reference(r, f, n, |j, t| u[t * ldu + j], |t, i| dy[t * ld + i]);
        for par in pars() {
            for acc in [true, false] {
                let mut db = db0.clone();
                dyt_u(par, &mut db, &dy, ld, &u, ldu, n, f, r, 0.25, acc);
                check("dyt_u", f, r, n, 0.25, &want_db, |i, j| db0[i * r + j], acc, |i, j| db[i * r + j]);
                let mut da = da0.clone();
                vt_x(par, &mut da, &u, ldu, &dy, ld, n, f, r, 3.0, acc);
                check("vt_x", r, f, n, 3.0, &want_da, |j, i| da0[j * f + i], acc, |j, i| da[j * f + i]);
            }
        }
    }
}

#[test]
fn wide_products_match_f64_and_leave_the_rest_alone() {
    let mut rng = Rng::new(23);
    for (n, r, f) in SHAPES {
        // r here is the rank (k of the product), f the output width.
        let (ld, ldu) = (f + 4, r + 2);
        let u = randn(&mut rng, n * ldu);
        let b = randn(&mut rng, f * r); // [OC, r]
        let a = randn(&mut rng, r * f); // [r, IC]
        let y0 = randn(&mut rng, n * ld);
        let want_b = reference(n, f, r, |i, kk| u[i * ldu + kk], |kk, j| b[j * r + kk]);
        let want_a = reference(n, f, r, |i, kk| u[i * ldu + kk], |kk, j| a[kk * f + j]);
        for par in pars() {
            for acc in [true, false] {
                let mut y = y0.clone();
                Thin::new(f, r).unwrap().u_bt(par, &mut y, ld, &u, ldu, &b, n, f, r, 0.5, acc);
                check("u_bt", n, f, r, 0.5, &want_b, |i, j| y0[i * ld + j], acc, |i, j| y[i * ld + j]);
                untouched_outside("u_bt", &y, &y0, n, f, ld);
                let mut x = y0.clone();
                Thin::new(f, r).unwrap().v_a(par, &mut x, ld, &u, ldu, &a, n, f, r, -1.5, acc);
                check("v_a", n, f, r, -1.5, &want_a, |i, j| y0[i * ld + j], acc, |i, j| x[i * ld + j]);
                untouched_outside("v_a", &x, &y0, n, f, ld);
            }
        }
    }
}

/// r = 0 (an empty adapter) and k = 0: outputs are zero (or untouched when accumulating).
#[test]
fn empty_ranks_and_reductions() {
    let par = Par::seq();
    let mut y = vec![2.0f32; 70 * 3];
    Thin::new(70, 0).unwrap().u_bt(par, &mut y, 70, &[], 0, &[], 3, 70, 0, 1.0, true);
    assert!(y.iter().all(|&v| v == 2.0));
    Thin::new(70, 0).unwrap().u_bt(par, &mut y, 70, &[], 0, &[], 3, 70, 0, 1.0, false);
    assert!(y.iter().all(|&v| v == 0.0));
    let mut u = vec![f32::NAN; 3 * 4];
    Thin::new(0, 4).unwrap().x_at(par, &mut u, 4, &[], 0, &[], 3, 0, 4, 1.0);
    assert!(u.iter().all(|&v| v == 0.0));
}

/// The vector kernels and the portable ones give identical bits (the same fused chains).
#[test]
fn portable_kernels_match_the_fast_ones_bit_for_bit() {
    if isa() == Isa::Plain {
        eprintln!("no AVX-512 or FMA on this CPU: only the portable kernels ran");
        return;
    }
    let mut rng = Rng::new(24);
    let (k, ld) = (77, 80);
    let x = randn(&mut rng, 11 * ld);
    let bt = randn(&mut rng, k * SW);
    let lhs = Lhs { data: &x, rs: ld, cs: 1 };
    for (nr, mr) in [(48, 8), (40, 5), (17, 8), (16, 3), (9, 1)] {
        let (mut fast, mut slow) = ([[0.0f32; SW]; R], [[0.0f32; SW]; R]);
        skinny_tile(isa(), k, &lhs, 3, mr, &bt, SW, nr, &mut fast);
        skinny_tile(Isa::Plain, k, &lhs, 3, mr, &bt, SW, nr, &mut slow);
        for ii in 0..mr {
            for jj in 0..nr {
                assert_eq!(fast[ii][jj].to_bits(), slow[ii][jj].to_bits(), "skinny [{ii},{jj}] nr {nr}");
            }
        }
    }
    for (mr, nr) in [(16, 16), (9, 16), (16, 5), (1, 1)] {
        let (mut fast, mut slow) = ([[0.0f32; L]; L], [[0.0f32; L]; L]);
        skinny_t_tile(isa(), k, &x, 2, mr, 11, &bt, SW, nr, &mut fast);
        skinny_t_tile(Isa::Plain, k, &x, 2, mr, 11, &bt, SW, nr, &mut slow);
        for jj in 0..nr {
            for ii in 0..mr {
                assert_eq!(fast[jj][ii].to_bits(), slow[jj][ii].to_bits(), "skinny_t [{jj},{ii}] mr {mr} nr {nr}");
            }
        }
    }
    let w = randn(&mut rng, 50 * WC);
    let u = randn(&mut rng, 6 * 50);
    for (mr, r, nr, zero) in [(6, 16, 64, false), (6, 48, 64, true), (5, 50, 40, false), (1, 3, 1, true)] {
        let (mut fast, mut slow) = (x.clone(), x.clone());
        wide_tile(isa(), mr, &u, 50, r, &w, WC, &mut fast, ld, nr, zero);
        wide_tile(Isa::Plain, mr, &u, 50, r, &w, WC, &mut slow, ld, nr, zero);
        let same = fast.iter().zip(&slow).all(|(f, s)| f.to_bits() == s.to_bits());
        assert!(same, "wide mr {mr} r {r} nr {nr}: fast and portable differ");
    }
}
