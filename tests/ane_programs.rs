//! Issue 13 items 1–3 without the hardware: the int8 ops' exact semantics in the simulator,
//! the benchmark programs against their CPU references, the older-chip `ios16` dialect
//! (every kernel simulated bit-identical to its `ios18` twin), the type checker over every
//! program the crate emits, and the `ane bench` / `mil emit --mil-dialect` commands.

use anetrain::mil::KernelProgram;
use anetrain::mil::KernelRunner;
use anetrain::mil::benchprog::{
    ACT_SCALE, Int8Ref, Precision, Spec, program, quantize_rows, reference, suite, weights,
};
use anetrain::mil::dialect::{Dialect, DialectRunner, convert};
use anetrain::mil::emit::{InputLayout, KernelSet};
use anetrain::mil::parse::parse;
use anetrain::mil::sim::SimRunner;
use anetrain::ops::Par;
use anetrain::rng::Rng;
use half::f16;
use std::process::{Command, Output};

#[path = "common/tiny_models.rs"]
mod tiny_models;
use tiny_models::tiny;

fn kernel_programs() -> Vec<KernelProgram> {
    let mut all = Vec::new();
    for name in ["mha", "gqa-qknorm"] {
        for layout in [InputLayout::Packed, InputLayout::Separate] {
            let set = KernelSet::new(&tiny(name), 20, layout).unwrap();
            all.extend(set.all().into_iter().chain([&set.classifier]).map(|k| k.program.clone()));
        }
    }
    all
}

/// Every benchmark program shape, at its small size (the full sizes differ only in numbers).
fn bench_programs() -> Vec<(Spec, KernelProgram)> {
    let mut all = Vec::new();
    for kind in ["dispatch", "peak", "sram", "int8"] {
        for spec in suite(kind).unwrap() {
            let small = spec.small();
            all.push((small, program(&small, &weights(&small, 3).unwrap()).unwrap()));
        }
    }
    all
}

fn run(runner: &mut dyn KernelRunner, p: &KernelProgram, inputs: &[Vec<f16>]) -> Vec<f16> {
    let id = runner.load(p, 1).unwrap_or_else(|e| panic!("{}: {e:#}", p.name));
    for (i, x) in inputs.iter().enumerate() {
        runner.write_input(id, 0, i, &mut |buf| buf.copy_from_slice(x)).unwrap();
    }
    runner.eval(id, 0).unwrap();
    let mut out = Vec::new();
    runner.read_output(id, 0, &mut |o| out = o.to_vec()).unwrap();
    out
}

fn random_inputs(p: &KernelProgram, seed: u64) -> Vec<Vec<f16>> {
    let mut rng = Rng::new(seed);
    p.inputs.iter().map(|s| (0..s.elems()).map(|_| f16::from_f64(0.5 * rng.normal())).collect()).collect()
}

#[test]
fn every_emitted_program_type_checks_and_round_trips_in_both_dialects() {
    let mut programs = kernel_programs();
    programs.extend(bench_programs().into_iter().map(|(_, p)| p));
    {
        use anetrain::mil::w8a8::{QMatrix, ffn_fwd_w8a8, linear_w8a8};
        let mut rng = Rng::new(1);
        let mut m = |oc, ic| QMatrix::new(&randn(&mut rng, oc * ic, 0.1), oc, ic).unwrap();
        let (w1, w3, w2, wo) = (m(48, 32), m(48, 32), m(32, 48), m(32, 32));
        programs.push(linear_w8a8("wo_fwd_w8a8", &wo, 32, 0.03).unwrap());
        programs.push(ffn_fwd_w8a8(&w1, &w3, &w2, 32, 0.03, 0.01).unwrap());
    }
    assert_eq!(programs.len(), 44 + 39 + 2);
    let mut w8a8 = 0;
    for p in &programs {
        let ast = parse(&p.mil).unwrap_or_else(|e| panic!("{}: {e:#}", p.name));
        assert_eq!(ast.text(), p.mil, "{}: printing changes the text", p.name);
        assert_eq!(Dialect::of(&ast), Some(Dialect::Ios18), "{}", p.name);
        if p.mil.contains("quantize(") {
            // W8A8 activations need iOS 17 ops: the older dialect refuses them by name
            w8a8 += 1;
            let e = format!("{:#}", convert(p, Dialect::Ios16).unwrap_err());
            assert!(e.contains("quantize") && e.contains("--mil-dialect ios18"), "{e}");
            continue;
        }
        let old = convert(p, Dialect::Ios16).unwrap();
        let ast16 = parse(&old.mil).unwrap_or_else(|e| panic!("{} (ios16): {e:#}", p.name));
        assert_eq!(ast16.text(), old.mil);
        assert_eq!(ast16.func.body, ast.func.body, "{}: only the spelling may differ", p.name);
        assert!(old.mil.starts_with("program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>("));
        assert!(old.mil.contains("func main<ios16>("), "{}", p.name);
        assert!(old.mil.contains("name = tensor<string, []>(\""), "{}", p.name);
        for compact in ["string(\"", "int32(", "int8(", "bool(", "fp16(", "uint64("] {
            assert!(!old.mil.contains(compact), "{}: a compact scalar `{compact}` is left in the ios16 text", p.name);
        }
        assert_eq!(convert(&old, Dialect::Ios18).unwrap().mil, p.mil, "{}: converting back", p.name);
    }
    assert_eq!(w8a8, 5 + 2, "one W8A8 program per int8 configuration, and the two W8A8 kernels");
}

#[test]
fn every_kernel_in_the_ios16_dialect_simulates_equal_to_ios18() {
    let mut programs = kernel_programs();
    programs.extend(bench_programs().into_iter().map(|(_, p)| p).filter(|p| !p.mil.contains("quantize(")));
    let mut new = SimRunner::new(Par::seq());
    let mut old = DialectRunner::new(Box::new(SimRunner::new(Par::seq())), Dialect::Ios16);
    for (i, p) in programs.iter().enumerate() {
        let x = random_inputs(p, i as u64);
        let a = run(&mut new, p, &x);
        let b = run(&mut old, p, &x);
        assert!(a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()), "{}: outputs differ", p.name);
        assert!(a.iter().any(|v| v.to_f32() != 0.0), "{}: all zero", p.name);
    }
}

#[test]
fn mixed_or_wrong_dialect_syntax_is_refused_with_the_right_spelling() {
    let p = &kernel_programs()[1];
    let old = convert(p, Dialect::Ios16).unwrap().mil;
    // a compact scalar inside program(1.0)
    let e = format!("{:#}", parse(&old.replacen("tensor<string, []>(\"", "string(\"", 1)).unwrap_err());
    assert!(e.contains("program(1.0) writes scalars as `tensor<string, []>`"), "{e}");
    // a verbose scalar inside program(1.3)
    let e = format!("{:#}", parse(&p.mil.replacen("string(\"", "tensor<string, []>(\"", 1)).unwrap_err());
    assert!(e.contains("program(1.0) syntax"), "{e}");
    // an op newer than the opset
    let q = bench_programs().into_iter().find(|(_, p)| p.mil.contains("quantize(")).unwrap().1;
    let e = format!("{:#}", parse(&q.mil.replace("main<ios18>", "main<ios16>")).unwrap_err());
    assert!(e.contains("needs opset ios17"), "{e}");
    let e = format!("{:#}", parse(&p.mil.replace("main<ios18>", "main<metal3>")).unwrap_err());
    assert!(e.contains("unknown opset"), "{e}");
}

/// A hand-written program: `quantize` then `dequantize` of one input, scale 0.5.
fn quant_program(text_edit: impl Fn(String) -> String) -> String {
    text_edit(
        "program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n    func main<ios18>(tensor<fp16, [1, 1, 1, 16]> i0_x) {\n        \
         fp16 s = const()[name = string(\"s\"), val = fp16(0.5)];\n        \
         string d = const()[name = string(\"d\"), val = string(\"int8\")];\n        \
         int8 z = const()[name = string(\"z\"), val = int8(0)];\n        \
         tensor<int8, [1, 1, 1, 16]> q = quantize(input = i0_x, output_dtype = d, scale = s, zero_point = z)[name = string(\"q\")];\n        \
         tensor<fp16, [1, 1, 1, 16]> y = dequantize(input = q, scale = s)[name = string(\"y\")];\n    } -> (y);\n}\n"
            .to_string(),
    )
}

#[test]
fn quantize_rounds_half_to_even_and_saturates() {
    let text = quant_program(|t| t);
    let p = parse(&text).unwrap();
    assert_eq!(p.text(), text);
    let k = KernelProgram {
        name: "q".into(),
        mil: text,
        blobs: vec![],
        inputs: vec![anetrain::mil::TensorSig { name: "i0_x".into(), shape: [1, 1, 1, 16] }],
        outputs: vec![anetrain::mil::TensorSig { name: "y".into(), shape: [1, 1, 1, 16] }],
    };
    // x / 0.5 = 2x: ties go to the even integer, beyond ±127/−128 saturate, NaN has no int8 (0)
    let x =
        [0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 0.3, -0.3, 63.5, 64.0, -64.0, -64.5, 1000.0, -1000.0, f32::NAN, 0.0];
    let want_q = [0, 2, 2, 0, -2, -2, 1, -1, 127, 127, -128, -128, 127, -128, 0, 0];
    let xs: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let y = run(&mut SimRunner::new(Par::seq()), &k, &[xs]);
    for i in 0..16 {
        assert_eq!(y[i].to_f32(), 0.5 * want_q[i] as f32, "x = {}", x[i]);
        assert_eq!(anetrain::mil::sim::quantize(x[i], 0.5), want_q[i] as f32);
    }
    // type rules: uint8, a zero point other than 0, a non-constant or non-positive scale
    let bad = |from: &str, to: &str, needle: &str| {
        let e = format!("{:#}", parse(&quant_program(|t| t.replace(from, to))).unwrap_err());
        assert!(e.contains(needle), "{from} -> {to}: {e}");
    };
    bad("string(\"int8\")", "string(\"uint8\")", "\"uint8\" is not supported");
    bad("int8(0)", "int8(3)", "zero point 0");
    bad("int8(0)", "int8(300)", "does not fit in int8");
    bad("fp16(0.5)", "fp16(-0.5)", "positive finite scale");
    bad("dequantize(input = q", "dequantize(input = i0_x", "must be an int8 tensor");
}

#[test]
fn w8a8_conv_is_within_its_bound_of_the_int8_cpu_reference() {
    // One layer: both sides quantize the same fp16 input identically (x / 2⁻⁴ is exact), so
    // the only differences are the fp16 rounding of each dequantized weight (≤ u relative),
    // f32 accumulation (≪ u) and the fp16 rounding of the output (≤ u): per output,
    // |sim − ref| ≤ u·|ref| + 1.01·u·Σᵢ|s_a·q_a,i · s_w·q_w,i|, u = 2⁻¹¹.
    let spec = Spec { ch: 64, sp: 32, depth: 1, precision: Precision::W8a8 };
    let w = weights(&spec, 5).unwrap();
    let p = program(&spec, &w).unwrap();
    let mut rng = Rng::new(9);
    let x: Vec<f16> = (0..64 * 32).map(|_| f16::from_f64(rng.normal())).collect();
    let got = run(&mut SimRunner::new(Par::seq()), &p, std::slice::from_ref(&x));
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let want = reference(&spec, &w, &xf, Int8Ref::Integer);
    let anetrain::mil::benchprog::Weights::Int8(layers) = &w else { unreachable!() };
    let (q, s) = &layers[0];
    let u = 2f64.powi(-11);
    let mut worst = 0f64;
    for o in 0..64 {
        for t in 0..32 {
            let abs_sum: f64 = (0..64)
                .map(|i| {
                    let qa = anetrain::mil::sim::quantize(xf[i * 32 + t], ACT_SCALE) as f64;
                    (ACT_SCALE as f64 * qa * s[o] as f64 * q[o * 64 + i] as f64).abs()
                })
                .sum();
            let (g, r) = (got[o * 32 + t].to_f32() as f64, want[o * 32 + t] as f64);
            let bound = u * r.abs() + 1.01 * u * abs_sum;
            assert!((g - r).abs() <= bound, "out ({o}, {t}): sim {g}, int8 reference {r}, bound {bound}");
            worst = worst.max((g - r).abs() / bound.max(1e-30));
        }
    }
    assert!(worst > 0.0, "the bound is exercised");
    // per-channel quantization itself: max |w − s·q| ≤ s/2 per row
    let (q2, s2) = quantize_rows(&[0.5, -1.0, 0.25, 127.0, -254.0, 1.0], 3);
    assert_eq!(q2, vec![64, -127, 32, 64, -127, 0], "ties go to even: 63.5 → 64, 0.5 → 0");
    assert_eq!(s2[0], half::f16::from_f32(1.0 / 127.0).to_f32());
}

#[test]
fn every_benchmark_program_matches_its_cpu_reference_in_the_simulator() {
    for kind in ["dispatch", "peak", "sram", "int8"] {
        for (i, spec) in suite(kind).unwrap().iter().enumerate() {
            let c = anetrain::ane::bench::simulate(spec, i as u64).unwrap();
            assert!(c.ok(), "{kind} {}: max {:.2e} mean {:.2e}", spec.name(), c.max_rel, c.mean_rel);
        }
    }
    // The W8A8 chain against the pure integer path drifts as documented (Int8Ref), but stays
    // within a few activation steps: measured max 5.4e-2, mean 1.0e-2 of the reference.
    let spec = Spec { ch: 64, sp: 32, depth: 4, precision: Precision::W8a8 };
    let w = weights(&spec, 2).unwrap();
    let p = program(&spec, &w).unwrap();
    let x = random_inputs(&p, 3);
    let got: Vec<f32> = run(&mut SimRunner::new(Par::seq()), &p, &x).iter().map(|v| v.to_f32()).collect();
    let xf: Vec<f32> = x[0].iter().map(|v| v.to_f32()).collect();
    let (max, mean) = anetrain::mil::check::rel_errors(&got, &reference(&spec, &w, &xf, Int8Ref::Integer));
    assert!(max < 1e-1 && mean < 2e-2, "max {max:.2e} mean {mean:.2e}");
    let (max, mean) = anetrain::mil::check::rel_errors(&got, &reference(&spec, &w, &xf, Int8Ref::Program));
    assert!(max < 2e-3 && mean < 1e-3, "max {max:.2e} mean {mean:.2e}");
    // a broken program is caught: transposed weights in the reference
    let spec = Spec { ch: 32, sp: 32, depth: 2, precision: Precision::Fp16 };
    let w = weights(&spec, 1).unwrap();
    let p = program(&spec, &w).unwrap();
    let anetrain::mil::benchprog::Weights::Fp16(layers) = &w else { unreachable!() };
    let transposed = anetrain::mil::benchprog::Weights::Fp16(
        layers.iter().map(|l| (0..32 * 32).map(|i| l[(i % 32) * 32 + i / 32]).collect()).collect(),
    );
    let x = random_inputs(&p, 4);
    let got: Vec<f32> = run(&mut SimRunner::new(Par::seq()), &p, &x).iter().map(|v| v.to_f32()).collect();
    let xf: Vec<f32> = x[0].iter().map(|v| v.to_f32()).collect();
    let (max, _) = anetrain::mil::check::rel_errors(&got, &reference(&spec, &transposed, &xf, Int8Ref::Program));
    assert!(max > 0.1, "{max}");
}

fn anetrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anetrain")).args(args).output().expect("run anetrain")
}

#[test]
fn ane_bench_emit_writes_checks_and_refuses_oversized_programs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = anetrain(&["ane", "bench", "int8", "--emit", d, "--ch", "48", "--sp", "32", "--depth", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("  ok").count(), 2, "{text}");
    for name in ["conv3x48_sp32_fp16", "conv3x48_sp32_w8a8"] {
        let mil = dir.path().join("int8").join(name).join("model.mil");
        let check = anetrain(&["mil", "check", mil.to_str().unwrap()]);
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    }
    assert!(dir.path().join("int8/conv3x48_sp32_w8a8/weights/w2_scale.bin").exists());
    let out = anetrain(&["ane", "bench", "sram", "--emit", d, "--ch", "70000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("65536") && err.lines().count() == 1, "{err}");
    let out = anetrain(&["ane", "bench", "peak", "--emit", d, "--depth", "4"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --ch too"));
    if !cfg!(target_os = "macos") {
        let out = anetrain(&["ane", "bench", "dispatch"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--emit DIR"), "{err}");
    }
}

#[test]
fn mil_emit_writes_the_ios16_dialect_that_mil_check_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(&[
        "mil",
        "emit",
        "--model",
        "stories260k",
        "--seq",
        "32",
        "--mil-dialect",
        "ios16",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    assert!(manifest.contains("\"dialect\": \"ios16\""), "{manifest}");
    let mil = dir.path().join("attn_fwd/model.mil");
    assert!(std::fs::read_to_string(&mil).unwrap().starts_with("program(1.0)\n"));
    let check = anetrain(&["mil", "check", mil.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| half::f16::from_f64(std * rng.normal()).to_f32()).collect()
}

#[test]
fn w8a8_linear_kernel_is_within_its_bound_of_the_int8_reference() {
    use anetrain::mil::w8a8::{QMatrix, act_scale, linear_ref, linear_w8a8};
    let (oc, ic, s) = (48, 64, 32);
    let mut rng = Rng::new(21);
    let w = QMatrix::new(&randn(&mut rng, oc * ic, 0.125), oc, ic).unwrap();
    let x = randn(&mut rng, ic * s, 1.0);
    let scale = act_scale(x.iter().fold(0f32, |m, v| m.max(v.abs())));
    let p = linear_w8a8("wo_fwd_w8a8", &w, s, scale).unwrap();
    assert!(p.mil.contains("constexpr_affine_dequantize()[axis = int32(0)"), "{}", p.mil);
    let xs: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let got = run(&mut SimRunner::new(Par::seq()), &p, &[xs]);
    let want = linear_ref(&w, &x, s, scale);
    // Both sides quantize x identically (the same fp16 division and rounding); the program
    // then rounds the dequantized activation and weight to fp16 (each ≤ u relative), sums
    // in f32 and rounds the output: |sim − ref| ≤ u·|ref| + 2.02·u·Σᵢ|a_i·w_i|.
    let u = 2f64.powi(-11);
    let mut hit = 0;
    for o in 0..oc {
        for t in 0..s {
            let abs_sum: f64 = (0..ic)
                .map(|i| {
                    let a = scale as f64 * anetrain::mil::sim::quantize(x[i * s + t], scale) as f64;
                    (a * w.scales[o] as f64 * w.q[o * ic + i] as f64).abs()
                })
                .sum();
            let (g, r) = (got[o * s + t].to_f32() as f64, want[o * s + t]);
            let bound = u * r.abs() + 2.02 * u * abs_sum;
            assert!((g - r).abs() <= bound, "({o}, {t}): sim {g}, int8 reference {r}, bound {bound}");
            hit += usize::from(g != r);
        }
    }
    assert!(hit > 0, "the fp16 roundings are visible");
    // bad input: a non-finite weight is refused before anything is built
    let e = QMatrix::new(&[1.0, f32::NAN], 1, 2).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
    assert!(linear_w8a8("x", &w, 40, scale).unwrap_err().to_string().contains("multiple of 16"));
}

#[test]
fn w8a8_ffn_kernel_tracks_the_int8_reference_and_the_f32_layer() {
    use anetrain::mil::w8a8::{QMatrix, act_scale, ffn_fwd_w8a8, ffn_ref};
    let (c, f, s) = (64, 96, 32);
    let mut rng = Rng::new(22);
    let (w1f, w3f, w2f) = (randn(&mut rng, f * c, 0.125), randn(&mut rng, f * c, 0.125), randn(&mut rng, c * f, 0.1));
    let x = randn(&mut rng, c * s, 1.0);
    let (w1, w3, w2) =
        (QMatrix::new(&w1f, f, c).unwrap(), QMatrix::new(&w3f, f, c).unwrap(), QMatrix::new(&w2f, c, f).unwrap());
    // calibration: the f32 layer's own ranges
    let mm = |w: &[f32], rows: usize, cols: usize, a: &[f32]| -> Vec<f64> {
        (0..rows * s).map(|k| (0..cols).map(|i| w[(k / s) * cols + i] as f64 * a[i * s + k % s] as f64).sum()).collect()
    };
    let (h1, h3) = (mm(&w1f, f, c, &x), mm(&w3f, f, c, &x));
    let gate: Vec<f32> = h1.iter().zip(&h3).map(|(&a, &b)| (a / (1.0 + (-a).exp()) * b) as f32).collect();
    let exact: Vec<f32> = mm(&w2f, c, f, &gate).iter().map(|&v| v as f32).collect();
    let max = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (xs_, gs) = (act_scale(max(&x)), act_scale(max(&gate)));
    let p = ffn_fwd_w8a8(&w1, &w3, &w2, s, xs_, gs).unwrap();
    let xs: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let got: Vec<f32> = run(&mut SimRunner::new(Par::seq()), &p, &[xs]).iter().map(|v| v.to_f32()).collect();
    let want: Vec<f32> = ffn_ref(&w1, &w3, &w2, &x, s, xs_, gs).iter().map(|&v| v as f32).collect();
    // against the integer path: fp16 roundings inside, and gate values one quantization step
    // apart where the two round differently (measured max 7.5e-3, mean 3.1e-3)
    let (mx, mn) = anetrain::mil::check::rel_errors(&got, &want);
    assert!(mx <= 2e-2 && mn <= 8e-3, "vs int8 reference: max {mx:.2e} mean {mn:.2e}");
    // against the f32 layer: the cost of W8A8 itself (measured max 2.3e-2, mean 3.3e-2)
    let (mx, mn) = anetrain::mil::check::rel_errors(&got, &exact);
    assert!(mx <= 6e-2 && mn <= 6e-2, "vs f32: max {mx:.2e} mean {mn:.2e}");
    let e = ffn_fwd_w8a8(&w1, &w3, &w1, s, xs_, gs).unwrap_err().to_string();
    assert!(e.contains("disagree"), "{e}");
}
