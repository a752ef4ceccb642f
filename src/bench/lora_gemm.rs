//! `anetrain bench lora-gemm`: GFLOP/s of every GEMM a LoRA micro-step issues with the
//! frozen base in bf16 (`--base-dtype bf16 --bf16-matmul`), at the model's exact shapes: the
//! base projections' forward `x·Wᵀ` and input gradient `dy·W` on the f32 `sgemm` and on the
//! bf16 GEMM (with the bf16 GEMM's packing time measured alone beside it), and the rank-r
//! adapter products on `sgemm`, where every path runs them (`crate::lora::apply`).

use super::time_median;
use crate::config::ModelConfig;
use crate::ops::Par;
use crate::ops::gemm_bf16::{Bf16Gemm, Bf16Rhs, KCP, NC, to_bf16};
use crate::ops::matmul::{Operand, sgemm};
use crate::rng::Rng;
use anyhow::Result;
use serde::Serialize;

/// What `bench_lora_gemm` measures beyond the shape.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// "base" or "adapters": measure only those rows.
    pub only: Option<String>,
    /// The bf16 GEMM's blocking (`Bf16Gemm::with_blocking`; its defaults when `None`).
    pub bf16_kcp: Option<usize>,
    pub bf16_nc: Option<usize>,
}

/// An adapter of a stack: (name, OC, how many members share the shape).
type Member<'a> = (&'a str, usize, usize);

/// One measured product.
#[derive(Clone, Debug, Serialize)]
pub struct LoraGemmRow {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Calls per micro-step.
    pub per_step: usize,
    /// GFLOP/s of the f32 `sgemm` as the step called it before the bf16 path.
    pub f32_gflops: f64,
    /// GFLOP/s of the path the bf16 step uses, packing included: the bf16 GEMM for the base
    /// rows; for the adapter rows `sgemm`, the same measurement as `f32_gflops`.
    pub fast_gflops: f64,
    /// Share of the fast path's time spent packing (base rows only; NaN otherwise).
    pub pack_share: f64,
}

impl LoraGemmRow {
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }
}

fn rand(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.normal() as f32).collect()
}

/// Every base and adapter GEMM of one LoRA micro-step at N = `n` rows and rank `r` (adapters
/// on all seven projections, stacked per input as `crate::lora` runs them), measured for
/// ~`budget` seconds each, inside the caller's pool. Each base product runs on `sgemm` and on
/// the bf16 GEMM back to back, so the two columns of a row see the same machine load.
pub fn bench_lora_gemm(
    cfg: &ModelConfig,
    n: usize,
    r: usize,
    budget: f64,
    par: Par,
    opts: &Options,
) -> Result<Vec<LoraGemmRow>> {
    let (c, f, qd, kd, v, l) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size, cfg.n_layers);
    let mut rng = Rng::new(7);
    let mut g = match (opts.bf16_kcp, opts.bf16_nc) {
        (None, None) => Bf16Gemm::new(n)?,
        (kcp, nc) => Bf16Gemm::with_blocking(n, kcp.unwrap_or(KCP), nc.unwrap_or(NC))?,
    };
    let mut rows = Vec::new();
    let (do_base, do_adapters) = match opts.only.as_deref() {
        Some("base") => (true, false),
        Some("adapters") => (false, true),
        _ => (true, true),
    };
    // (name, IC, OC, calls per step, transposed rhs): forward x·Wᵀ (`T`) and dx dy·W (`N`),
    // as `crate::backend::cpu` issues them (q, k, v forward apart; their dx stacked).
    let base = [
        ("q fwd", c, qd, l, true),
        ("k|v fwd", c, kd, 2 * l, true),
        ("o fwd", qd, c, l, true),
        ("gate|up fwd", c, 2 * f, l, true),
        ("down fwd", f, c, l, true),
        ("classifier fwd", c, v, 1, true),
        ("qkv dx", c, qd + 2 * kd, l, false),
        ("o dx", qd, c, l, false),
        ("gate|up dx", c, 2 * f, l, false),
        ("down dx", f, c, l, false),
        ("classifier dx", c, v, 1, false),
    ];
    for (name, ic, oc, per_step, fwd) in base.into_iter().filter(|_| do_base) {
        // Forward: m = N, n = OC, k = IC; dx: m = N, n = IC, k = OC.
        let (nn, kk) = if fwd { (oc, ic) } else { (ic, oc) };
        let wf = rand(&mut rng, oc * ic);
        let wb: Vec<u16> = wf.iter().map(|&x| to_bf16(x)).collect();
        let a = rand(&mut rng, n * kk);
        let mut out = vec![0.0f32; n * nn];
        let classifier = name.starts_with("classifier");
        let rhs = match (fwd, classifier) {
            (true, false) => Bf16Rhs::T(&wb, ic),
            (false, false) => Bf16Rhs::N(&wb, ic),
            (true, true) => Bf16Rhs::TF32(&wf, ic),
            (false, true) => Bf16Rhs::NF32(&wf, ic),
        };
        let wop = if fwd { Operand::t(&wf, ic) } else { Operand::n(&wf, ic) };
        let t32 = time_median(budget, || sgemm(par, n, nn, kk, Operand::n(&a, kk), wop, &mut out, nn, false));
        let t16 = time_median(budget, || g.gemm(par, n, nn, kk, &a, kk, rhs, &mut out, nn, false));
        let tpack = time_median(budget / 2.0, || g.pack_only(par, n, nn, kk, &a, kk, rhs, &mut out, nn));
        let flops = 2.0 * (n * nn * kk) as f64;
        rows.push(LoraGemmRow {
            name: name.into(),
            m: n,
            n: nn,
            k: kk,
            per_step,
            f32_gflops: flops / t32 / 1e9,
            fast_gflops: flops / t16 / 1e9,
            pack_share: tpack / t16,
        });
    }
    // Adapters, stacked as `crate::lora` runs them: the members of a stack read one input,
    // so x·Aᵀ, v·A and vᵀ·x are one product over R = r·members rows; the B-sided products
    // are per member (`dy` of row stride `ldy`: the fused q|k|v and gate|up gradients).
    let stacks: [(&str, usize, usize, &[Member]); 4] = [
        ("qkv", c, qd + 2 * kd, &[("q", qd, 1), ("k,v", kd, 2)]),
        ("o", qd, c, &[("o", c, 1)]),
        ("gate,up", c, 2 * f, &[("gate,up", f, 2)]),
        ("down", f, c, &[("down", c, 1)]),
    ];
    let s = 2.0f32; // alpha/r
    for (sname, ic, ldy, members) in stacks.into_iter().filter(|_| do_adapters) {
        let rr = r * members.iter().map(|m| m.2).sum::<usize>();
        let x = rand(&mut rng, n * ic);
        let dy = rand(&mut rng, n * ldy);
        let a = rand(&mut rng, rr * ic);
        let u = rand(&mut rng, n * rr);
        let (mut uo, mut dx, mut da) = (vec![0.0f32; n * rr], rand(&mut rng, n * ic), vec![0.0f32; rr * ic]);
        let mut row = |name: String, m: usize, nn: usize, kk: usize, calls: usize, t32: f64, fast: f64| {
            let flops = 2.0 * (m * nn * kk) as f64;
            rows.push(LoraGemmRow {
                name,
                m,
                n: nn,
                k: kk,
                per_step: calls * l,
                f32_gflops: flops / t32 / 1e9,
                fast_gflops: flops / fast / 1e9,
                pack_share: f64::NAN,
            });
        };
        // u [N, R] = s·x·Aᵀ (sgemm, then the scaling pass)
        let t = time_median(budget, || {
            sgemm(par, n, rr, ic, Operand::n(&x, ic), Operand::t(&a, ic), &mut uo, rr, false);
            uo.iter_mut().for_each(|v| *v *= s);
        });
        row(format!("{sname} u=s·x·Aᵀ"), n, rr, ic, 1, t, t);
        // dx [N, IC] += v·A
        let t =
            time_median(budget, || sgemm(par, n, ic, rr, Operand::n(&u, rr), Operand::n(&a, ic), &mut dx, ic, true));
        row(format!("{sname} dx+=v·A"), n, ic, rr, 1, t, t);
        // dA [R, IC] = vᵀ·x
        let t =
            time_median(budget, || sgemm(par, rr, ic, n, Operand::t(&u, rr), Operand::n(&x, ic), &mut da, ic, false));
        row(format!("{sname} dA=vᵀ·x"), rr, ic, n, 1, t, t);
        for &(mname, oc, count) in members {
            let b = rand(&mut rng, oc * r);
            let mut y = rand(&mut rng, n * oc);
            let mut db = vec![0.0f32; oc * r];
            // y [N, OC] += u_m·B_mᵀ (u_m: r columns of the stack's u)
            let t =
                time_median(budget, || sgemm(par, n, oc, r, Operand::n(&u, rr), Operand::t(&b, r), &mut y, oc, true));
            row(format!("{mname} y+=u·Bᵀ"), n, oc, r, count, t, t);
            // v_m [N, r] (of the stack's v) = s·dy_m·B_m
            let t = time_median(budget, || {
                sgemm(par, n, r, oc, Operand::n(&dy, ldy), Operand::n(&b, r), &mut uo, rr, false);
                uo.chunks_mut(rr).for_each(|v| v[..r].iter_mut().for_each(|x| *x *= s));
            });
            row(format!("{mname} v=s·dy·B"), n, r, oc, count, t, t);
            // dB_m [OC, r] += dy_mᵀ·u_m
            let t = time_median(budget, || {
                sgemm(par, oc, r, n, Operand::t(&dy, ldy), Operand::n(&u, rr), &mut db, r, true)
            });
            row(format!("{mname} dB+=dyᵀ·u"), oc, r, n, count, t, t);
        }
    }
    Ok(rows)
}

/// What `anetrain bench lora-gemm` prints.
#[derive(Clone, Debug, Serialize)]
pub struct LoraGemmReport {
    pub model: String,
    pub n: usize,
    pub rank: usize,
    pub threads: usize,
    /// Best square f32 `sgemm` (`super::gemm_peak_gflops`).
    pub f32_peak_gflops: f64,
    /// The bf16 microkernel alone on cache-resident panels (`gemm_bf16::kernel_peak_gflops`).
    pub bf16_peak_gflops: f64,
    pub rows: Vec<LoraGemmRow>,
    /// ms per micro-step of the base GEMMs on f32 `sgemm` and on the bf16 GEMM.
    pub base_f32_ms: f64,
    pub base_bf16_ms: f64,
    /// ms per micro-step of the adapter GEMMs (on `sgemm`, as every path runs them).
    pub adapter_f32_ms: f64,
}

impl LoraGemmReport {
    pub fn new(
        model: &str,
        n: usize,
        rank: usize,
        threads: usize,
        f32_peak_gflops: f64,
        bf16_peak_gflops: f64,
        rows: Vec<LoraGemmRow>,
    ) -> Self {
        let ms = |base: bool, fast: bool| -> f64 {
            rows.iter()
                .filter(|r| r.pack_share.is_nan() != base)
                .map(|r| r.flops() * r.per_step as f64 / (if fast { r.fast_gflops } else { r.f32_gflops } * 1e9) * 1e3)
                .sum()
        };
        LoraGemmReport {
            model: model.into(),
            n,
            rank,
            threads,
            f32_peak_gflops,
            bf16_peak_gflops,
            base_f32_ms: ms(true, false),
            base_bf16_ms: ms(true, true),
            adapter_f32_ms: ms(false, false),
            rows,
        }
    }

    pub fn print(&self) {
        println!(
            "LoRA GEMMs at {} shapes, N = {}, r = {}, {} threads (GFLOP/s, median; packing included)",
            self.model, self.n, self.rank, self.threads
        );
        println!(
            "peaks: f32 sgemm best square {:.1}, bf16 microkernel on cached panels {:.1}",
            self.f32_peak_gflops, self.bf16_peak_gflops
        );
        println!(
            "{:<22} {:>6} {:>6} {:>6} {:>5} {:>9} {:>9} {:>7} {:>6} {:>9} {:>9}",
            "product", "m", "n", "k", "/step", "f32", "fast", "%bf16pk", "pack%", "f32 ms", "fast ms"
        );
        for r in &self.rows {
            let per = |g: f64| r.flops() * r.per_step as f64 / (g * 1e9) * 1e3;
            let pack = if r.pack_share.is_nan() { "-".to_string() } else { format!("{:.0}", 100.0 * r.pack_share) };
            println!(
                "{:<22} {:>6} {:>6} {:>6} {:>5} {:>9.1} {:>9.1} {:>7.0} {:>6} {:>9.1} {:>9.1}",
                r.name,
                r.m,
                r.n,
                r.k,
                r.per_step,
                r.f32_gflops,
                r.fast_gflops,
                100.0 * r.fast_gflops / self.bf16_peak_gflops,
                pack,
                per(r.f32_gflops),
                per(r.fast_gflops)
            );
        }
        // Totals only for the groups that were measured (`--only` leaves the other empty).
        if self.rows.iter().any(|r| !r.pack_share.is_nan()) {
            println!("base GEMMs per micro-step: f32 {:.1} ms, bf16 {:.1} ms", self.base_f32_ms, self.base_bf16_ms);
        }
        if self.rows.iter().any(|r| r.pack_share.is_nan()) {
            println!("adapter GEMMs per micro-step (sgemm): {:.1} ms", self.adapter_f32_ms);
        }
    }
}
