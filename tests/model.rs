//! Whole-model checks: the fast f32 model against the f64 reference model (loss, and every
//! tensor's gradient by central differences), overfitting one batch, and determinism.

use anetrain::backend::cpu::CpuBackend;
use anetrain::config::ModelConfig;
use anetrain::data::TokenData;
use anetrain::model::Model;
use anetrain::ops::cross_entropy::IGNORE;
use anetrain::ops::{GemmImpl, Par};
use anetrain::params::TensorKind;
use anetrain::reference::loss_slow;
use anetrain::rng::Rng;
use anetrain::telemetry::Telemetry;
use anetrain::train::adamw::AdamWConfig;
use anetrain::train::loss_scale::LossScaleMode;
use anetrain::train::{TrainOptions, Trainer};

fn tiny(name: &str) -> ModelConfig {
    let base = ModelConfig::preset("stories260k").unwrap();
    match name {
        // MHA, tied classifier, head_dim = dim / heads.
        "mha-tied" => ModelConfig {
            dim: 16,
            ffn_dim: 24,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 4,
            vocab_size: 11,
            ..base
        },
        // GQA 4/2, QK-norm, untied classifier, head_dim 6 ≠ 12 / 4, Qwen3's θ and eps.
        "gqa-qknorm-untied" => ModelConfig {
            dim: 12,
            ffn_dim: 20,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 6,
            vocab_size: 13,
            rope_theta: 1e6,
            norm_eps: 1e-6,
            qk_norm: true,
            tied_embeddings: false,
            ..base
        },
        // GQA 6/2 without QK-norm, tied, head_dim 8 ≠ 18 / 6... with an odd vocabulary.
        "gqa-tied" => ModelConfig {
            dim: 18,
            ffn_dim: 14,
            n_layers: 1,
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 8,
            vocab_size: 17,
            ..base
        },
        // Qwen2: q/k/v biases, GQA, untied.
        "qwen2-bias" => ModelConfig { qkv_bias: true, tied_embeddings: false, norm_eps: 1e-6, ..tiny("gqa-tied") },
        // Llama 3 RoPE scaling: at D=4 the wavelengths 6.3 and 628 fall in the interpolated and
        // the slowed band (the kept band is covered by the op test).
        "llama3-scaled" => ModelConfig {
            rope_scaling: Some(anetrain::config::RopeScaling::Llama3(anetrain::config::Llama3Scaling {
                factor: 4.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16,
            })),
            ..tiny("mha-tied")
        },
        // Linear RoPE scaling (position interpolation), GQA.
        "linear-scaled" => ModelConfig {
            rope_scaling: Some(anetrain::config::RopeScaling::Linear { factor: 2.5 }),
            ..tiny("gqa-tied")
        },
        _ => unreachable!(),
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// Parameters far enough from init that every nonlinearity is exercised: matrices at std
/// 0.3, norm gains 1 ± 0.3.
fn rough_params(model: &Model, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut p = model.layout.init(seed);
    for t in &model.layout.tensors {
        for x in &mut p[t.range()] {
            *x = match t.kind {
                TensorKind::Norm => 1.0 + 0.3 * rng.normal() as f32,
                _ => 0.3 * rng.normal() as f32,
            };
        }
    }
    p
}

#[test]
fn gradients_match_finite_differences_of_f64_reference() {
    for name in ["mha-tied", "gqa-qknorm-untied", "gqa-tied", "qwen2-bias", "llama3-scaled", "linear-scaled"] {
        let cfg = tiny(name);
        let (b, t) = (2, 5);
        let par = Par { threads: 2, gemm: GemmImpl::Gemm };
        let mut model = Model::cpu(&cfg, b, t, par).unwrap();
        let params = rough_params(&model, 7);
        let mut rng = Rng::new(3);
        let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
        let mut targets: Vec<u32> = (0..b * t).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
        targets[3] = IGNORE;
        targets[7] = IGNORE;

        let mut grads = vec![0.0; params.len()];
        let loss = pool(2).install(|| model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 1)).unwrap();
        assert_eq!(loss.count, b * t - 2);
        let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
        let reference = loss_slow(&cfg, &p64, &tokens, &targets, b, t);
        assert!(
            (loss.mean() - reference).abs() <= 1e-5 * reference,
            "{name}: loss {} vs reference {reference}",
            loss.mean()
        );

        assert_gradients_match_reference(name, &cfg, &model, &params, &grads, &tokens, &targets, b, t);
    }
}

/// Every tensor's gradient (up to 6 coordinates each, always its largest) against central
/// differences of the f64 reference loss.
#[allow(clippy::too_many_arguments)]
fn assert_gradients_match_reference(
    name: &str,
    cfg: &ModelConfig,
    model: &Model,
    params: &[f32],
    grads: &[f32],
    tokens: &[u32],
    targets: &[u32],
    b: usize,
    t: usize,
) {
    let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let global = grads.iter().fold(0.0f64, |m, g| m.max(g.abs() as f64));
    for tensor in &model.layout.tensors {
        let range = tensor.range();
        // Up to 6 coordinates per tensor, spread over it; always the largest gradient.
        let argmax = range.clone().max_by(|&i, &j| grads[i].abs().total_cmp(&grads[j].abs())).unwrap();
        let step = tensor.len().div_ceil(5);
        let picks = range.clone().step_by(step).chain([argmax]);
        for i in picks {
            let mut p = p64.clone();
            let h = 1e-5;
            p[i] += h;
            let up = loss_slow(cfg, &p, tokens, targets, b, t);
            p[i] -= 2.0 * h;
            let down = loss_slow(cfg, &p, tokens, targets, b, t);
            let numeric = (up - down) / (2.0 * h);
            let err = (grads[i] as f64 - numeric).abs();
            // f32 forward/backward vs exact f64: ~1e-6 of the model's largest gradient.
            assert!(
                err <= 2e-5 * global + 1e-4 * numeric.abs(),
                "{name}: {}[{}] analytic {} vs numeric {numeric} (err {err:.2e}, largest grad {global:.2e})",
                tensor.name,
                i - range.start,
                grads[i]
            );
        }
    }
}

/// Chat data's loss mask reaches the loss: the sampler turns masked targets into IGNORE, they
/// add nothing to the loss, and the gradient is the f64 reference's for the unmasked targets
/// alone (a target's id behind the mask changes nothing).
#[test]
fn masked_targets_add_nothing_to_loss_or_gradient() {
    let cfg = tiny("gqa-qknorm-untied");
    let (b, t) = (2, 7);
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let mut model = Model::cpu(&cfg, b, t, par).unwrap();
    let params = rough_params(&model, 11);
    let mut rng = Rng::new(5);
    let ids: Vec<u32> = (0..200).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
    // Alternating runs of context (0) and reply (1) tokens, as a conversation makes.
    let mask: Vec<u8> = (0..200).map(|i| (i / 4 % 2) as u8).collect();
    let data = TokenData::from_vec_masked(ids.clone(), Some(mask.clone()), cfg.vocab_size, "chat").unwrap();
    let mut sampler = anetrain::data::Sampler::new(3, b, t);
    let (mut tokens, mut targets) = (vec![0; b * t], vec![0; b * t]);
    sampler.next_batch(&data, &mut tokens, &mut targets).unwrap();
    let masked = targets.iter().filter(|&&x| x == IGNORE).count();
    assert!(masked > 0 && masked < b * t, "{masked} of {} targets masked", b * t);
    let mut grads = vec![0.0; params.len()];
    let loss = pool(2).install(|| model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 1)).unwrap();
    assert_eq!(loss.count, b * t - masked);
    let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let reference = loss_slow(&cfg, &p64, &tokens, &targets, b, t);
    assert!((loss.mean() - reference).abs() <= 1e-5 * reference, "loss {} vs {reference}", loss.mean());
    assert_gradients_match_reference("masked", &cfg, &model, &params, &grads, &tokens, &targets, b, t);
    // The same windows unmasked give another gradient: the mask is what removed those terms.
    let same: Vec<u8> = vec![1; 200];
    let unmasked = TokenData::from_vec_masked(ids, Some(same), cfg.vocab_size, "all").unwrap();
    let mut again = anetrain::data::Sampler::new(3, b, t);
    let (mut tokens2, mut targets2) = (vec![0; b * t], vec![0; b * t]);
    again.next_batch(&unmasked, &mut tokens2, &mut targets2).unwrap();
    assert_eq!(tokens2, tokens, "the same seed draws the same windows");
    let mut grads2 = vec![0.0; params.len()];
    pool(2).install(|| model.forward_backward(&params, &mut grads2, &tokens2, &targets2, 1.0, 1)).unwrap();
    assert_ne!(grads, grads2);
}

fn options(steps: usize, b: usize, t: usize, lr: f64, seed: u64) -> TrainOptions {
    TrainOptions {
        steps,
        batch: b,
        seq: t,
        accum: 1,
        schedule_lr: lr,
        min_lr: lr,
        warmup: 0,
        adamw: AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() },
        grad_clip: 1.0,
        loss_scale: LossScaleMode::Off,
        eval_every: 0,
        eval_tokens: 0,
        seed,
        lora: None,
        base_bf16: false,
        exact_accum: false,
    }
}

fn synthetic(cfg: &ModelConfig, seed: u64) -> TokenData {
    TokenData::from_vec(anetrain::data::synthetic_tokens(cfg.vocab_size, 5000, seed), cfg.vocab_size, "synthetic")
        .unwrap()
}

/// A trainer on the `cpu` backend; call inside a pool of `threads` threads.
fn cpu_trainer(cfg: &ModelConfig, opts: TrainOptions, threads: usize) -> Trainer {
    let par = Par { threads, gemm: GemmImpl::Gemm };
    let (b, t) = (opts.batch, opts.seq);
    Trainer::new(cfg, opts, par, Box::new(CpuBackend::new(cfg, b, t, par))).unwrap()
}

#[test]
fn overfits_one_fixed_batch() {
    let cfg = ModelConfig { vocab_size: 64, n_layers: 2, ..tiny("gqa-qknorm-untied") };
    let (b, t) = (2, 16);
    let mut rng = Rng::new(99);
    // Exactly T+1 tokens: every window the sampler draws is the same batch.
    let data = TokenData::from_vec((0..=t).map(|_| rng.below(64) as u32).collect(), 64, "fixed").unwrap();
    let losses = pool(2).install(|| {
        let mut trainer = cpu_trainer(&cfg, options(300, b, t, 1e-2, 5), 2);
        trainer.run(&data, &mut Telemetry::none(), None, |_| {}).unwrap().losses
    });
    let ln_v = (64f64).ln();
    assert!((losses[0] - ln_v).abs() < 0.1, "initial loss {} should be ≈ ln(V) = {ln_v}", losses[0]);
    let last = *losses.last().unwrap();
    assert!(last < 0.05, "loss after 300 updates on one batch: {last}");
}

/// `step_on_rows` (the C ABI's update) on the windows `step` samples — replayed by a sampler
/// with the trainer's seed — makes bit-identical updates, micro-batches included, and
/// refuses rows of the wrong length or with ids outside the vocabulary.
#[test]
fn step_on_rows_equals_step_on_the_same_windows() {
    let cfg = ModelConfig { vocab_size: 64, n_layers: 2, ..tiny("gqa-qknorm-untied") };
    let (b, t) = (2, 8);
    let data = synthetic(&cfg, 5);
    let opts = TrainOptions { accum: 2, ..options(3, b, t, 1e-3, 7) };
    pool(1).install(|| {
        let mut sampled = cpu_trainer(&cfg, opts.clone(), 1);
        let mut given = cpu_trainer(&cfg, opts.clone(), 1);
        let mut replay = anetrain::data::Sampler::new(opts.seed, b, t);
        for step in 0..3 {
            let a = sampled.step(&data, step).unwrap();
            let mut rows = Vec::new();
            for _ in 0..opts.accum {
                let (mut toks, mut tgts) = (vec![0; b * t], vec![0; b * t]);
                replay.next_batch(&data, &mut toks, &mut tgts).unwrap();
                for r in 0..b {
                    rows.extend_from_slice(&toks[r * t..(r + 1) * t]);
                    rows.push(tgts[(r + 1) * t - 1]);
                }
            }
            let g = given.step_on_rows(&rows, step).unwrap();
            assert_eq!(a.loss.to_bits(), g.loss.to_bits(), "update {step}");
        }
        assert!(sampled.params == given.params, "the weights differ after 3 updates");
        let e = given.step_on_rows(&[1, 2, 3], 3).unwrap_err().to_string();
        assert!(e.contains("an update takes 36 tokens"), "{e}");
        let mut rows = vec![1u32; 36];
        rows[5] = 64;
        let e = given.step_on_rows(&rows, 3).unwrap_err().to_string();
        assert!(e.contains("outside the model's vocabulary"), "{e}");
    });
}

#[test]
fn same_seed_gives_bit_identical_runs_on_one_or_two_threads() {
    let cfg = tiny("gqa-qknorm-untied");
    let (b, t) = (3, 8);
    let data = synthetic(&cfg, 1);
    let run = |threads: usize, seed: u64| {
        pool(threads).install(|| {
            let mut opts = options(20, b, t, 3e-3, seed);
            opts.accum = 2;
            opts.adamw.weight_decay = 0.1;
            let mut trainer = cpu_trainer(&cfg, opts, threads);
            let losses = trainer.run(&data, &mut Telemetry::none(), None, |_| {}).unwrap().losses;
            (losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), trainer.params.clone())
        })
    };
    let (a, pa) = run(2, 11);
    let (b2, pb) = run(2, 11);
    assert_eq!(a, b2, "losses differ between identical runs");
    assert!(pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()), "weights differ");
    let (c, _) = run(2, 12);
    assert_ne!(a, c, "a different seed must give a different run");
    // Every reduction has a fixed order that does not depend on the thread count, so one
    // thread gives the same bits as two.
    let (one, p1) = run(1, 11);
    assert_eq!(one, a, "1-thread losses differ from the 2-thread run");
    assert!(p1.iter().zip(&pa).all(|(x, y)| x.to_bits() == y.to_bits()), "1-thread weights differ");
}

#[test]
fn injected_nonfinite_gradient_skips_exactly_that_update_and_halves_the_scale() {
    let cfg = tiny("gqa-qknorm-untied");
    let (b, t) = (2, 8);
    let data = synthetic(&cfg, 2);
    pool(2).install(|| {
        let mut opts = options(10, b, t, 3e-3, 8);
        opts.loss_scale = LossScaleMode::Dynamic;
        let mut trainer = cpu_trainer(&cfg, opts, 2);
        trainer.inject_nonfinite_at = Some(4);
        let mut events = Vec::new();
        let mut before_skip = Vec::new();
        for step in 0..10 {
            if step == 4 {
                before_skip = trainer.params.clone();
            }
            events.push(trainer.step(&data, step).unwrap());
            if step == 4 {
                assert!(trainer.params == before_skip, "the skipped update changed the weights");
                assert_eq!(trainer.opt.step, 4, "the skipped update advanced AdamW");
            }
        }
        for (i, ev) in events.iter().enumerate() {
            assert_eq!(ev.skipped, i == 4, "update {i}");
            assert!(ev.loss.is_finite(), "update {i} loss {}", ev.loss);
            let want_scale = if i <= 4 { 65536.0 } else { 32768.0 };
            assert_eq!(ev.loss_scale, want_scale, "update {i}");
        }
        assert!(events[9].loss < events[0].loss, "training did not continue after the skip");
    });
}

/// Random tokens and targets for one micro-batch, with two ignored targets.
fn random_batch(rng: &mut Rng, vocab: usize, n: usize) -> (Vec<u32>, Vec<u32>) {
    let tokens = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
    let mut targets: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
    targets[1] = IGNORE;
    targets[n - 2] = IGNORE;
    (tokens, targets)
}

/// The first tensor whose gradient bits differ between `a` and `b`, by name.
fn first_differing_tensor(model: &Model, a: &[f32], b: &[f32]) -> Option<String> {
    model
        .layout
        .tensors
        .iter()
        .find(|t| a[t.range()].iter().zip(&b[t.range()]).any(|(x, y)| x.to_bits() != y.to_bits()))
        .map(|t| t.name.clone())
}

/// Two updates of `accum` micro-batches each (gradients accumulate within an update and are
/// zeroed between), one model with dW overlap forced on, one inline: every loss and every
/// gradient bit must agree after every micro-batch. Four layers give 8 dW jobs per backward
/// against 2 slots, so slots are reused and the main thread does wait for the worker.
fn assert_dw_overlap_bit_identical(cfg: &ModelConfig) {
    let (b, t, accum) = (2, 9, 3);
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    pool(2).install(|| {
        let mut on = Model::cpu(cfg, b, t, par).unwrap();
        let mut off = Model::cpu(cfg, b, t, par).unwrap();
        assert!(!on.dw_overlap(), "the cpu backend should default to inline dW");
        on.set_dw_overlap(true).unwrap();
        assert!(on.dw_overlap());
        let params = rough_params(&on, 21);
        let (mut g_on, mut g_off) = (vec![0.0f32; params.len()], vec![0.0f32; params.len()]);
        let mut rng = Rng::new(5);
        for micro in 0..2 * accum {
            if micro % accum == 0 {
                g_on.fill(0.0);
                g_off.fill(0.0);
            }
            let (tokens, targets) = random_batch(&mut rng, cfg.vocab_size, b * t);
            let l_on = on.forward_backward(&params, &mut g_on, &tokens, &targets, 1024.0, accum).unwrap();
            let l_off = off.forward_backward(&params, &mut g_off, &tokens, &targets, 1024.0, accum).unwrap();
            assert_eq!(
                (l_on.sum.to_bits(), l_on.count),
                (l_off.sum.to_bits(), l_off.count),
                "micro-batch {micro}: loss"
            );
            assert_eq!(first_differing_tensor(&on, &g_on, &g_off), None, "micro-batch {micro}: gradients differ");
            assert!(g_on.iter().all(|g| g.is_finite()) && g_on.iter().any(|&g| g != 0.0));
        }
        // Switching off again goes back to the inline path, still the same bits.
        on.set_dw_overlap(false).unwrap();
        let (tokens, targets) = random_batch(&mut rng, cfg.vocab_size, b * t);
        on.forward_backward(&params, &mut g_on, &tokens, &targets, 1.0, 1).unwrap();
        off.forward_backward(&params, &mut g_off, &tokens, &targets, 1.0, 1).unwrap();
        assert_eq!(first_differing_tensor(&on, &g_on, &g_off), None, "after switching overlap off");
    });
}

#[test]
fn dw_overlap_is_bit_identical_mha_tied() {
    assert_dw_overlap_bit_identical(&ModelConfig { n_layers: 4, ..tiny("mha-tied") });
}

#[test]
fn dw_overlap_is_bit_identical_gqa_qknorm_untied() {
    assert_dw_overlap_bit_identical(&ModelConfig { n_layers: 4, ..tiny("gqa-qknorm-untied") });
}

#[test]
fn phase_times_split_kernels_dw_and_wait() {
    let cfg = ModelConfig { n_layers: 3, ..tiny("gqa-qknorm-untied") };
    let (b, t) = (2, 16);
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    pool(2).install(|| {
        let mut model = Model::cpu(&cfg, b, t, par).unwrap();
        let params = rough_params(&model, 4);
        let mut grads = vec![0.0; params.len()];
        let (tokens, targets) = random_batch(&mut Rng::new(9), cfg.vocab_size, b * t);
        for overlap in [false, true] {
            model.set_dw_overlap(overlap).unwrap();
            model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 1).unwrap();
            let tm = model.times;
            let all = [tm.forward_ms, tm.backward_ms, tm.kernel_ms, tm.dw_ms, tm.dw_wait_ms];
            assert!(all.iter().all(|x| x.is_finite() && *x >= 0.0), "overlap {overlap}: {tm:?}");
            assert!(tm.forward_ms > 0.0 && tm.backward_ms > 0.0 && tm.kernel_ms > 0.0, "overlap {overlap}: {tm:?}");
            assert!(tm.dw_ms > 0.0, "overlap {overlap}: no dW time after a backward: {tm:?}");
            // Kernel calls and waits are disjoint stretches of the main thread's forward + backward.
            assert!(tm.kernel_ms + tm.dw_wait_ms <= tm.forward_ms + tm.backward_ms, "overlap {overlap}: {tm:?}");
            if !overlap {
                assert_eq!(tm.dw_wait_ms, 0.0, "inline dW cannot wait: {tm:?}");
                assert!(tm.kernel_ms + tm.dw_ms <= tm.forward_ms + tm.backward_ms, "inline: {tm:?}");
            }
        }
        model.forward(&params, &tokens, &targets).unwrap();
        let tm = model.times;
        assert!(tm.forward_ms > 0.0 && tm.kernel_ms > 0.0 && tm.kernel_ms <= tm.forward_ms, "forward: {tm:?}");
        assert_eq!((tm.backward_ms, tm.dw_ms, tm.dw_wait_ms), (0.0, 0.0, 0.0), "forward only: {tm:?}");
    });
}

#[test]
fn trainer_with_dw_overlap_matches_inline_and_reports_times() {
    let cfg = ModelConfig { n_layers: 3, ..tiny("gqa-qknorm-untied") };
    let data = synthetic(&cfg, 3);
    let run = |overlap: bool| {
        pool(2).install(|| {
            let mut opts = options(6, 2, 8, 3e-3, 13);
            opts.accum = 2;
            opts.loss_scale = LossScaleMode::Dynamic;
            let mut trainer = cpu_trainer(&cfg, opts, 2);
            trainer.model.set_dw_overlap(overlap).unwrap();
            let events: Vec<_> = (0..6).map(|step| trainer.step(&data, step).unwrap()).collect();
            (events, trainer.params.clone())
        })
    };
    let (ev_on, p_on) = run(true);
    let (ev_off, p_off) = run(false);
    let losses = |ev: &[anetrain::telemetry::StepEvent]| ev.iter().map(|e| e.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&ev_on), losses(&ev_off), "losses differ with dW overlap");
    assert!(p_on.iter().zip(&p_off).all(|(x, y)| x.to_bits() == y.to_bits()), "weights differ with dW overlap");
    for (on, off) in ev_on.iter().zip(&ev_off) {
        assert!(on.ms_kernels > 0.0 && on.ms_dw > 0.0 && on.ms_dw_wait >= 0.0, "{on:?}");
        assert!(off.ms_kernels > 0.0 && off.ms_dw > 0.0 && off.ms_dw_wait == 0.0, "{off:?}");
    }
}

/// The gradient-ready hook (data-parallel training's per-layer buckets) reports every tensor
/// of every layer exactly once per micro-batch, with the final values, with the dW GEMMs
/// inline and on the worker, for every layer shape (QK-norm, q/k/v biases).
#[test]
fn grad_ready_reports_each_layer_tensor_once_with_its_final_values() {
    use std::sync::{Arc, Mutex};
    /// (arena offset, values) of each report
    type Reports = Mutex<Vec<(usize, Vec<f32>)>>;
    for name in ["mha-tied", "gqa-qknorm-untied", "qwen2-bias"] {
        let cfg = ModelConfig { n_layers: 3, ..tiny(name) };
        let (b, t) = (2, 8);
        let par = Par { threads: 2, gemm: GemmImpl::Gemm };
        pool(2).install(|| {
            for overlap in [false, true] {
                let mut model = Model::cpu(&cfg, b, t, par).unwrap();
                model.set_dw_overlap(overlap).unwrap();
                let seen: Arc<Reports> = Arc::default();
                let sink = seen.clone();
                model.set_grad_ready(Some(Arc::new(move |at, values: &[f32]| {
                    sink.lock().unwrap().push((at, values.to_vec()));
                })));
                let params = rough_params(&model, 3);
                let mut grads = vec![0.0f32; params.len()];
                let (tokens, targets) = random_batch(&mut Rng::new(9), cfg.vocab_size, b * t);
                model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 1).unwrap();
                let mut covered = vec![0u8; params.len()];
                for (at, values) in seen.lock().unwrap().iter() {
                    covered[*at..at + values.len()].iter_mut().for_each(|c| *c += 1);
                    assert!(values == &grads[*at..at + values.len()], "{name}: a reported tensor changed afterwards");
                }
                for l in 0..cfg.n_layers {
                    let range = model.layout.layer_range(l);
                    assert!(covered[range].iter().all(|&c| c == 1), "{name}, overlap {overlap}: layer {l}");
                }
                let layers = model.layout.layer_range(0).start..model.layout.layer_range(cfg.n_layers - 1).end;
                assert_eq!(
                    covered.iter().map(|&c| c as usize).sum::<usize>(),
                    layers.len(),
                    "{name}: outside the layers"
                );
            }
        });
    }
}
