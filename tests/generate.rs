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
        generate(&cfg, &p, &[1, 2, 3], 20, s, None, par, |t| out.push(t)).unwrap();
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
