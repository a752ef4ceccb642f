//! The MIL path without the hardware: every kernel simulated in fp16 against the `cpu`
//! backend, parser round trips and rejections, golden program text, and training through
//! the simulator.

use anetrain::config::ModelConfig;
use anetrain::mil::backend::MilBackend;
use anetrain::mil::check::{MAX_TOL, MEAN_TOL, compare_with_cpu};
use anetrain::mil::emit::{InputLayout, KernelSet};
use anetrain::mil::parse::parse;
use anetrain::mil::sim::SimRunner;
use anetrain::ops::Par;

#[path = "common/tiny_models.rs"]
mod tiny_models;
use tiny_models::tiny;

fn kernels_match_cpu(name: &str, layout: InputLayout) {
    let cfg = tiny(name);
    let (b, t) = (2, 20); // T = 20 pads to S = 32: padding is exercised
    let mut sim = MilBackend::new(&cfg, b, t, layout, Box::new(SimRunner::new(Par::seq()))).unwrap();
    let rows = compare_with_cpu(&cfg, b, t, &mut sim, 7).unwrap();
    assert!(rows.len() >= 15, "every kernel compared");
    for r in &rows {
        println!("{name} {layout:?} {:>14} {:<18} max {:.2e} mean {:.2e}", r.kernel, r.what, r.max_rel, r.mean_rel);
    }
    for r in &rows {
        assert!(
            r.ok(),
            "{}: {}: max-abs error {:.2e} (limit {MAX_TOL:.0e}), mean-abs {:.2e} (limit {MEAN_TOL:.0e}) of the reference magnitude",
            r.kernel,
            r.what,
            r.max_rel,
            r.mean_rel
        );
    }
}

#[test]
fn kernels_match_cpu_mha_packed() {
    kernels_match_cpu("mha", InputLayout::Packed);
}

#[test]
fn kernels_match_cpu_mha_separate() {
    kernels_match_cpu("mha", InputLayout::Separate);
}

#[test]
fn kernels_match_cpu_gqa_qknorm_packed() {
    kernels_match_cpu("gqa-qknorm", InputLayout::Packed);
}

#[test]
fn kernels_match_cpu_gqa_qknorm_separate() {
    kernels_match_cpu("gqa-qknorm", InputLayout::Separate);
}

/// Linear RoPE scaling reaches the programs: the cpu backend rotates by the scaled table, so
/// kernels built from the unscaled one miss by far more than the fp16 tolerance.
#[test]
fn kernels_match_cpu_with_linear_rope_scaling() {
    kernels_match_cpu("mha-linear-rope", InputLayout::Packed);
}

fn every_program() -> Vec<(String, anetrain::mil::KernelProgram)> {
    let mut all = Vec::new();
    for name in ["mha", "gqa-qknorm"] {
        for layout in [InputLayout::Packed, InputLayout::Separate] {
            let set = KernelSet::new(&tiny(name), 20, layout).unwrap();
            for k in set.all().into_iter().chain([&set.classifier]) {
                all.push((format!("{name}/{layout:?}/{}", k.program.name), k.program.clone()));
            }
        }
    }
    all
}

#[test]
fn parser_round_trips_every_emitted_program() {
    let all = every_program();
    assert_eq!(all.len(), 44);
    for (what, p) in all {
        let ast = parse(&p.mil).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(ast.text(), p.mil, "{what}: printing the parsed program changes the text");
        assert_eq!(parse(&ast.text()).unwrap(), ast, "{what}");
        assert!(p.mil.lines().count() > 10, "{what}");
    }
}

/// Applies `edit` to line `line` (1-based) of the program and expects an error at that line
/// (and column, when given) whose message contains `needle`.
fn rejects(mil: &str, line: usize, edit: impl Fn(&str) -> String, col: Option<usize>, needle: &str) {
    let mut lines: Vec<String> = mil.lines().map(str::to_string).collect();
    let before = lines[line - 1].clone();
    lines[line - 1] = edit(&before);
    assert_ne!(lines[line - 1], before, "the edit for {needle:?} changed nothing");
    let text = lines.join("\n");
    let err = format!("{:#}", parse(&text).expect_err(needle));
    let at = match col {
        Some(c) => format!("line {line}, column {c}:"),
        None => format!("line {line}, column "),
    };
    assert!(err.contains(&at) && err.contains(needle), "expected `{at}` and {needle:?} in: {err}");
}

#[test]
fn parser_rejects_malformed_programs_with_line_and_column() {
    let set = KernelSet::new(&tiny("mha"), 20, InputLayout::Separate).unwrap();
    let mil = &set.wo_fwd.program.mil;
    let find = |pat: &str| mil.lines().position(|l| l.contains(pat)).unwrap_or_else(|| panic!("{pat}")) + 1;
    let mm = find("= matmul(");
    rejects(mil, mm, |l| l.replace("= matmul(", "= matmull("), None, "unsupported op `matmull`");
    rejects(mil, mm, |l| l.replacen("x = ", "x = nope_", 1), None, "is not defined");
    rejects(mil, mm, |l| l.replacen("tensor<fp16, [1, 1, ", "tensor<fp16, [1, 2, ", 1), Some(9), "is declared");
    // A missing `;` is noticed at the next token: the start of the following statement.
    let no_semi = mil.lines().enumerate().map(|(i, l)| if i + 1 == mm { l.trim_end_matches(';') } else { l });
    let err = parse(&no_semi.collect::<Vec<_>>().join("\n")).unwrap_err().to_string();
    assert!(err.starts_with(&format!("line {}, column 9: expected `;`", mm + 1)), "{err}");
    rejects(mil, mm, |l| l.replace("string(\"", "string(\"x"), None, "name attribute");
    rejects(mil, mm, |l| l.replacen("x = ", "y = ", 1), None, "given twice");
    rejects(mil, mm, |l| l.replacen("(transpose_x", "(foo = c0, transpose_x", 1), None, "unexpected argument `foo`");
    let c0 = find("c0 = const()");
    rejects(mil, c0, |l| l.to_string() + " " + l.trim(), None, "already defined");
    rejects(mil, c0, |l| l.replace("tensor<int32, [4]>([", "tensor<int32, [4]>([7, "), None, "5 values");
    rejects(mil, c0, |l| l.replace("const()", "const(x = c0)"), None, "is not defined");
    let bool_c = find("bool(true)");
    rejects(mil, bool_c, |l| l.replace("bool(true)", "bool(maybe)"), None, "true or false");
    rejects(mil, bool_c, |l| l.replace("bool(true)", "fp16(0.1)"), None, "not exactly representable");
    rejects(mil, bool_c, |l| l.replace("\")", ""), None, "unterminated string");
    rejects(mil, bool_c, |l| l.replace("=", "@"), None, "unexpected character");
    rejects(mil, 1, |_| "program(1.3]".into(), Some(12), "expected `)`");
    rejects(mil, 1, |_| "prog(1.3)".into(), Some(1), "expected `program`");
    let last = mil.lines().count() - 1;
    rejects(mil, last, |l| l.replace("-> (", "-> (nope"), None, "is not defined");
    rejects(mil, last, |l| l.replace("-> (y0)", "-> (y0, y0)"), None, "listed twice");
    let header = find("func main");
    rejects(mil, header, |l| l.replace("tensor<fp16", "tensor<fp32"), None, "must be fp16");
    // A shape that does not fit what the op makes, and a slice past its input.
    let sep = KernelSet::new(&tiny("gqa-qknorm"), 20, InputLayout::Packed).unwrap();
    let mil = &sep.attn_fwd.program.mil;
    let find = |pat: &str| mil.lines().position(|l| l.contains(pat)).unwrap_or_else(|| panic!("{pat}")) + 1;
    let slice = find("slice_by_size(");
    rejects(mil, slice, |l| l.replace("begin = ", "begin = x"), None, "is not defined");
    rejects(mil, slice, |l| l.replace("begin = c0", "begin = x"), None, "must be a constant");
    let c1 = find("c1 = const()");
    let wide = mil.replacen("[1, 24, 1, 32])]", "[1, 24, 1, 3200])]", 1);
    let err = parse(&wide).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("line {}, column 43: slice_by_size `xn`", c1 + 1)) && err.contains("outside"),
        "{err}"
    );
    rejects(mil, c1 + 1, |l| l.replacen("[1, 24, 1, 32]", "[1, 24, 1, 31]", 1), Some(9), "is declared");
    let blob = find("BLOBFILE");
    rejects(mil, blob, |l| l.replacen("tensor<fp16", "tensor<int32", 2), None, "must be fp16");
    assert!(parse("").unwrap_err().to_string().contains("line 1, column 1"));
}

#[test]
fn emitted_blobs_hold_the_documented_tables() {
    use anetrain::mil::blob::read_blob;
    use anetrain::mil::emit::MASK_VALUE;
    use anetrain::ops::rope::RopeTable;
    let cfg = tiny("gqa-qknorm");
    let set = KernelSet::new(&cfg, 20, InputLayout::Packed).unwrap();
    let s = set.dims.s;
    assert_eq!(s, 32);
    let file = |name: &str| &set.attn_fwd.program.blobs.iter().find(|(p, _)| p == name).unwrap().1;
    let mask = read_blob(file("weights/mask.bin"), 64, s * s, "mask").unwrap();
    for i in 0..s {
        for j in 0..s {
            assert_eq!(mask[i * s + j].to_f32(), if j > i { MASK_VALUE } else { 0.0 }, "mask[{i}][{j}]");
        }
    }
    let (d, half) = (cfg.head_dim, cfg.head_dim / 2);
    let t = RopeTable::new(s, d, cfg.rope_theta);
    let cos = read_blob(file("weights/rope_cos.bin"), 64, s * d, "cos").unwrap();
    let sin = read_blob(file("weights/rope_sin.bin"), 64, s * d, "sin").unwrap();
    for p in 0..s {
        for i in 0..d {
            let (c, sn) = (t.cos[p * half + i % half], t.sin[p * half + i % half]);
            assert_eq!(cos[p * d + i], half::f16::from_f32(c), "cos[{p}][{i}]");
            assert_eq!(sin[p * d + i], half::f16::from_f32(sn), "sin[{p}][{i}]");
        }
    }
    // Every BLOBFILE the program names is shipped, at offset 64 of a single-blob file.
    for k in set.all() {
        for line in k.program.mil.lines().filter(|l| l.contains("BLOBFILE")) {
            let path = line.split("@model_path/").nth(1).unwrap().split('"').next().unwrap();
            assert!(line.contains("offset = uint64(64)"), "{line}");
            let bytes = &k.program.blobs.iter().find(|(p, _)| p == path).unwrap().1;
            assert_eq!(&bytes[64..68], &[0xEF, 0xBE, 0xAD, 0xDE]);
        }
    }
}

/// The forward and backward attention programs ship the scaled RoPE tables: for linear
/// scaling by 2.5 they are the config's table (`RopeTable::for_config`), not θ's alone.
#[test]
fn emitted_rope_tables_carry_the_scaling() {
    use anetrain::mil::blob::read_blob;
    use anetrain::ops::rope::RopeTable;
    let cfg = tiny("mha-linear-rope");
    let set = KernelSet::new(&cfg, 20, InputLayout::Packed).unwrap();
    let (s, d, half) = (set.dims.s, cfg.head_dim, cfg.head_dim / 2);
    let scaled = RopeTable::for_config(s, &cfg);
    let plain = RopeTable::new(s, d, cfg.rope_theta);
    let mut programs = 0;
    for k in set.all() {
        let Some((_, bytes)) = k.program.blobs.iter().find(|(p, _)| p == "weights/rope_cos.bin") else { continue };
        programs += 1;
        let cos = read_blob(bytes, 64, s * d, "cos").unwrap();
        let mut differs = false;
        for p in 0..s {
            for i in 0..d {
                assert_eq!(cos[p * d + i], half::f16::from_f32(scaled.cos[p * half + i % half]), "cos[{p}][{i}]");
                differs |= cos[p * d + i] != half::f16::from_f32(plain.cos[p * half + i % half]);
            }
        }
        assert!(differs, "the scaled table equals the unscaled one");
    }
    assert!(programs >= 2, "attention forward and backward both rotate");
}

#[test]
fn kernels_respect_the_hardware_limits() {
    // Every dimension ≤ 65536 and every spatial width a multiple of 16, for the real shapes.
    for preset in ["stories110m", "qwen3-0.6b"] {
        let cfg = ModelConfig::preset(preset).unwrap();
        for layout in [InputLayout::Packed, InputLayout::Separate] {
            let set = KernelSet::new(&cfg, 256, layout).unwrap();
            for k in set.all().into_iter().chain([&set.classifier]) {
                for sig in k.program.inputs.iter().chain(&k.program.outputs) {
                    assert!(sig.shape.iter().all(|&d| d <= 65536), "{preset} {}: {sig:?}", k.program.name);
                    assert_eq!(sig.shape[3] % 16, 0, "{preset} {}: {sig:?}", k.program.name);
                }
            }
        }
    }
    // Too wide a model is refused by name, not emitted.
    let wide = ModelConfig { dim: 70_000, ..tiny("mha") };
    let err = KernelSet::new(&wide, 16, InputLayout::Separate).unwrap_err().to_string();
    assert!(err.contains("65536") && err.contains("attn_fwd"), "{err}");
    // The packed layout keeps QK-norm gains in a column, so head_dim must fit in dim.
    let odd = ModelConfig { dim: 8, head_dim: 16, ..tiny("gqa-qknorm") };
    let err = KernelSet::new(&odd, 16, InputLayout::Packed).unwrap_err().to_string();
    assert!(err.contains("--mil-layout separate"), "{err}");
    KernelSet::new(&odd, 16, InputLayout::Separate).unwrap();
}

/// Golden text of every program for one tiny GQA + QK-norm config. The files were read
/// through by hand once; regenerate with `ANETRAIN_BLESS=1 cargo test --test mil golden`.
#[test]
fn golden_program_text() {
    let cfg = ModelConfig { dim: 16, ffn_dim: 32, n_heads: 2, n_kv_heads: 1, head_dim: 8, ..tiny("gqa-qknorm") };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mil");
    let bless = std::env::var_os("ANETRAIN_BLESS").is_some();
    for layout in [InputLayout::Packed, InputLayout::Separate] {
        let set = KernelSet::new(&cfg, 16, layout).unwrap();
        for k in set.all().into_iter().chain([&set.classifier]) {
            let path = dir.join(format!("{}-{}.mil", format!("{layout:?}").to_lowercase(), k.program.name));
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &k.program.mil).unwrap();
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(k.program.mil, want, "{} changed; if intended, re-bless and review the diff", path.display());
        }
    }
}

#[test]
fn the_classifier_is_chunked_under_the_dimension_limit() {
    use anetrain::mil::emit::{Chunks, classifier_chunks};
    assert_eq!(classifier_chunks(151_936, 256, InputLayout::Packed), Chunks { rows: 50_656, count: 3 });
    assert_eq!(classifier_chunks(151_936, 256, InputLayout::Separate), Chunks { rows: 50_656, count: 3 });
    assert_eq!(classifier_chunks(32_000, 256, InputLayout::Packed), Chunks { rows: 32_000, count: 1 });
    assert_eq!(classifier_chunks(65_536, 16, InputLayout::Separate), Chunks { rows: 65_536, count: 1 });
    assert_eq!(classifier_chunks(65_536, 16, InputLayout::Packed), Chunks { rows: 32_768, count: 2 });
    let qwen = KernelSet::new(&ModelConfig::preset("qwen3-0.6b").unwrap(), 256, InputLayout::Packed).unwrap();
    assert_eq!(qwen.classifier.program.inputs[0].shape, [1, 1024, 1, 256 + 50_656]);

    // Two chunks (the second zero-padded) through the simulator against an f32 product.
    let cfg = ModelConfig { vocab_size: 70_001, ..tiny("mha") };
    let (b, t) = (2, 20);
    let mut sim = MilBackend::new(&cfg, b, t, InputLayout::Packed, Box::new(SimRunner::new(Par::seq()))).unwrap();
    let mut rng = anetrain::rng::Rng::new(4);
    let (n, c, v) = (b * t, cfg.dim, cfg.vocab_size);
    let xf: Vec<f32> = (0..n * c).map(|_| rng.normal() as f32).collect();
    let e: Vec<f32> = (0..v * c).map(|_| (rng.normal() / (c as f64).sqrt()) as f32).collect();
    let mut got = vec![f32::NAN; n * v];
    sim.classifier_logits(&mut got, &xf, &e).unwrap();
    let mut want = vec![0.0; n * v];
    anetrain::ops::matmul::matmul_forward(Par::seq(), &mut want, &xf, &e, n, c, v);
    let (max, mean) = anetrain::mil::check::rel_errors(&got, &want);
    assert!(max <= MAX_TOL && mean <= MEAN_TOL, "classifier: max {max:.2e}, mean {mean:.2e}");
}

/// With a weights version promised, each layer's weights stay staged in that layer's slot:
/// calls with the same version and weights convert nothing; a new version, or weights that
/// changed under the same version (caught by the probe), are staged again; outputs always
/// equal a backend that stages on every call.
#[test]
fn weights_stay_staged_per_layer_while_their_version_holds() {
    use anetrain::backend::{Backend, LayerActs};
    use anetrain::params::ParamLayout;
    let cfg = tiny("gqa-qknorm");
    let (b, t) = (2, 20);
    let new = || MilBackend::new(&cfg, b, t, InputLayout::Packed, Box::new(SimRunner::new(Par::seq()))).unwrap();
    let (mut cached, mut fresh) = (new(), new());
    let layout = ParamLayout::new(&cfg);
    let mut params = layout.init(9);
    let mut acts = LayerActs::new(&cfg, b, t, false).unwrap();
    let mut rng = anetrain::rng::Rng::new(2);
    acts.xn1 = (0..b * t * cfg.dim).map(|_| rng.normal() as f32).collect();
    let mut o = vec![0.0; b * t * cfg.dim];
    let mut forward = |backend: &mut MilBackend, params: &[f32], l: usize| -> Vec<f32> {
        backend.attention_forward(&mut o, &mut acts, &layout.layer(params, l)).unwrap();
        o.clone()
    };
    cached.set_weights_version(Some(1));
    let first = forward(&mut cached, &params, 0);
    assert_eq!(cached.weight_stagings(), 2, "attn_fwd and wo_fwd of layer 0");
    forward(&mut cached, &params, 1);
    assert_eq!(cached.weight_stagings(), 4, "layer 1 has its own slots");
    assert_eq!(forward(&mut cached, &params, 0), first);
    forward(&mut cached, &params, 1);
    assert_eq!(cached.weight_stagings(), 4, "same version, same weights: nothing restaged");
    // An update without a version bump is still caught (the probe), and one with it, too.
    for x in &mut params {
        *x *= 0.9;
    }
    let after = forward(&mut cached, &params, 0);
    assert_eq!(cached.weight_stagings(), 6);
    assert_eq!(after, forward(&mut fresh, &params, 0), "cached slot vs staging every call");
    assert_ne!(after, first);
    cached.set_weights_version(Some(2));
    forward(&mut cached, &params, 0);
    assert_eq!(cached.weight_stagings(), 8, "a new version restages");
    let before = fresh.weight_stagings();
    forward(&mut fresh, &params, 0);
    assert_eq!(fresh.weight_stagings(), before + 2, "without a version, every call stages");
}

/// QK-norm with large pre-norm projections (RMS ≈ 40 at D = 128, where squaring the raw
/// values would overflow fp16's sum and zero q out) still matches the cpu backend.
#[test]
fn qk_norm_survives_large_projections() {
    use anetrain::backend::cpu::CpuBackend;
    use anetrain::backend::{Backend, LayerActs};
    use anetrain::params::ParamLayout;
    let cfg = ModelConfig { dim: 128, head_dim: 128, n_heads: 2, n_kv_heads: 1, ..tiny("gqa-qknorm") };
    let (b, t) = (1, 20);
    let layout = ParamLayout::new(&cfg);
    let mut params = layout.init(1);
    let mut rng = anetrain::rng::Rng::new(3);
    for tensor in &layout.tensors {
        let std = if tensor.name.contains("q_proj") || tensor.name.contains("k_proj") { 40.0 } else { 1.0 };
        for x in &mut params[tensor.range()] {
            *x = if tensor.shape.len() == 1 { 1.0 } else { (std * rng.normal() / (cfg.dim as f64).sqrt()) as f32 };
        }
    }
    let w = layout.layer(&params, 0);
    let mut a_cpu = LayerActs::new(&cfg, b, t, true).unwrap();
    a_cpu.xn1 = (0..t * cfg.dim).map(|_| rng.normal() as f32).collect();
    let mut a_sim = LayerActs::new(&cfg, b, t, false).unwrap();
    a_sim.xn1 = a_cpu.xn1.clone();
    let mut o = vec![0.0; t * cfg.dim];
    CpuBackend::new(&cfg, b, t, Par::seq()).attention_forward(&mut o, &mut a_cpu, &w).unwrap();
    let mut sim = MilBackend::new(&cfg, b, t, InputLayout::Separate, Box::new(SimRunner::new(Par::seq()))).unwrap();
    sim.attention_forward(&mut o, &mut a_sim, &w).unwrap();
    let rms = (a_cpu.q_raw.iter().map(|x| (x * x) as f64).sum::<f64>() / a_cpu.q_raw.len() as f64).sqrt();
    assert!(rms > 30.0, "the test needs large projections, got RMS {rms}");
    for (what, got, want) in [("q", &a_sim.q, &a_cpu.q), ("k", &a_sim.k, &a_cpu.k), ("attn", &a_sim.attn, &a_cpu.attn)]
    {
        let (max, mean) = anetrain::mil::check::rel_errors(got, want);
        assert!(max <= MAX_TOL && mean <= MEAN_TOL, "{what}: max {max:.2e}, mean {mean:.2e} at q_raw RMS {rms:.1}");
    }
    // An eps that fp16 rounds to zero would turn padded positions into NaN: refused.
    let err = KernelSet::new(&ModelConfig { norm_eps: 1e-9, ..cfg.clone() }, 20, InputLayout::Packed).unwrap_err();
    assert!(err.to_string().contains("rounds to 0 in fp16"), "{err}");
}

/// Through a whole model: with a weights version, one forward + backward stages each
/// weight-bearing kernel once per layer (8 of them) plus the classifier's chunk; a second
/// micro-batch under the same version stages nothing; a new version stages everything again.
#[test]
fn a_micro_batch_under_the_same_version_stages_no_weights() {
    use anetrain::backend::Backend;
    use anetrain::model::Model;
    let cfg = tiny("gqa-qknorm");
    let (b, t) = (2, 20);
    let par = Par::seq();
    let new = || MilBackend::new(&cfg, b, t, InputLayout::Packed, Box::new(SimRunner::new(par))).unwrap();
    // The staging count is read through a second handle: the model owns the backend.
    struct Shared(std::sync::Arc<std::sync::Mutex<MilBackend>>);
    impl Backend for Shared {
        fn name(&self) -> &'static str {
            "mil-sim"
        }
        fn shape(&self) -> (usize, usize) {
            self.0.lock().unwrap().shape()
        }
        fn set_weights_version(&mut self, v: Option<u64>) {
            self.0.lock().unwrap().set_weights_version(v)
        }
        fn classifier_forward(&mut self, l: &mut [f32], x: &[f32], e: &[f32]) -> anyhow::Result<bool> {
            self.0.lock().unwrap().classifier_forward(l, x, e)
        }
        fn attention_forward(
            &mut self,
            o: &mut [f32],
            a: &mut anetrain::backend::LayerActs,
            w: &anetrain::backend::Weights,
        ) -> anyhow::Result<()> {
            self.0.lock().unwrap().attention_forward(o, a, w)
        }
        fn ffn_forward(
            &mut self,
            o: &mut [f32],
            a: &mut anetrain::backend::LayerActs,
            w: &anetrain::backend::Weights,
        ) -> anyhow::Result<()> {
            self.0.lock().unwrap().ffn_forward(o, a, w)
        }
        fn ffn_backward_dx(
            &mut self,
            dx: &mut [f32],
            g: &mut anetrain::backend::LayerGrads,
            d: &[f32],
            a: &anetrain::backend::LayerActs,
            w: &anetrain::backend::Weights,
        ) -> anyhow::Result<()> {
            self.0.lock().unwrap().ffn_backward_dx(dx, g, d, a, w)
        }
        fn attention_backward_dx(
            &mut self,
            dx: &mut [f32],
            g: &mut anetrain::backend::LayerGrads,
            n: anetrain::backend::QkNormGrads,
            d: &[f32],
            a: &anetrain::backend::LayerActs,
            w: &anetrain::backend::Weights,
        ) -> anyhow::Result<()> {
            self.0.lock().unwrap().attention_backward_dx(dx, g, n, d, a, w)
        }
    }
    let shared = std::sync::Arc::new(std::sync::Mutex::new(new()));
    let mut model = Model::new(&cfg, b, t, par, Box::new(Shared(shared.clone()))).unwrap();
    let params = model.layout.init(5);
    let mut grads = vec![0.0; params.len()];
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
    let targets: Vec<u32> = tokens.iter().map(|&x| (x + 1) % cfg.vocab_size as u32).collect();
    let per_pass = 8 * cfg.n_layers + 1;
    model.set_weights_version(Some(1));
    let first = model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 2).unwrap();
    assert_eq!(shared.lock().unwrap().weight_stagings(), per_pass);
    let second = model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 2).unwrap();
    assert_eq!(shared.lock().unwrap().weight_stagings(), per_pass, "same version: only activations written");
    assert_eq!(first.sum.to_bits(), second.sum.to_bits());
    model.set_weights_version(Some(2));
    model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 2).unwrap();
    assert_eq!(shared.lock().unwrap().weight_stagings(), 2 * per_pass);
}

#[test]
fn qkv_biases_are_refused_with_the_way_out() {
    let cfg = ModelConfig { qkv_bias: true, ..tiny("mha") };
    let err = format!("{:#}", KernelSet::new(&cfg, 16, InputLayout::Packed).unwrap_err());
    assert!(err.contains("q/k/v bias") && err.contains("--backend cpu"), "{err}");
}
