//! GGUF import fidelity: every dequantizer against the `gguf` Python package, and the shared
//! SmolLM2-135M-Instruct Q4_1 file against HF transformers (tools/make_gguf_fixtures.py).

use anetrain::checkpoint::gguf::GgufFile;
use anetrain::checkpoint::safetensors::SafeTensors;
use anetrain::config::ModelConfig;
use anetrain::generate::Sampling;
use anetrain::model::Model;
use anetrain::ops::{GemmImpl, Par};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[path = "common/shared_data.rs"]
mod shared_data;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Each fixture holds tensor "q" (random blocks of one type) and "ref" (the gguf package's
/// dequantization of them, F32); ours must equal it bit for bit.
#[test]
fn every_dequantizer_matches_the_gguf_package() {
    let types = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"];
    for ty in types {
        let path = root().join(format!("tests/fixtures/gguf/dequant_{ty}.gguf"));
        let f = GgufFile::open(&path).unwrap();
        let q = f.tensor("q").unwrap();
        let r = f.tensor("ref").unwrap();
        assert_eq!(q.ty.name(), ty);
        assert_eq!(q.shape(), r.shape());
        let n = q.numel() as usize;
        let (mut got, mut want) = (vec![0.0f32; n], vec![0.0f32; n]);
        f.read_f32(q, &mut got).unwrap();
        f.read_f32(r, &mut want).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{ty}: value {i} is {a}, the gguf package gives {b}");
        }
    }
}

#[derive(Deserialize)]
struct Golden {
    strings: Vec<String>,
    ids: Vec<Vec<u32>>,
    window_ids: Vec<u32>,
    window_loss: f64,
    prompt_ids: Vec<u32>,
    greedy: Vec<u32>,
}

fn shared_gguf() -> Option<PathBuf> {
    shared_data::shared_data("data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Loss, greedy continuation and tokenization of the real SmolLM2 GGUF equal HF transformers'.
#[test]
fn smollm2_q4_1_matches_transformers() {
    let Some(path) = shared_gguf() else { return };
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/gguf_smollm2.json")).unwrap())
            .unwrap();
    let m = anetrain::checkpoint::load(&path).unwrap();
    assert_eq!((m.cfg.dim, m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_kv_heads), (576, 30, 9, 3));
    assert!(m.cfg.tied_embeddings);
    assert_eq!((m.bos, m.eos), (Some(1), Some(2)));
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));

    let tok = m.tokenizer.as_ref().unwrap();
    for (text, ids) in golden.strings.iter().zip(&golden.ids) {
        assert_eq!(&tok.encode(text).unwrap(), ids, "tokenization of {text:?}");
        // Decoding drops special tokens (chat markup), as generation output should.
        if !text.contains("<|") {
            assert_eq!(&tok.decode(ids).unwrap(), text, "decoding of {text:?}");
        }
    }

    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let w = &golden.window_ids;
    let t = w.len() - 1;
    let mut model = Model::cpu(&m.cfg, 1, t, par).unwrap();
    let loss = model.forward(&m.params, &w[..t], &w[1..]).unwrap().mean();
    let rel = (loss - golden.window_loss).abs() / golden.window_loss;
    assert!(rel < 2e-5, "loss {loss} vs transformers {} (relative {rel:e})", golden.window_loss);
    drop(model);

    let mut greedy = Vec::new();
    let sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
    anetrain::generate::generate(
        &m.cfg,
        &m.params,
        None,
        &golden.prompt_ids,
        golden.greedy.len(),
        sampling,
        m.eos,
        par,
        |t| greedy.push(t),
    )
    .unwrap();
    assert_eq!(greedy, golden.greedy, "greedy continuation: ours {:?}", tok.decode(&greedy));
}

/// `eval --model x.gguf` reads the file and scores a token file.
#[test]
fn eval_command_reads_gguf() {
    let Some(path) = shared_gguf() else { return };
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/gguf_smollm2.json")).unwrap())
            .unwrap();
    let dir = std::env::temp_dir().join(format!("anetrain-gguf-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("window.tok");
    let fp = anetrain::checkpoint::load(&path).unwrap().tokenizer.unwrap().fingerprint;
    anetrain::data::TokenData::write(&data, &golden.window_ids, 49152, &fp).unwrap();
    let t = golden.window_ids.len() - 1;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["eval", "--model", path.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--seq", &t.to_string(), "--json", "--threads", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!((loss - golden.window_loss).abs() / golden.window_loss < 2e-5, "eval loss {loss}");
    std::fs::remove_dir_all(Path::new(&dir)).unwrap();
}

/// `train --init <the SmolLM2 GGUF> --data notes.txt`: no --model, the text tokenized with the
/// model's own tokenizer, training starts at the pretrained loss (far below ln V ≈ 10.8) and
/// lowers it. SmolLM2-135M needs ~2.8 GB here (weights, gradients, AdamW moments, the loaded
/// copy); B=1, T=32, 4 updates.
#[test]
fn train_init_from_gguf_on_raw_text() {
    let Some(path) = shared_gguf() else { return };
    let dir = std::env::temp_dir().join(format!("anetrain-gguf-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notes = dir.join("notes.txt");
    let para = "The lighthouse keeper wrote in his notebook every evening. He counted the ships that \
                passed, noted the weather, and drew the birds that landed on the rail.";
    std::fs::write(&notes, [para; 12].join("\n\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["train", "--init", path.to_str().unwrap(), "--data", notes.to_str().unwrap()])
        .args(["--steps", "4", "--batch", "1", "--seq", "32", "--lr", "5e-4", "--warmup", "0", "--eval-every", "0"])
        .args(["--no-peak", "--sample-tokens", "0", "--threads", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("loss ")).expect("a loss summary line");
    let nums: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let (first, last) = (nums[0], nums[1]);
    assert!(first < 6.5, "first loss {first}: not the pretrained model with its own tokenizer\n{stdout}");
    assert!(last < first, "loss did not fall: {first} -> {last}\n{stdout}");
    // --model and --init together are refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["train", "--init", path.to_str().unwrap(), "--model", "stories2m"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `anetrain convert --from FROM --to TO --dtype f32`.
fn convert(from: &Path, to: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["convert", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap(), "--dtype", "f32"])
        .output()
        .unwrap();
    assert!(out.status.success(), "convert {from:?} → {to:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The CPU model's logits `[b·t, V]` on `tokens` `[b·t]` (2 threads).
fn logits(cfg: &ModelConfig, params: &[f32], tokens: &[u32], b: usize, t: usize) -> Vec<f32> {
    let mut model = Model::cpu(cfg, b, t, Par { threads: 2, gemm: GemmImpl::Gemm }).unwrap();
    model.forward(params, tokens, tokens).unwrap();
    model.logits().to_vec()
}

/// The logits on a golden file's `tokens` `[b·t]` equal its HF transformers `logits`
/// `[b·t, V]` within 5e-6 of the largest |logit| (f32 summation order).
fn assert_golden_logits(what: &str, cfg: &ModelConfig, params: &[f32], golden: &Path, b: usize, t: usize) {
    let batch = SafeTensors::open(golden).unwrap();
    let tokens: Vec<u32> = batch.read_i64("tokens").unwrap().iter().map(|&x| x as u32).collect();
    let got = logits(cfg, params, &tokens, b, t);
    let mut want = vec![0.0f32; got.len()];
    batch.read_f32("logits", &mut want).unwrap();
    let scale = want.iter().fold(0.0f32, |a, x| a.max(x.abs()));
    let err = got.iter().zip(&want).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("{what}: logits max error {err:.2e} of max |logit| {scale:.3}");
    assert!(err <= 5e-6 * scale, "{what}: logits max error {err:.3e} vs 5e-6 × {scale:.3}");
}

#[derive(Deserialize)]
struct RopeGolden {
    batch: usize,
    seq: usize,
    rope_theta: f64,
    rope_scaling: HfRope,
    rope_freqs: Vec<f32>,
}

#[derive(Deserialize)]
struct HfRope {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: usize,
}

/// A tiny Llama 3 model written as llama.cpp writes one (`rope_freqs.weight`, no scaling
/// metadata): the Llama 3 parameters are recovered exactly, the logits equal HF transformers'
/// for the same weights and HF config (the fixture asserts the scaling moves them by ~1.0, far
/// beyond the 5e-6 here), and `convert` to HF and to GGUF keeps the scaling: the HF config.json
/// carries `rope_scaling` and the exported GGUF the same divisors, bit for bit.
#[test]
fn llama3_rope_freqs_match_transformers_and_round_trip() {
    use anetrain::config::{Llama3Scaling, RopeScaling};
    let dir = root().join("tests/fixtures/gguf");
    let golden: RopeGolden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("llama3_rope.json")).unwrap()).unwrap();
    let path = dir.join("llama3_rope.gguf");
    let m = anetrain::checkpoint::gguf::load(&path).unwrap();
    let h = &golden.rope_scaling;
    let want_scaling = RopeScaling::Llama3(Llama3Scaling {
        factor: h.factor,
        low_freq_factor: h.low_freq_factor,
        high_freq_factor: h.high_freq_factor,
        original_max_position_embeddings: h.original_max_position_embeddings,
    });
    assert_eq!(m.cfg.rope_scaling, Some(want_scaling));
    assert_eq!(m.cfg.rope_theta, golden.rope_theta);

    let golden_logits = dir.join("llama3_rope.safetensors");
    assert_golden_logits("llama3 rope_freqs GGUF", &m.cfg, &m.params, &golden_logits, golden.batch, golden.seq);

    // convert: GGUF → HF directory → GGUF, and GGUF → GGUF.
    let tmp = std::env::temp_dir().join(format!("anetrain-gguf-rope-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (hf_dir, from_hf, from_gguf) = (tmp.join("hf"), tmp.join("from-hf.gguf"), tmp.join("from-gguf.gguf"));
    convert(&path, &hf_dir);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["rope_scaling"]["rope_type"], "llama3", "{config}");
    assert_eq!(config["rope_scaling"]["original_max_position_embeddings"], h.original_max_position_embeddings);
    let (hf_cfg, hf_params) = anetrain::checkpoint::hf::load(&hf_dir).unwrap();
    assert_eq!(hf_cfg.rope_scaling, m.cfg.rope_scaling);
    assert_eq!(hf_params, m.params);
    convert(&hf_dir, &from_hf);
    convert(&path, &from_gguf);
    for out in [&from_hf, &from_gguf] {
        let f = GgufFile::open(out).unwrap();
        let t = f.tensor("rope_freqs.weight").expect("the export writes rope_freqs.weight");
        let mut r = vec![0.0f32; t.numel() as usize];
        f.read_f32(t, &mut r).unwrap();
        assert_eq!(
            r.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            golden.rope_freqs.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let back = f.load().unwrap();
        assert_eq!(back.cfg.rope_scaling, m.cfg.rope_scaling);
        assert_eq!(back.params, m.params);
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[derive(Deserialize)]
struct LinearGolden {
    batch: usize,
    seq: usize,
    rope_theta: f64,
    rope_scaling: LinearRope,
}

#[derive(Deserialize)]
struct LinearRope {
    rope_type: String,
    factor: f64,
}

/// A tiny model with linear RoPE scaling as llama.cpp's converter writes it
/// (`llama.rope.scaling.type` "linear", `llama.rope.scaling.factor` 2.5, written by the `gguf`
/// package): the factor is read, the logits equal HF transformers' for the same weights and
/// `rope_type: linear` config (the fixture asserts the scaling moves them by 0.6, far beyond
/// the 5e-6 here), and `convert` GGUF → HF → GGUF keeps config and weights bit for bit. The
/// HF golden fixture `llama-linear-rope` goes the other way: HF → GGUF → HF, bit for bit, with
/// the same logits.
#[test]
fn linear_rope_matches_transformers_and_round_trips_through_hf() {
    use anetrain::config::RopeScaling;
    let dir = root().join("tests/fixtures/gguf");
    let golden: LinearGolden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("linear_rope.json")).unwrap()).unwrap();
    assert_eq!(golden.rope_scaling.rope_type, "linear");
    let path = dir.join("linear_rope.gguf");
    let m = anetrain::checkpoint::gguf::load(&path).unwrap();
    assert_eq!(m.cfg.rope_scaling, Some(RopeScaling::Linear { factor: golden.rope_scaling.factor }));
    assert_eq!(m.cfg.rope_theta, golden.rope_theta);

    let golden_logits = dir.join("linear_rope.safetensors");
    assert_golden_logits("linear RoPE GGUF", &m.cfg, &m.params, &golden_logits, golden.batch, golden.seq);

    let tmp = std::env::temp_dir().join(format!("anetrain-gguf-linear-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let same = |a: &ModelConfig, b: &ModelConfig| {
        let unnamed = |c: &ModelConfig| ModelConfig { name: String::new(), ..c.clone() };
        assert_eq!(unnamed(a), unnamed(b));
    };
    // GGUF → HF → GGUF.
    let (hf_dir, back) = (tmp.join("hf"), tmp.join("back.gguf"));
    convert(&path, &hf_dir);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["rope_scaling"], serde_json::json!({"rope_type": "linear", "factor": 2.5}), "{config}");
    let (hf_cfg, hf_params) = anetrain::checkpoint::hf::load(&hf_dir).unwrap();
    same(&hf_cfg, &m.cfg);
    assert_eq!(hf_params, m.params);
    convert(&hf_dir, &back);
    let f = GgufFile::open(&back).unwrap();
    assert_eq!(f.meta("llama.rope.scaling.type").and_then(|v| v.as_str()), Some("linear"));
    assert_eq!(f.meta("llama.rope.scaling.factor").and_then(|v| v.as_f64()), Some(2.5));
    let b = f.load().unwrap();
    same(&b.cfg, &m.cfg);
    assert_eq!(b.params, m.params);

    // The HF golden fixture: HF → GGUF → HF, and the GGUF's logits are the HF directory's.
    let hf_fixture = root().join("tests/fixtures/llama-linear-rope");
    let (gguf_out, hf_back) = (tmp.join("fixture.gguf"), tmp.join("fixture-hf"));
    convert(&hf_fixture, &gguf_out);
    convert(&gguf_out, &hf_back);
    let (cfg0, p0) = anetrain::checkpoint::hf::load(&hf_fixture).unwrap();
    assert_eq!(cfg0.rope_scaling, Some(RopeScaling::Linear { factor: 2.5 }));
    let g = anetrain::checkpoint::gguf::load(&gguf_out).unwrap();
    let (cfg2, p2) = anetrain::checkpoint::hf::load(&hf_back).unwrap();
    // GGUF holds eps as f32 (llama.cpp's type); nothing else of the config changes.
    let cfg0_f32 = ModelConfig { norm_eps: cfg0.norm_eps as f32 as f64, ..cfg0.clone() };
    for (cfg, p) in [(&g.cfg, &g.params), (&cfg2, &p2)] {
        same(cfg, &cfg0_f32);
        assert_eq!(p, &p0);
    }
    let toks: Vec<u32> = (0..16).map(|i| (i * 7 % cfg0.vocab_size) as u32).collect();
    let a = logits(&cfg0, &p0, &toks, 1, 16);
    assert_eq!(logits(&g.cfg, &g.params, &toks, 1, 16), a);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A `rope_freqs.weight` of the wrong length, with a NaN, or one no Llama 3 parameters
/// produce, YaRN scaling metadata, a bad or missing linear factor, and linear scaling on top of
/// Llama 3's: one sentence each, nothing loaded. A factor without a type is linear scaling (as
/// llama.cpp reads it); type "none" switches a factor off.
#[test]
fn bad_rope_scaling_in_gguf_gets_one_sentence_errors() {
    let good = std::fs::read(root().join("tests/fixtures/gguf/llama3_rope.gguf")).unwrap();
    // The divisors are the data of the second tensor (after token_embd), 16 f32 values; find
    // them by value.
    let golden: RopeGolden =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/gguf/llama3_rope.json")).unwrap())
            .unwrap();
    let bytes: Vec<u8> = golden.rope_freqs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let at = good.windows(bytes.len()).position(|w| w == bytes).unwrap();
    let err = |b: Vec<u8>| match GgufFile::from_bytes(b, "x.gguf").and_then(|f| f.load()) {
        Ok(_) => panic!("accepted"),
        Err(e) => format!("{e:#}"),
    };
    let with = |i: usize, v: f32| {
        let mut b = good.clone();
        b[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    let e = err(with(3, f32::NAN));
    assert!(e.contains("rope_freqs.weight") && e.contains("non-finite"), "{e}");
    let e = err(with(3, 3.0));
    assert!(e.contains("is not Llama 3 RoPE scaling"), "{e}");
    // Length: the entry's single dim (16) follows its name.
    let mut name = b"rope_freqs.weight\x01\0\0\0".to_vec();
    name.extend_from_slice(&16u64.to_le_bytes());
    let pos = good.windows(name.len()).position(|w| w == name).unwrap();
    let mut b = good.clone();
    b[pos + name.len() - 8..pos + name.len()].copy_from_slice(&15u64.to_le_bytes());
    let e = err(b);
    assert!(e.contains("rope_freqs.weight") && e.contains("head_dim 32 has 16"), "{e}");
    for e in [&e, &err(with(3, f32::NAN)), &err(with(3, 3.0))] {
        assert!(!e.trim_end_matches('.').contains(". "), "more than one sentence: {e}");
    }
    // Scaling metadata other than Llama 3's: the file's metadata plus one entry, with the one
    // tensor the config needs.
    use anetrain::checkpoint::gguf::{reader::Value, writer};
    let f = GgufFile::from_bytes(good.clone(), "x.gguf").unwrap();
    let embd = vec![0.0f32; 96 * 64];
    let t = [writer::TensorOut {
        name: "token_embd.weight".into(),
        shape: vec![96, 64],
        ty: f.tensor("token_embd.weight").unwrap().ty,
        data: &embd,
    }];
    let with_meta = |extra: Vec<(&str, Value)>, tensors: &[writer::TensorOut]| {
        let mut md: Vec<(String, Value)> = f
            .header
            .metadata
            .iter()
            .filter(|(k, _)| *k != "general.alignment")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        md.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
        GgufFile::from_bytes(writer::to_bytes(&md, tensors).unwrap(), "x.gguf").unwrap().config()
    };
    let (ty, factor) = ("llama.rope.scaling.type", "llama.rope.scaling.factor");
    let linear = || Value::Str("linear".into());
    for (extra, says) in [
        (vec![(ty, Value::Str("yarn".into()))], "'llama.rope.scaling.type' = 'yarn'"),
        (vec![(ty, linear())], "'llama.rope.scaling.factor' is missing"),
        (
            vec![(ty, linear()), (factor, Value::F32(0.5))],
            "'llama.rope.scaling.factor' (0.5) must be a finite number >= 1",
        ),
        (vec![(factor, Value::F32(f32::NAN))], "'llama.rope.scaling.factor' (NaN) must be"),
        (vec![(factor, Value::F32(-3.0))], "'llama.rope.scaling.factor' (-3) must be"),
        (vec![(factor, Value::Str("4".into()))], "'llama.rope.scaling.factor' is not a number"),
    ] {
        let e = format!("{:#}", with_meta(extra, &t).unwrap_err());
        assert!(e.contains(says), "{e}");
        assert!(!e.trim_end_matches('.').contains(". "), "more than one sentence: {e}");
    }
    let e = format!("{:#}", with_meta(vec![(ty, Value::Str("yarn".into()))], &t).unwrap_err());
    assert!(e.contains("only 'none', 'linear', and Llama 3's"), "{e}");
    // Linear scaling together with Llama 3's divisors.
    let r = &golden.rope_freqs;
    let f32_ty = anetrain::quant::GgmlType::F32;
    let both = [
        writer::TensorOut { name: "rope_freqs.weight".into(), shape: vec![r.len()], ty: f32_ty, data: r },
        writer::TensorOut { name: t[0].name.clone(), shape: t[0].shape.clone(), ty: t[0].ty, data: &embd },
    ];
    let e = format!("{:#}", with_meta(vec![(ty, linear()), (factor, Value::F32(2.0))], &both).unwrap_err());
    assert!(e.contains("linear RoPE scaling metadata together with Llama 3's"), "{e}");
    // Accepted: a factor alone, the old key name, type none, a factor of 0 or 1 alone.
    use anetrain::config::RopeScaling::Linear;
    for (extra, want) in [
        (vec![(factor, Value::F32(4.0))], Some(Linear { factor: 4.0 })),
        (vec![("llama.rope.scale_linear", Value::F32(2.5))], Some(Linear { factor: 2.5 })),
        (vec![(ty, Value::Str("none".into())), (factor, Value::F32(4.0))], None),
        (vec![(factor, Value::F32(1.0))], None),
        (vec![(factor, Value::F32(0.0))], None),
    ] {
        assert_eq!(with_meta(extra, &t).unwrap().rope_scaling, want);
    }
}
