//! e^x in f32 without a libm call, so loops over slices vectorise (softmax, cross-entropy,
//! SiLU): libm's `expf` is a scalar call per element, which kept those loops at one value per
//! few nanoseconds. Plain multiplies and adds only (no FMA contraction in Rust), so every
//! vector width computes the same bits; `wide_fn!` compiles a loop for AVX-512 too and runs
//! that copy when the CPU has it (16 lanes), the plain build otherwise (SSE2: 4 lanes).
//!
//! Method (Cody–Waite with Cephes' minimax polynomial): n = round(x·log2 e), r = x − n·ln 2
//! in two parts so r is exact, e^r ≈ 1 + r + r²·P(r) on |r| ≤ ln2/2, then scaled by 2ⁿ in two
//! steps so that results down to the subnormal range are formed without overflow of the
//! exponent. Measured error ≤ 2 ulp against f64 `exp` over the whole range (tested).

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that n·LN2_HI is exact for |n| < 2⁹.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Above this e^x overflows f32; below LO it is under half the smallest subnormal.
const HI: f32 = 88.722_84;
const LO: f32 = -103.972_08;
/// 1.5·2²³: adding and subtracting it rounds an |v| < 2²² to the nearest integer (ties to
/// even) in the default rounding mode, with SSE2 instructions only.
const ROUND: f32 = 12_582_912.0;

/// e^x: +inf above ~88.72, 0 below ~−103.97, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * z + r + 1.0;
    // 2ⁿ = 2^(n/2) · 2^(n − n/2), each a normal power of two for n ∈ [−150, 128].
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) << 23) as u32);
    let s2 = f32::from_bits(((n2 + 127) << 23) as u32);
    let y = e * s1 * s2;
    // clamp keeps NaN (and the selects below leave it): NaN in, NaN out.
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        y
    }
}

/// Whether this CPU has AVX-512F (checked once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// Defines a function whose body is compiled twice, as built and for AVX-512, and runs the
/// AVX-512 copy when the CPU has it: the loops over `exp` inside then vectorise 16 wide (a
/// closure passed to a `#[target_feature]` function is not reliably inlined into it, so the
/// body is an `#[inline(always)]` function). The results are the same bits either way.
macro_rules! wide_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::ops::exp::has_avx512() {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if w == got {
            return 0.0;
        }
        // One ulp of the correctly rounded result (subnormal spacing below the normal range).
        let ulp = if w.abs() < f32::MIN_POSITIVE { f32::from_bits(1) as f64 } else { (w.abs() * f32::EPSILON) as f64 };
        (got as f64 - want).abs() / ulp
    }

    /// Against f64 `exp` on a dense sweep of the finite range plus every edge: ≤ 2 ulp for
    /// normal results, within a few subnormal steps below, exact 0 / inf / NaN outside.
    #[test]
    fn matches_f64_exp_everywhere() {
        let mut worst = 0.0f64;
        let mut x = -103.9f32;
        while x < 88.72 {
            let got = exp(x);
            let want = (x as f64).exp();
            let e = ulps(got, want);
            if want >= f32::MIN_POSITIVE as f64 {
                worst = worst.max(e);
                assert!(e <= 2.0, "exp({x}) = {got}, f64 {want}: {e} ulp");
            } else {
                assert!((got as f64 - want).abs() <= 4.0 * f32::from_bits(1) as f64, "exp({x}) = {got}, f64 {want}");
            }
            x += 0.000_731;
        }
        assert!(worst > 0.0, "the sweep compared nothing");
        for (x, want) in [(0.0, 1.0), (-0.0, 1.0), (1.0, std::f32::consts::E), (-200.0, 0.0), (200.0, f32::INFINITY)] {
            assert!(ulps(exp(x), want as f64) <= 1.0, "exp({x}) = {}", exp(x));
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.72).is_finite() && exp(88.73).is_infinite());
    }

    wide_fn! {
        fn exp_all(out: &mut [f32], xs: &[f32]) {
            out.iter_mut().zip(xs).for_each(|(o, &x)| *o = exp(x));
        }
    }

    /// The AVX-512 copy gives the same bits as the scalar build (no contraction, same
    /// operations).
    #[test]
    fn wide_matches_scalar_bits() {
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 - 2000.0) * 0.047).collect();
        let plain: Vec<u32> = xs.iter().map(|&x| exp(x).to_bits()).collect();
        let mut out = vec![0.0f32; xs.len()];
        exp_all(&mut out, &xs);
        let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, plain);
    }
}
