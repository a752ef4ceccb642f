//! Quantized decoding (`--quant`): the decoder with Q8_0/Q4_0 matrices gives the same bits
//! alone or batched, stays close to f32, reads a GGUF file's quantized tensors as stored
//! (q/k rows un-permuted), evaluates like the f32 path, and the CLI refuses models whose
//! widths are not whole blocks.

use anetrain::checkpoint::gguf::GgufFile;
use anetrain::checkpoint::gguf::writer::{Extras, save_model};
use anetrain::config::ModelConfig;
use anetrain::data::TokenData;
use anetrain::generate::{BatchDecoder, Decoder, KvCache, Row};
use anetrain::ops::{GemmImpl, Par};
use anetrain::params::{ParamLayout, TensorKind};
use anetrain::quant::GgmlType;
use anetrain::quant::weights::{QuantMode, QuantWeights};
use anetrain::rng::Rng;
use std::process::Command;

#[path = "common/shared_data.rs"]
mod shared_data;

/// Widths that are whole blocks of 32: C 64, H·D 64, F 96.
fn tiny(qk_norm: bool) -> ModelConfig {
    ModelConfig {
        name: "tiny".into(),
        dim: 64,
        ffn_dim: 96,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        vocab_size: 300,
        max_seq_len: 64,
        qk_norm,
        tied_embeddings: !qk_norm,
        ..ModelConfig::preset("stories260k").unwrap()
    }
}

fn params(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut rng = Rng::new(seed);
    let mut p = layout.init(seed);
    for t in &layout.tensors {
        for x in &mut p[t.range()] {
            *x = if t.kind == TensorKind::Norm { 1.0 + 0.2 * rng.normal() as f32 } else { 0.2 * rng.normal() as f32 };
        }
    }
    p
}

/// max |a − b| / max |b|
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `p` with its matrices replaced by `q`'s, dequantized: the f32 model whose weights the
/// quantized decoder uses, so the two differ only by the activations' rounding.
fn dequantized(cfg: &ModelConfig, p: &[f32], q: &QuantWeights) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut out = p.to_vec();
    let fill = |dst: &mut [f32], m: &anetrain::quant::matvec::QMatrix| {
        for (j, row) in dst.chunks_exact_mut(m.k).enumerate() {
            m.dequant_row(j, row);
        }
    };
    for (l, ql) in q.layers.iter().enumerate() {
        let w = layout.layer_mut(&mut out, l);
        fill(w.wqkv, &ql.wqkv);
        fill(w.wo, &ql.wo);
        fill(w.w13, &ql.w13);
        fill(w.w2, &ql.w2);
    }
    fill(layout.view_mut(&mut out, layout.classifier()), &q.classifier);
    out
}

/// Logits of `tokens` fed one position at a time through a decoder.
fn decode_all(cfg: &ModelConfig, p: &[f32], q: Option<&QuantWeights>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut d = BatchDecoder::with_quant(cfg, p, q, 32, 1).unwrap();
    let mut cache = KvCache::new(cfg, 32).unwrap();
    tokens
        .iter()
        .enumerate()
        .map(|(pos, &token)| d.forward(&mut [&mut cache], &[Row { seq: 0, token, pos }]).unwrap().to_vec())
        .collect()
}

#[test]
fn quantized_decoding_is_identical_alone_or_batched_and_close_to_f32() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for qk_norm in [false, true] {
        let cfg = tiny(qk_norm);
        let p = params(&cfg, 3);
        let v = cfg.vocab_size;
        let mut rng = Rng::new(4);
        let seqs: Vec<Vec<u32>> = (0..3).map(|_| (0..10).map(|_| rng.below(v as u64) as u32).collect()).collect();
        for mode in [QuantMode::Q8_0, QuantMode::Q4_0] {
            let q = QuantWeights::quantize(&cfg, &p, mode).unwrap();
            // Activation rounding alone, through two layers of these deliberately large
            // weights; wiring mistakes (a wrong matrix or row order) are off by the whole scale.
            let tol = 0.1;
            let pd = dequantized(&cfg, &p, &q);
            pool.install(|| {
                let f32_ref = decode_all(&cfg, &pd, None, &seqs[0]);
                let alone: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| decode_all(&cfg, &p, Some(&q), s)).collect();
                for (pos, (a, b)) in alone[0].iter().zip(&f32_ref).enumerate() {
                    let e = rel_err(a, b);
                    assert!(e <= tol, "{mode:?} qk_norm {qk_norm} position {pos}: {e} of the logit scale from f32");
                }
                // Three sequences, one row each per call.
                let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(&cfg, 32).unwrap()).collect();
                let mut batch = BatchDecoder::with_quant(&cfg, &p, Some(&q), 32, 4).unwrap();
                for pos in 0..10 {
                    let rows: Vec<Row> = (0..3).map(|i| Row { seq: i, token: seqs[i][pos], pos }).collect();
                    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                    let logits = batch.forward(&mut refs, &rows).unwrap();
                    for i in 0..3 {
                        assert!(logits[i * v..(i + 1) * v] == alone[i][pos][..], "{mode:?}: seq {i} pos {pos} batched");
                    }
                }
                // One sequence as the rows of one call (prefill), then steps.
                let mut d = Decoder::with_quant(&cfg, &p, Some(&q), 32).unwrap();
                d.prefill_rows(&seqs[1][..6]).unwrap();
                assert!(d.logits == alone[1][5], "{mode:?}: prefill rows differ from one at a time");
                for pos in 6..10 {
                    d.step(seqs[1][pos]).unwrap();
                    assert!(d.logits == alone[1][pos], "{mode:?}: step {pos} after a prefill differs");
                }
            });
        }
    }
}

#[test]
fn gguf_q8_0_tensors_are_decoded_as_stored() {
    // A llama-architecture file (q/k rows stored permuted) with Q8_0 matrices.
    let cfg = tiny(false);
    let p = params(&cfg, 8);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let extras =
        Extras { tokenizer: None, pre_tokenizer: None, bos: None, eos: None, chat_template: None, add_bos: false };
    save_model(&path, &cfg, &p, GgmlType::Q8_0, &extras).unwrap();
    let loaded = anetrain::checkpoint::load(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let q = QuantWeights::from_gguf(&file, &loaded.cfg).unwrap();
    assert!(q.description.contains("Q8_0"), "{}", q.description);
    // Same weights both ways (the f32 load dequantizes the same blocks): only the activations'
    // rounding differs. Rows in the wrong order would be off by the logits' whole scale.
    let tokens = [5u32, 17, 200, 3, 99, 42];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        let want = decode_all(&loaded.cfg, &loaded.params, None, &tokens);
        let got = decode_all(&loaded.cfg, &loaded.params, Some(&q), &tokens);
        for (pos, (a, b)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= 0.05, "position {pos}: {e} of the logit scale");
        }
    });
    // --quant gguf through the CLI: greedy ids as the library decodes them.
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["generate", "--model", path.to_str().unwrap(), "--ids", "5,17", "--max-tokens", "4"])
        .args(["--temperature", "0", "--quant", "gguf", "--threads", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("GGUF tensors as stored (Q8_0)"), "{stderr}");
    let printed: Vec<u32> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(|t| t.parse().unwrap()).collect();
    let mut expect = Vec::new();
    pool.install(|| {
        anetrain::generate::generate(
            &loaded.cfg,
            &loaded.params,
            Some(&q),
            &[5, 17],
            4,
            anetrain::generate::Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
            None,
            Par { threads: 2, gemm: GemmImpl::Gemm },
            |t| expect.push(t),
        )
        .unwrap()
    });
    assert_eq!(printed, expect);
}

#[test]
fn quantized_eval_scores_the_same_windows_as_f32() {
    let cfg = tiny(true);
    let p = params(&cfg, 11);
    let mut rng = Rng::new(12);
    let tokens: Vec<u32> = (0..200).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
    let data = TokenData::from_vec(tokens, cfg.vocab_size, "random tokens").unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let f = pool.install(|| anetrain::eval::evaluate(&cfg, &p, &data, 48, 2, 0, par)).unwrap();
    let q = QuantWeights::quantize(&cfg, &p, QuantMode::Q8_0).unwrap();
    let r = pool.install(|| anetrain::eval::evaluate_quant(&cfg, &p, &q, &data, 48, 0)).unwrap();
    assert_eq!((r.windows, r.tokens), (f.windows, f.tokens));
    let rel = (r.perplexity / f.perplexity - 1.0).abs();
    assert!(rel < 0.01, "q8_0 perplexity {} vs f32 {}", r.perplexity, f.perplexity);
    assert!(r.perplexity != f.perplexity, "the quantized path must not be the f32 one");
}

#[test]
fn quant_refuses_models_it_cannot_quantize_with_the_reason() {
    // F = 172 is not a whole number of blocks.
    let cfg = ModelConfig { n_layers: 1, ..ModelConfig::preset("stories260k").unwrap() };
    let p = params(&cfg, 1);
    let e = QuantWeights::quantize(&cfg, &p, QuantMode::Q8_0).err().unwrap();
    assert!(format!("{e:#}").contains("the FFN width F = 172 is not a multiple of the block length 32"), "{e:#}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f172.gguf");
    let extras =
        Extras { tokenizer: None, pre_tokenizer: None, bos: None, eos: None, chat_template: None, add_bos: false };
    save_model(&path, &cfg, &p, GgmlType::F32, &extras).unwrap();
    let run = |quant: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
            .args(["generate", "--model", path.to_str().unwrap(), "--ids", "1", "--max-tokens", "2", "--quant", quant])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run("q8_0");
    assert!(e.contains("F = 172 is not a multiple of the block length 32"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // An F32 GGUF has no quantized tensors to use as stored.
    let cfg = tiny(false);
    let path = dir.path().join("f32.gguf");
    save_model(&path, &cfg, &params(&cfg, 2), GgmlType::F32, &extras).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["generate", "--model", path.to_str().unwrap(), "--ids", "1", "--max-tokens", "2", "--quant", "gguf"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("is F32, which quantized decoding cannot use as it is"), "{e}");
}

/// The shared SmolLM2 file's own Q4_1 matrices (and Q8_0 embedding as the tied classifier),
/// used as stored, decode close to the f32 path over the same dequantized weights.
#[test]
fn smollm2_q4_1_decodes_as_stored() {
    let Some(path) = shared_data::shared_data("data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        return;
    };
    let loaded = anetrain::checkpoint::load(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let q = QuantWeights::from_gguf(&file, &loaded.cfg).unwrap();
    assert!(q.description.contains("Q4_1") && q.description.contains("Q8_0"), "{}", q.description);
    let tokens = [1u32, 504, 3458, 282, 4649, 314];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        let want = decode_all(&loaded.cfg, &loaded.params, None, &tokens);
        let got = decode_all(&loaded.cfg, &loaded.params, Some(&q), &tokens);
        for (pos, (a, b)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= 0.3, "position {pos}: {e} of the logit scale");
        }
    });
}
