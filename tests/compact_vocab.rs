//! `--compact-vocab`: the classifier and loss over the ids that occur in the data. Checked
//! against the reference it must equal: a model whose vocabulary *is* that subset (its
//! embedding and classifier rows gathered), on the `cpu` and `mil-sim` backends; rows
//! outside the subset get no gradient and stay bit-for-bit untouched by training.

use anetrain::config::ModelConfig;
use anetrain::data::TokenData;
use anetrain::mil::backend::MilBackend;
use anetrain::mil::emit::InputLayout;
use anetrain::mil::sim::SimRunner;
use anetrain::model::Model;
use anetrain::ops::{GemmImpl, Par};
use anetrain::params::ParamLayout;
use anetrain::train::{TrainOptions, Trainer};

const V: usize = 64;
/// The subset: 16 scattered ids, ascending.
const S: [u32; 16] = [0, 3, 4, 5, 9, 17, 18, 22, 30, 31, 40, 41, 50, 57, 62, 63];

fn cfg(v: usize, tied: bool) -> ModelConfig {
    ModelConfig { n_layers: 2, vocab_size: v, tied_embeddings: tied, ..ModelConfig::preset("stories260k").unwrap() }
}

/// `params` of the full model with embedding and classifier reduced to the rows of `S`.
fn gathered(full: &ModelConfig, params: &[f32], small: &ModelConfig) -> Vec<f32> {
    let (lf, ls) = (ParamLayout::new(full), ParamLayout::new(small));
    let mut out = vec![0.0; ls.total];
    let c = full.dim;
    for t in &ls.tensors {
        let src = lf.tensors.iter().find(|f| f.name == t.name).unwrap();
        let src = &params[src.offset..src.offset + src.len()];
        let dst = &mut out[t.offset..t.offset + t.len()];
        if t.shape.first() == Some(&S.len()) && t.shape.len() == 2 && t.shape[1] == c {
            for (k, &id) in S.iter().enumerate() {
                dst[k * c..(k + 1) * c].copy_from_slice(&src[id as usize * c..(id as usize + 1) * c]);
            }
        } else {
            dst.copy_from_slice(src);
        }
    }
    out
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / scale.max(1e-30)
}

/// Loss and every gradient of the compacted full model equal the small model's (rows of
/// `S`), and the other rows' gradients are exactly zero. On `mil-sim`, the chunked
/// classifier kernel runs over the compact rows.
#[test]
fn gradient_equals_a_model_over_the_subset() {
    let (b, t) = (2, 16);
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let mut rng = anetrain::rng::Rng::new(5);
    let ids: Vec<u32> = (0..b * (t + 1)).map(|_| S[rng.below(S.len() as u64) as usize]).collect();
    let (tokens, targets): (Vec<u32>, Vec<u32>) = (0..b * t).map(|i| (ids[i], ids[i + 1])).unzip();
    let compact = |x: &u32| S.iter().position(|s| s == x).unwrap() as u32;
    let (small_tokens, small_targets): (Vec<u32>, Vec<u32>) =
        (tokens.iter().map(compact).collect(), targets.iter().map(compact).collect());
    for (tied, backend) in [(false, "cpu"), (true, "cpu"), (false, "mil-sim")] {
        let (full, small) = (cfg(V, tied), cfg(S.len(), tied));
        let make = |c: &ModelConfig| -> Model {
            if backend == "cpu" {
                Model::cpu(c, b, t, par).unwrap()
            } else {
                let sim = Box::new(SimRunner::new(par));
                Model::new(c, b, t, par, Box::new(MilBackend::new(c, b, t, InputLayout::Separate, sim).unwrap()))
                    .unwrap()
            }
        };
        let layout = ParamLayout::new(&full);
        let params = layout.init(3);
        let mut model = make(&full);
        model.set_compact_vocab(Some(S.to_vec())).unwrap();
        let mut grads = vec![0.0; layout.total];
        let got = model.forward_backward(&params, &mut grads, &tokens, &targets, 1.0, 1).unwrap();

        let sp = gathered(&full, &params, &small);
        let mut reference = make(&small);
        let mut want_grads = vec![0.0; sp.len()];
        let want = reference.forward_backward(&sp, &mut want_grads, &small_tokens, &small_targets, 1.0, 1).unwrap();
        let what = format!("tied {tied}, {backend}");
        assert!(
            (got.mean() - want.mean()).abs() < 1e-6 * want.mean(),
            "{what}: loss {} vs {}",
            got.mean(),
            want.mean()
        );
        assert!(rel(&gathered(&full, &grads, &small), &want_grads) < 1e-4, "{what}: gradients differ");
        // Rows outside S: exactly zero gradient, in the embedding and the classifier.
        let c = full.dim;
        for tensor in [layout.embed, layout.classifier()] {
            let g = &grads[layout.tensors[tensor].offset..][..V * c];
            for id in (0..V as u32).filter(|i| !S.contains(i)) {
                assert!(g[id as usize * c..(id as usize + 1) * c].iter().all(|&x| x == 0.0), "{what}: row {id}");
            }
        }
        // The subset of every id is the full model, bit for bit.
        let mut whole = make(&full);
        let plain = whole.forward(&params, &tokens, &targets).unwrap();
        whole.set_compact_vocab(Some((0..V as u32).collect())).unwrap();
        assert_eq!(whole.forward(&params, &tokens, &targets).unwrap().sum.to_bits(), plain.sum.to_bits(), "{what}");
        // A target outside the subset is refused with a sentence.
        let mut bad = targets.clone();
        bad[0] = 1;
        let err = model.forward(&params, &tokens, &bad).unwrap_err().to_string();
        assert!(err.contains("target id 1 is not in the compacted vocabulary"), "{err}");
    }
}

/// Training with compaction (weight decay on) leaves every embedding/classifier row outside
/// the subset bit-identical to its initial value, changes the rows inside it, and learns.
#[test]
fn rows_outside_the_subset_stay_untouched() {
    let full = cfg(V, true);
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let mut rng = anetrain::rng::Rng::new(8);
    let tokens: Vec<u32> = (0..4000).map(|i| S[(i * 7 + rng.below(3) as usize) % S.len()]).collect();
    let data = TokenData::from_vec(tokens, V, "subset").unwrap();
    let ids = anetrain::compact::occurring_ids(V, &[&data]).unwrap();
    assert_eq!(ids, S);
    let opts = TrainOptions { schedule_lr: 1e-2, min_lr: 1e-3, ..TrainOptions::new(15, 2, 16) };
    assert!(opts.adamw.weight_decay > 0.0);
    let mut trainer =
        Trainer::new(&full, opts, par, Box::new(anetrain::backend::cpu::CpuBackend::new(&full, 2, 16, par))).unwrap();
    trainer.set_compact_vocab(ids).unwrap();
    let before = trainer.params.clone();
    let losses: Vec<f64> = (0..15).map(|s| trainer.step(&data, s).unwrap().loss).collect();
    // The loss starts near ln 16 (the subset softmax), not ln 64.
    assert!(
        losses[0] < 3.0 && losses[12..].iter().sum::<f64>() < losses[..3].iter().sum::<f64>() - 0.3,
        "learns: {losses:?}"
    );
    let layout = &trainer.model.layout;
    let (c, at) = (full.dim, layout.tensors[layout.embed].offset);
    for id in 0..V {
        let row = at + id * c..at + (id + 1) * c;
        let same = trainer.params[row.clone()] == before[row];
        assert_eq!(same, !S.contains(&(id as u32)), "row {id}");
    }
}
