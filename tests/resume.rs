//! Checkpoints: train 2N updates in one run, or N, save, load into a fresh trainer, N more —
//! the losses and the final weights must be bit-identical. Resuming with another model or
//! other token data is refused with a message that says what differs.

use anetrain::backend::cpu::CpuBackend;
use anetrain::checkpoint::native;
use anetrain::config::ModelConfig;
use anetrain::data::{TokenData, synthetic_tokens};
use anetrain::ops::{GemmImpl, Par};
use anetrain::telemetry::Telemetry;
use anetrain::train::adamw::AdamWConfig;
use anetrain::train::loss_scale::LossScaleMode;
use anetrain::train::{CheckpointPolicy, TrainOptions, Trainer};

fn cfg() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        vocab_size: 64,
        qk_norm: true,
        tied_embeddings: false,
        ..ModelConfig::preset("stories260k").unwrap()
    }
}

fn opts() -> TrainOptions {
    TrainOptions {
        steps: 20,
        batch: 2,
        seq: 16,
        accum: 2,
        schedule_lr: 3e-3,
        min_lr: 3e-4,
        warmup: 3,
        adamw: AdamWConfig::default(),
        grad_clip: 0.5,
        loss_scale: LossScaleMode::Dynamic,
        eval_every: 0,
        eval_tokens: 0,
        seed: 42,
        lora: None,
        base_bf16: false,
        exact_accum: true,
    }
}

fn trainer(cfg: &ModelConfig) -> Trainer {
    trainer_with(cfg, opts())
}

fn trainer_with(cfg: &ModelConfig, opts: TrainOptions) -> Trainer {
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    Trainer::new(cfg, opts, par, Box::new(CpuBackend::new(cfg, 2, 16, par))).unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn resume_is_bit_exact() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let cfg = cfg();
    let data = TokenData::from_vec(synthetic_tokens(64, 20_000, 3), 64, "synthetic").unwrap();
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-resume-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    pool.install(|| {
        // One uninterrupted run of 20 updates, checkpointing every 5 (keeping 2).
        let mut whole = trainer(&cfg);
        let policy = CheckpointPolicy { dir: dir.join("whole"), every: 5, keep_last: 2 };
        let all = whole.run(&data, &mut Telemetry::none(), Some(&policy), |_| {}).unwrap().losses;
        let mut kept: Vec<String> = std::fs::read_dir(dir.join("whole"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept, ["latest", "loss.png", "step-00000015", "step-00000020"]);

        // 10 updates, a checkpoint, a fresh process-equivalent trainer, 10 more.
        let mut first = trainer(&cfg);
        let mut losses: Vec<f64> = (0..10).map(|s| first.step(&data, s).unwrap().loss).collect();
        native::save(&dir.join("split"), &first, 10, &data, 0).unwrap();
        drop(first);
        let mut second = trainer(&cfg);
        let ckpt = native::load(&dir.join("split")).unwrap();
        assert_eq!(ckpt.step, 10);
        ckpt.restore(&mut second, &data).unwrap();
        losses.extend(second.run(&data, &mut Telemetry::none(), None, |_| {}).unwrap().losses);

        assert_eq!(
            losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
            all.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
        );
        assert!(bits(&second.params) == bits(&whole.params), "final weights differ");
        assert!(bits(&second.opt.m) == bits(&whole.opt.m) && bits(&second.opt.v) == bits(&whole.opt.v));

        // The final checkpoint of the whole run holds exactly its final state.
        let last = native::load(&dir.join("whole")).unwrap();
        assert_eq!(last.step, 20);
        assert!(bits(&last.params) == bits(&whole.params));
    });

    // Refusals name what differs.
    let other_cfg = ModelConfig { ffn_dim: 100, ..cfg.clone() };
    let err = format!(
        "{:#}",
        native::load(&dir.join("split")).unwrap().restore(&mut trainer(&other_cfg), &data).unwrap_err()
    );
    assert!(err.contains("model config differs"), "{err}");
    let other_data = TokenData::from_vec(synthetic_tokens(64, 20_000, 4), 64, "other.bin").unwrap();
    let err = format!(
        "{:#}",
        native::load(&dir.join("split")).unwrap().restore(&mut trainer(&cfg), &other_data).unwrap_err()
    );
    assert!(err.contains("other.bin") && err.contains("synthetic"), "{err}");
    // The same ids from another tokenizer (headed token files) are refused too.
    let ids = synthetic_tokens(64, 20_000, 3);
    let (a, b) = (dir.join("a.tok"), dir.join("b.tok"));
    TokenData::write(&a, &ids, 64, "bpe:one").unwrap();
    TokenData::write(&b, &ids, 64, "bpe:two").unwrap();
    let (da, db) = (TokenData::open(&a, 64, None).unwrap(), TokenData::open(&b, 64, None).unwrap());
    let mut first = trainer(&cfg);
    first.step(&da, 0).unwrap();
    native::save(&dir.join("tok"), &first, 1, &da, 0).unwrap();
    let err = format!("{:#}", native::load(&dir.join("tok")).unwrap().restore(&mut trainer(&cfg), &db).unwrap_err());
    assert!(err.contains("tokenizer bpe:one") && err.contains("bpe:two"), "{err}");
    // A truncated weights file is refused by name.
    let model_file = dir.join("split/step-00000010/model.safetensors");
    let bytes = std::fs::read(&model_file).unwrap();
    std::fs::write(&model_file, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", native::load(&dir.join("split")).err().unwrap());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn best_checkpoint_follows_the_lowest_validation_loss() {
    let cfg = cfg();
    let data = TokenData::from_vec(synthetic_tokens(64, 20_000, 3), 64, "synthetic").unwrap();
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-best-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    let mut t = trainer_with(&cfg, TrainOptions { eval_every: 4, eval_tokens: 64, ..opts() });
    t.val_data = Some(TokenData::from_vec(synthetic_tokens(64, 500, 9), 64, "val").unwrap());
    let mut val = Vec::new();
    let policy = CheckpointPolicy { dir: dir.clone(), every: 0, keep_last: 1 };
    t.run(&data, &mut Telemetry::none(), Some(&policy), |ev| {
        if let Some(v) = ev.val_loss {
            val.push((ev.step, v));
        }
    })
    .unwrap();
    assert_eq!(val.iter().map(|v| v.0).collect::<Vec<_>>(), [4, 8, 12, 16, 20]);
    let (best_step, best_loss) = val.iter().cloned().fold((0, f64::INFINITY), |b, v| if v.1 < b.1 { v } else { b });
    let best = native::load(&dir.join("best")).unwrap();
    assert_eq!(best.step, best_step);
    assert_eq!(best.state.best_val_loss.unwrap(), best_loss);
}

/// The same on the fp16 MIL simulator, whose backend keeps each layer's weights staged
/// between updates: the split run is still bit-identical to the whole one. (That a restore
/// restages is checked on its own below.)
#[test]
fn resume_is_bit_exact_on_mil_sim() {
    use anetrain::mil::backend::MilBackend;
    use anetrain::mil::emit::InputLayout;
    use anetrain::mil::sim::SimRunner;
    let cfg = cfg();
    let data = TokenData::from_vec(synthetic_tokens(64, 20_000, 3), 64, "synthetic").unwrap();
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-resume-sim-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let sim = || {
        let opts = TrainOptions { steps: 12, ..opts() };
        let backend = MilBackend::new(&cfg, 2, 16, InputLayout::Separate, Box::new(SimRunner::new(par))).unwrap();
        Trainer::new(&cfg, opts, par, Box::new(backend)).unwrap()
    };
    let mut whole = sim();
    let all: Vec<f64> = (0..12).map(|s| whole.step(&data, s).unwrap().loss).collect();
    let mut first = sim();
    let mut losses: Vec<f64> = (0..6).map(|s| first.step(&data, s).unwrap().loss).collect();
    native::save(&dir, &first, 6, &data, 0).unwrap();
    // Restore into the trainer that wrote the checkpoint, too: both must continue alike.
    native::load(&dir).unwrap().restore(&mut first, &data).unwrap();
    let mut second = sim();
    native::load(&dir).unwrap().restore(&mut second, &data).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for s in 6..12 {
        a.push(first.step(&data, s).unwrap().loss);
        b.push(second.step(&data, s).unwrap().loss);
    }
    assert_eq!(a, b, "a restored trainer and a continued one differ");
    losses.extend(b);
    assert_eq!(bits_f64(&losses), bits_f64(&all));
    assert!(bits(&second.params) == bits(&whole.params), "final weights differ");
}

fn bits_f64(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// A restore must bump the weights version even when it loads the very weights the
/// backend's slots already hold (same buffer, same values: the probe cannot tell), or an
/// accelerator would keep whatever it staged. Counted as input writes of a simulated device
/// with separate weight inputs: after a restore, the next update restages the forward
/// kernels' weights too.
#[test]
fn restore_restages_weights_on_mil_backends() {
    use anetrain::mil::backend::MilBackend;
    use anetrain::mil::emit::InputLayout;
    use anetrain::mil::sim::SimRunner;
    use anetrain::mil::{KernelProgram, KernelRunner};
    use half::f16;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Counting(SimRunner, Arc<AtomicUsize>);
    impl KernelRunner for Counting {
        fn name(&self) -> &'static str {
            "mil-sim"
        }
        fn load(&mut self, p: &KernelProgram, slots: usize) -> anyhow::Result<usize> {
            self.0.load(p, slots)
        }
        fn write_input(&mut self, k: usize, s: usize, i: usize, f: &mut dyn FnMut(&mut [f16])) -> anyhow::Result<()> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.write_input(k, s, i, f)
        }
        fn eval(&mut self, k: usize, s: usize) -> anyhow::Result<()> {
            self.0.eval(k, s)
        }
        fn read_output(&mut self, k: usize, o: usize, f: &mut dyn FnMut(&[f16])) -> anyhow::Result<()> {
            self.0.read_output(k, o, f)
        }
        fn compiles(&self) -> usize {
            self.0.compiles()
        }
        fn unload(&mut self, k: usize) -> anyhow::Result<()> {
            self.0.unload(k)
        }
    }
    let cfg = cfg();
    let data = TokenData::from_vec(synthetic_tokens(64, 20_000, 3), 64, "synthetic").unwrap();
    let tmp_dir = tempfile::Builder::new().prefix("anetrain-restage-").tempdir().unwrap();
    let dir = tmp_dir.path().to_path_buf();
    let par = Par { threads: 2, gemm: GemmImpl::Gemm };
    let writes_in_next_update = |restore: bool| -> usize {
        let count = Arc::new(AtomicUsize::new(0));
        let runner = Counting(SimRunner::new(par), count.clone());
        let backend = MilBackend::new(&cfg, 2, 16, InputLayout::Separate, Box::new(runner)).unwrap();
        let mut trainer = Trainer::new(&cfg, TrainOptions { steps: 12, ..opts() }, par, Box::new(backend)).unwrap();
        for s in 0..4 {
            trainer.step(&data, s).unwrap();
        }
        trainer.validate(&data).unwrap(); // stages the forward kernels at the current version
        if restore {
            native::save(&dir, &trainer, 4, &data, 0).unwrap();
            native::load(&dir).unwrap().restore(&mut trainer, &data).unwrap();
        }
        let before = count.load(Ordering::Relaxed);
        trainer.step(&data, 4).unwrap();
        count.load(Ordering::Relaxed) - before
    };
    let (plain, restored) = (writes_in_next_update(false), writes_in_next_update(true));
    assert!(restored > plain, "a restore must restage: {restored} input writes vs {plain} without a restore");
}

/// A LoRA run: the checkpoint holds the adapters (as a PEFT adapter directory) and their AdamW
/// moments, not the frozen base; resuming continues bit for bit; mismatches are refused.
#[test]
fn lora_resume_is_bit_exact() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let cfg = cfg();
    let data = TokenData::from_vec(synthetic_tokens(64, 20_000, 3), 64, "synthetic").unwrap();
    let dir = std::env::temp_dir().join(format!("anetrain-lora-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let lora = |rank| anetrain::lora::LoraConfig {
        rank,
        alpha: 8.0,
        targets: anetrain::lora::Target::parse_list("q,v,o,down").unwrap(),
    };
    let lora_opts = |rank| TrainOptions { steps: 12, lora: Some(lora(rank)), ..opts() };
    pool.install(|| {
        let mut whole = trainer_with(&cfg, lora_opts(4));
        let base = whole.params.clone();
        let all = whole.run(&data, &mut Telemetry::none(), None, |_| {}).unwrap().losses;
        assert!(whole.params == base, "the frozen base changed");
        assert!(whole.grads.is_empty() && whole.opt.m.len() == whole.lora.as_ref().unwrap().adapters.len());

        let mut first = trainer_with(&cfg, lora_opts(4));
        let mut losses: Vec<f64> = (0..6).map(|s| first.step(&data, s).unwrap().loss).collect();
        let step_dir = native::save(&dir, &first, 6, &data, 0).unwrap();
        assert!(step_dir.join("adapter_config.json").is_file() && step_dir.join("adapter_model.safetensors").is_file());
        assert!(!step_dir.join("model.safetensors").exists(), "the frozen base is not saved");
        drop(first);
        let mut second = trainer_with(&cfg, lora_opts(4));
        native::load(&dir).unwrap().restore(&mut second, &data).unwrap();
        losses.extend(second.run(&data, &mut Telemetry::none(), None, |_| {}).unwrap().losses);
        assert_eq!(bits_of(&losses), bits_of(&all));
        let (a, b) = (second.lora.as_ref().unwrap(), whole.lora.as_ref().unwrap());
        assert!(bits(&a.adapters) == bits(&b.adapters), "final adapters differ");
        assert!(bits(&second.opt.m) == bits(&whole.opt.m) && bits(&second.opt.v) == bits(&whole.opt.v));

        // Another rank, a full fine-tuning run, or another base: refused, naming why.
        let err = format!(
            "{:#}",
            native::load(&dir).unwrap().restore(&mut trainer_with(&cfg, lora_opts(2)), &data).unwrap_err()
        );
        assert!(err.contains("LoRA adapters are"), "{err}");
        let err = format!("{:#}", native::load(&dir).unwrap().restore(&mut trainer(&cfg), &data).unwrap_err());
        assert!(err.contains("add --lora-rank"), "{err}");
        let mut other_base = trainer_with(&cfg, TrainOptions { seed: 7, ..lora_opts(4) });
        let err = format!("{:#}", native::load(&dir).unwrap().restore(&mut other_base, &data).unwrap_err());
        assert!(err.contains("another base model"), "{err}");
        // Loading it as a model says what it is.
        let err = format!("{:#}", anetrain::checkpoint::load_model(&dir).unwrap_err());
        assert!(err.contains("LoRA adapters only"), "{err}");
    });
    std::fs::remove_dir_all(&dir).ok();
}

/// `--base-dtype bf16`: the same bit-exact resume; a checkpoint of one base dtype is refused
/// by a run of the other.
#[test]
fn lora_resume_with_a_bf16_base_is_bit_exact() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let cfg = cfg();
    let data = TokenData::from_vec(synthetic_tokens(64, 20_000, 3), 64, "synthetic").unwrap();
    let dir = std::env::temp_dir().join(format!("anetrain-lora-bf16-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let lora = anetrain::lora::LoraConfig { rank: 4, alpha: 8.0, targets: anetrain::lora::Target::ALL.to_vec() };
    let opts = |bf16| TrainOptions { steps: 8, lora: Some(lora.clone()), base_bf16: bf16, ..opts() };
    pool.install(|| {
        let mut whole = trainer_with(&cfg, opts(true));
        let all = whole.run(&data, &mut Telemetry::none(), None, |_| {}).unwrap().losses;
        let mut first = trainer_with(&cfg, opts(true));
        let mut losses: Vec<f64> = (0..4).map(|s| first.step(&data, s).unwrap().loss).collect();
        native::save(&dir, &first, 4, &data, 0).unwrap();
        drop(first);
        let mut second = trainer_with(&cfg, opts(true));
        native::load(&dir).unwrap().restore(&mut second, &data).unwrap();
        losses.extend(second.run(&data, &mut Telemetry::none(), None, |_| {}).unwrap().losses);
        assert_eq!(bits_of(&losses), bits_of(&all));
        let (a, b) = (second.lora.as_ref().unwrap(), whole.lora.as_ref().unwrap());
        assert!(bits(&a.adapters) == bits(&b.adapters), "final adapters differ");
        let err = format!(
            "{:#}",
            native::load(&dir).unwrap().restore(&mut trainer_with(&cfg, opts(false)), &data).unwrap_err()
        );
        assert!(err.contains("its base was held in bf16, this run's in f32 (--base-dtype bf16)"), "{err}");
    });
    std::fs::remove_dir_all(&dir).ok();
}

fn bits_of(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}
