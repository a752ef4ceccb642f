//! The adapter GEMMs, in one place for every path that runs them: beside the frozen bf16
//! GEMMs (`--bf16-matmul`: `crate::backend::cpu` calls `adapter_down`/`adapter_up` in the
//! forward and `adapter_dy_b`/`adapter_dx` in the input gradient) and in the adapter backward
//! (`crate::model`, every path: `adapter_db`, `adapter_da`).
//!
//! For `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with u = s·x·Aᵀ `[N, r]` and v = s·dy·B `[N, r]`:
//! `dx += v·A`, `dB += dyᵀ·u`, `dA += vᵀ·x`. u and v are the same numbers in the forward,
//! the input gradient and the weight gradients, so `--bf16-matmul` saves u per layer
//! (`LayerActs::lora_u`) and v per block (`LayerGrads::lora_v`) instead of computing them
//! twice.
//!
//! **Stacks.** The adapters of one layer that read the same input (q, k, v the attention
//! input; gate, up the FFN input; o and down alone) are stacked: A `[R, IC]` with R = r ·
//! members, so the down-projection u = s·x·Aᵀ, the input gradient dx += v·A and the weight
//! gradient vᵀ·x are one GEMM each over the stack (three thin GEMMs with N or K = r become one
//! with 3r, reading and writing the `[N, IC]` side once instead of three times); only the
//! B-sided products stay per member.

use crate::ops::Par;
use crate::ops::matmul::{Operand, sgemm};
use crate::prof;
use std::ops::Range;

/// The stacks, as ranges of `crate::lora::Target` slots that read one input.
pub const GROUPS: [Range<usize>; 4] = [0..3, 3..4, 4..6, 6..7];

/// One adapted projection inside a stack.
#[derive(Clone, Copy)]
pub struct Member<'a> {
    /// The `crate::lora::Target` slot (q = 0 … down = 6).
    pub slot: usize,
    /// B `[OC, r]`
    pub b: &'a [f32],
    pub oc: usize,
    /// The member's first column in u and v `[N, R]` and first row in the stacked A.
    pub col: usize,
}

/// The adapters of one layer that read one input: A `[R, IC]` stacked in slot order.
#[derive(Clone, Copy)]
pub struct Stack<'a> {
    /// `[R, IC]`
    pub a: &'a [f32],
    pub ic: usize,
    /// r, the rank
    pub r: usize,
    /// R = r · members
    pub rows: usize,
    /// Stacked rows of the layer's earlier stacks: this stack's u and v are
    /// `[first·N, (first + R)·N)` of the layer's store (`LayerActs::lora_u`).
    pub first: usize,
    /// In slot order; `None` past the last member.
    pub members: [Option<Member<'a>>; 3],
}

impl<'a> Stack<'a> {
    pub fn iter(&self) -> impl Iterator<Item = Member<'a>> + '_ {
        self.members.iter().flatten().copied()
    }

    /// This stack's `[N, R]` block of a layer's u or v store.
    pub fn block(&self, n: usize) -> Range<usize> {
        self.first * n..(self.first + self.rows) * n
    }
}

/// u `[N, R]` = s·x·Aᵀ for the whole stack; x `[N, IC]`.
pub fn adapter_down(par: Par, u: &mut [f32], x: &[f32], st: &Stack, n: usize, s: f32) {
    let (ic, rr) = (st.ic, st.rows);
    let _t = prof::gemm("lora u = s·x·Aᵀ (stacked)", n, rr, ic);
    let u = &mut u[..n * rr];
    sgemm(par, n, rr, ic, Operand::n(x, ic), Operand::t(st.a, ic), u, rr, false);
    u.iter_mut().for_each(|v| *v *= s);
}

/// out (row stride `ldo`, OC columns) += u_m·B_mᵀ: member m's up-projection, with u the
/// stack's `[N, R]` from `adapter_down`.
pub fn adapter_up(par: Par, out: &mut [f32], ldo: usize, u: &[f32], st: &Stack, m: &Member, n: usize) {
    let (r, rr) = (st.r, st.rows);
    let _t = prof::gemm("lora y += u·Bᵀ", n, m.oc, r);
    sgemm(par, n, m.oc, r, Operand::n(&u[m.col..], rr), Operand::t(m.b, r), out, ldo, true);
}

/// Member m's columns of v `[N, R]` = s·dy_m·B_m, dy_m `[N, OC]` with row stride `ldy`.
#[allow(clippy::too_many_arguments)]
pub fn adapter_dy_b(par: Par, v: &mut [f32], dy: &[f32], ldy: usize, st: &Stack, m: &Member, n: usize, s: f32) {
    let (r, rr) = (st.r, st.rows);
    let _t = prof::gemm("lora v = s·dy·B", n, r, m.oc);
    let v = &mut v[m.col..n * rr];
    sgemm(par, n, r, m.oc, Operand::n(dy, ldy), Operand::n(m.b, r), v, rr, false);
    for row in v.chunks_mut(rr) {
        row[..r].iter_mut().for_each(|x| *x *= s);
    }
}

/// dx `[N, IC]` += v·A for the whole stack (every member's input-gradient term).
pub fn adapter_dx(par: Par, dx: &mut [f32], v: &[f32], st: &Stack, n: usize) {
    let (ic, rr) = (st.ic, st.rows);
    let _t = prof::gemm("lora dx += v·A (stacked)", n, ic, rr);
    sgemm(par, n, ic, rr, Operand::n(v, rr), Operand::n(st.a, ic), dx, ic, true);
}

/// dB_m `[OC, r]` += dy_mᵀ·u_m.
#[allow(clippy::too_many_arguments)]
pub fn adapter_db(par: Par, db: &mut [f32], dy: &[f32], ldy: usize, u: &[f32], st: &Stack, m: &Member, n: usize) {
    let (r, rr) = (st.r, st.rows);
    let _t = prof::gemm("lora dB += dyᵀ·u", m.oc, r, n);
    sgemm(par, m.oc, r, n, Operand::t(dy, ldy), Operand::n(&u[m.col..], rr), db, r, true);
}

/// dA `[R, IC]` = vᵀ·x for the whole stack (overwritten: the caller adds each member's rows
/// into its gradient).
pub fn adapter_da(par: Par, da: &mut [f32], v: &[f32], x: &[f32], st: &Stack, n: usize) {
    let (ic, rr) = (st.ic, st.rows);
    let _t = prof::gemm("lora dA = vᵀ·x (stacked)", rr, ic, n);
    sgemm(par, rr, ic, n, Operand::t(v, rr), Operand::n(x, ic), &mut da[..rr * ic], ic, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, f32_tol, randn};
    use crate::rng::Rng;

    /// `[m, n]` = a `[m, k]` · b `[k, n]` in f64 (a and b given by element functions).
    fn mm(m: usize, n: usize, k: usize, a: impl Fn(usize, usize) -> f64, b: impl Fn(usize, usize) -> f64) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        out
    }

    /// Every stacked adapter GEMM against per-member f64 products, for a stack of three
    /// members with different OC whose outputs and gradients live in column blocks of a wider
    /// matrix (as q, k, v do in the fused projection), at two threads (the GEMMs split work).
    #[test]
    fn stacked_gemms_match_per_member_reference() {
        let mut rng = Rng::new(5);
        let (n, ic, r, s) = (37, 19, 3, 1.75f32);
        let ocs = [11, 5, 5];
        let ld: usize = ocs.iter().sum::<usize>() + 2; // a wider row: the members' blocks plus padding
        let cols = [0, 11, 16];
        let rows = 3 * r;
        let a = randn(&mut rng, rows * ic);
        let bs: Vec<Vec<f32>> = ocs.iter().map(|&oc| randn(&mut rng, oc * r)).collect();
        let x = randn(&mut rng, n * ic);
        let dy = randn(&mut rng, n * ld);
        let members = [0, 1, 2].map(|i| Some(Member { slot: i, b: &bs[i], oc: ocs[i], col: i * r }));
        let first = 2; // as if an earlier stack held 2 rows: blocks start at 2·N
        let st = Stack { a: &a, ic, r, rows, first, members };
        for threads in [1, 2] {
            let par = Par { threads, ..Par::seq() };
            // forward: u = s·x·Aᵀ, y_m += u_m·B_mᵀ
            let mut u_store = vec![0.0; (first + rows) * n];
            adapter_down(par, &mut u_store[st.block(n)], &x, &st, n, s);
            let u = &u_store[st.block(n)];
            let u_ref = mm(n, rows, ic, |i, p| s as f64 * x[i * ic + p] as f64, |p, j| a[j * ic + p] as f64);
            assert_close(u, &u_ref, f32_tol(ic), "u");
            let y0 = randn(&mut rng, n * ld);
            let mut y = y0.clone();
            for m in st.iter() {
                adapter_up(par, &mut y[cols[m.slot]..], ld, u, &st, &m, n);
            }
            let mut y_ref: Vec<f64> = y0.iter().map(|&v| v as f64).collect();
            for m in st.iter() {
                let p = mm(n, m.oc, r, |i, q| u[i * rows + m.col + q] as f64, |q, j| m.b[j * r + q] as f64);
                (0..n).for_each(|i| (0..m.oc).for_each(|j| y_ref[i * ld + cols[m.slot] + j] += p[i * m.oc + j]));
            }
            assert_close(&y, &y_ref, f32_tol(r + 1), "y");
            // input gradient: v_m = s·dy_m·B_m, dx += v·A
            let mut v_store = vec![0.0; (first + rows) * n];
            for m in st.iter() {
                adapter_dy_b(par, &mut v_store[st.block(n)], &dy[cols[m.slot]..], ld, &st, &m, n, s);
            }
            let v = &v_store[st.block(n)];
            let mut v_ref = vec![0.0; n * rows];
            for m in st.iter() {
                let p = mm(
                    n,
                    r,
                    m.oc,
                    |i, q| s as f64 * dy[i * ld + cols[m.slot] + q] as f64,
                    |q, j| m.b[q * r + j] as f64,
                );
                (0..n).for_each(|i| (0..r).for_each(|j| v_ref[i * rows + m.col + j] = p[i * r + j]));
            }
            assert_close(v, &v_ref, f32_tol(11), "v");
            let dx0 = randn(&mut rng, n * ic);
            let mut dx = dx0.clone();
            adapter_dx(par, &mut dx, v, &st, n);
            let p = mm(n, ic, rows, |i, q| v[i * rows + q] as f64, |q, j| a[q * ic + j] as f64);
            let dx_ref: Vec<f64> = dx0.iter().zip(&p).map(|(&d, &p)| d as f64 + p).collect();
            assert_close(&dx, &dx_ref, f32_tol(rows + 1), "dx");
            // weight gradients: dB_m += dy_mᵀ·u_m, dA = vᵀ·x
            for m in st.iter() {
                let db0 = randn(&mut rng, m.oc * r);
                let mut db = db0.clone();
                adapter_db(par, &mut db, &dy[cols[m.slot]..], ld, u, &st, &m, n);
                let p =
                    mm(m.oc, r, n, |i, q| dy[q * ld + cols[m.slot] + i] as f64, |q, j| u[q * rows + m.col + j] as f64);
                let db_ref: Vec<f64> = db0.iter().zip(&p).map(|(&d, &p)| d as f64 + p).collect();
                assert_close(&db, &db_ref, f32_tol(n + 1), "dB");
            }
            let mut da = vec![f32::NAN; rows * ic + 3];
            adapter_da(par, &mut da, v, &x, &st, n);
            let da_ref = mm(rows, ic, n, |i, q| v[q * rows + i] as f64, |q, j| x[q * ic + j] as f64);
            assert_close(&da[..rows * ic], &da_ref, f32_tol(n), "dA");
        }
    }
}
