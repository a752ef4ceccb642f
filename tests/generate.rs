//! KV-cache decoding against full recomputation, and sampling.

use anetrain::config::ModelConfig;
use anetrain::generate::{Decoder, Sampling, generate, sample};
use anetrain::model::Model;
use anetrain::ops::cross_entropy::IGNORE;
use anetrain::ops::{GemmImpl, Par};
use anetrain::params::{ParamLayout, TensorKind};
use anetrain::rng::Rng;

fn params(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    // Larger than init so attention is far from uniform and RoPE/QK-norm matter.
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

#[test]
fn kv_cache_logits_equal_full_recomputation() {
    let base = ModelConfig::preset("stories260k").unwrap();
    let configs = [
        ModelConfig { n_layers: 2, ..base.clone() },
        ModelConfig {
            n_layers: 2,
            qk_norm: true,
            tied_embeddings: false,
            head_dim: 12,
            rope_theta: 1e6,
            ..base.clone()
        },
    ];
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for cfg in configs {
        let p = params(&cfg, 5);
        let mut rng = Rng::new(1);
        let seq: Vec<u32> = (0..12).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
        let prompt = &seq[..5];
        pool.install(|| {
            let mut decoder = Decoder::new(&cfg, &p, seq.len()).unwrap();
            decoder.prefill(&mut Model::cpu(&cfg, 1, prompt.len(), par).unwrap(), prompt).unwrap();
            for t in prompt.len()..=seq.len() {
                // Full recomputation over positions 0..t; compare its last row.
                let mut full = Model::cpu(&cfg, 1, t, par).unwrap();
                full.forward(&p, &seq[..t], &vec![IGNORE; t]).unwrap();
                let v = cfg.vocab_size;
                let want = &full.logits()[(t - 1) * v..t * v];
                let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let err = decoder.logits.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-5 * scale, "qk_norm={} position {t}: max error {err:e} of {scale}", cfg.qk_norm);
                if t < seq.len() {
                    decoder.step(seq[t]).unwrap();
                }
            }
        });
    }
}

#[test]
fn greedy_is_deterministic_and_sampling_respects_top_k() {
    let cfg = ModelConfig { n_layers: 2, ..ModelConfig::preset("stories260k").unwrap() };
    let p = params(&cfg, 7);
    let par = Par::seq();
    let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 1 };
    let run = |s: Sampling| {
        let mut out = Vec::new();
        generate(&cfg, &p, None, &[1, 2, 3], 20, s, None, par, |t| out.push(t)).unwrap();
        out
    };
    let a = run(greedy);
    assert_eq!(a.len(), 20);
    assert_eq!(a, run(greedy));
    let slow = anetrain::eval::greedy_slow(&cfg, &p, &[1, 2, 3], 20, par).unwrap();
    assert_eq!(a, slow, "KV-cache greedy differs from full recomputation");
    let hot = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3 };
    assert_eq!(run(hot), run(hot), "seeded sampling must repeat");
    // top-k = 1 is greedy whatever the temperature.
    assert_eq!(run(Sampling { temperature: 2.0, top_k: 1, top_p: 1.0, seed: 9 }), a);
    // Sampling only ever returns tokens inside the kept set.
    let mut rng = Rng::new(4);
    let mut order = Vec::new();
    for _ in 0..200 {
        let mut logits = vec![0.0, 5.0, 4.9, -3.0, 1.0];
        let t =
            sample(&mut logits, &Sampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 }, &mut rng, &mut order);
        assert!(t == 1 || t == 2, "{t}");
    }
}

/// Top-p keeps the most probable tokens until their mass reaches p (at least one) and samples
/// among them in proportion to their probabilities.
#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let probs = [0.05f32, 0.5, 0.15, 0.3]; // sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() + 2.0).collect();
    let counts = |top_p: f32, top_k: usize| {
        let (mut rng, mut order, mut counts) = (Rng::new(11), Vec::new(), [0usize; 4]);
        let s = Sampling { temperature: 1.0, top_k, top_p, seed: 0 };
        for _ in 0..4000 {
            counts[sample(&mut logits.clone(), &s, &mut rng, &mut order) as usize] += 1;
        }
        counts.map(|c| c as f64 / 4000.0)
    };
    let near = |got: [f64; 4], want: [f64; 4]| {
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 0.03), "frequencies {got:?}, expected {want:?}")
    };
    // 0.5 < 0.7 <= 0.5 + 0.3: the two most probable, renormalised to 5/8 and 3/8.
    near(counts(0.7, 0), [0.0, 0.625, 0.0, 0.375]);
    // 0.8 < 0.9 <= 0.95: three tokens.
    near(counts(0.9, 0), [0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]);
    // Below the top token's own mass: that token alone.
    assert_eq!(counts(0.3, 0), [0.0, 1.0, 0.0, 0.0]);
    // top-k cuts first: k = 2 with p = 0.99 keeps two.
    near(counts(0.99, 2), [0.0, 0.625, 0.0, 0.375]);
    // p = 1 keeps everything.
    near(counts(1.0, 0), [0.05, 0.5, 0.15, 0.3]);
}

/// Continuous batching's correctness: decoding several sequences in one batched forward gives
/// every sequence the bit-identical logits it gets alone, and so do several new tokens of one
/// sequence in one call (a chat turn's prefill) against one token at a time.
#[test]
fn batched_decoding_is_bit_identical_to_one_sequence_at_a_time() {
    use anetrain::generate::{BatchDecoder, KvCache, Row, prefill};
    let base = ModelConfig::preset("stories260k").unwrap();
    let cfg = ModelConfig { n_layers: 2, qk_norm: true, tied_embeddings: false, head_dim: 12, ..base };
    let p = params(&cfg, 9);
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let v = cfg.vocab_size;
    let prompts: [Vec<u32>; 3] = [vec![1, 5, 9], vec![7, 3, 3, 8, 2, 60, 11], vec![4]];
    let steps = 6;
    pool.install(|| {
        // Alone: each sequence's logits after its prompt and after each fed token.
        let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
        let mut fed: Vec<Vec<u32>> = Vec::new();
        for prompt in &prompts {
            let mut d = Decoder::new(&cfg, &p, 32).unwrap();
            d.prefill(&mut Model::cpu(&cfg, 1, prompt.len(), par).unwrap(), prompt).unwrap();
            let (mut logits, mut tokens) = (vec![d.logits.clone()], Vec::new());
            for s in 0..steps {
                let next = (prompt[0] as usize * 31 + s * 17) as u32 % v as u32;
                d.step(next).unwrap();
                tokens.push(next);
                logits.push(d.logits.clone());
            }
            alone.push(logits);
            fed.push(tokens);
        }
        // Batched: the same prefills, then one forward per step over all three sequences.
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(&cfg, 32).unwrap()).collect();
        for (i, prompt) in prompts.iter().enumerate() {
            let mut first = vec![0.0; v];
            let mut m = Model::cpu(&cfg, 1, prompt.len(), par).unwrap();
            prefill(&mut m, &p, &mut caches[i], prompt, &mut first).unwrap();
            assert_eq!(first, alone[i][0]);
        }
        let mut batch = BatchDecoder::new(&cfg, &p, 32, 4).unwrap();
        for s in 0..steps {
            let rows: Vec<Row> = (0..3).map(|i| Row { seq: i, token: fed[i][s], pos: prompts[i].len() + s }).collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let logits = batch.forward(&mut refs, &rows).unwrap();
            for i in 0..3 {
                assert!(logits[i * v..(i + 1) * v] == alone[i][s + 1][..], "sequence {i} step {s} differs batched");
            }
        }
        // One sequence: its prompt and fed tokens as rows of one call (positions 0..n).
        let all: Vec<u32> = prompts[1].iter().chain(&fed[1]).copied().collect();
        let mut cache = KvCache::new(&cfg, 32).unwrap();
        let rows: Vec<Row> = all.iter().enumerate().map(|(pos, &token)| Row { seq: 0, token, pos }).collect();
        let mut wide = BatchDecoder::new(&cfg, &p, 32, rows.len()).unwrap();
        let logits = wide.forward(&mut [&mut cache], &rows).unwrap();
        let mut one = BatchDecoder::new(&cfg, &p, 32, 1).unwrap();
        let mut cache1 = KvCache::new(&cfg, 32).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let l = one.forward(&mut [&mut cache1], &[*row]).unwrap();
            assert!(l == &logits[i * v..(i + 1) * v], "position {i} differs between one call and one at a time");
        }
        // And it agrees with the prefill path (a GEMM: not bit-identical, within rounding).
        let last = &logits[(rows.len() - 1) * v..];
        let want = alone[1].last().unwrap();
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = last.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-5 * scale, "row path vs prefill path: {err:e} of {scale}");
        assert_eq!(cache.pos, all.len());
    });
}

/// The decoding team (2 and 3 threads) gives the bits of one thread (no team), for one
/// sequence step by step and for a batch of rows: a reply does not depend on `--threads`.
#[test]
fn decoding_is_bit_identical_across_thread_counts() {
    use anetrain::generate::{BatchDecoder, KvCache, Row};
    let base = ModelConfig::preset("stories260k").unwrap();
    let cfg = ModelConfig { n_layers: 2, qk_norm: true, tied_embeddings: false, head_dim: 12, ..base };
    let p = params(&cfg, 11);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % cfg.vocab_size as u32).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut one = BatchDecoder::new(&cfg, &p, 32, 1).unwrap();
            let mut cache = KvCache::new(&cfg, 32).unwrap();
            let mut out = Vec::new();
            for (pos, &token) in tokens.iter().enumerate() {
                out.extend_from_slice(one.forward(&mut [&mut cache], &[Row { seq: 0, token, pos }]).unwrap());
            }
            let mut wide = BatchDecoder::new(&cfg, &p, 32, tokens.len()).unwrap();
            let mut cache = KvCache::new(&cfg, 32).unwrap();
            let rows: Vec<Row> = tokens.iter().enumerate().map(|(pos, &token)| Row { seq: 0, token, pos }).collect();
            out.extend_from_slice(wide.forward(&mut [&mut cache], &rows).unwrap());
            out.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        })
    };
    let want = run(1);
    for threads in [2, 3] {
        assert!(run(threads) == want, "{threads} threads differ from one");
    }
}
