//! A tiny chat model written into a directory the way an HF model looks: config.json,
//! model.safetensors, tokenizer.json (a byte-level BPE with ChatML's special tokens) and
//! tokenizer_config.json (a ChatML chat template).

#![allow(dead_code)]

use anetrain::chat::template::{CHATML, ChatTemplate};
use anetrain::config::ModelConfig;
use anetrain::params::{ParamLayout, TensorKind};
use anetrain::rng::Rng;
use anetrain::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// A fresh temporary directory unique to this process and `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anetrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A random-weight model of width `dim` (2 layers, GQA 4/2) with a 320-entry tokenizer and
/// `max_seq_len` positions, written into `dir`. With `can_stop` false its classifier rows of
/// the stop tokens are zero, so their logits are 0 while the largest of the others is
/// positive: greedy replies never end on their own (tests of long replies rely on it).
pub fn write_tiny_chat_model(dir: &Path, dim: usize, max_seq_len: usize, seed: u64, can_stop: bool) -> ModelConfig {
    let tok =
        Tokenizer::train_bpe_with_specials(&anetrain::corpus::stories(1, 300), 320, &["<|im_start|>", "<|im_end|>"])
            .unwrap();
    let cfg = ModelConfig {
        name: "tiny-chat".into(),
        dim,
        ffn_dim: 2 * dim,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: dim / 4,
        vocab_size: tok.vocab_size(),
        max_seq_len,
        tied_embeddings: can_stop,
        ..ModelConfig::preset("stories260k").unwrap()
    };
    // Weights larger than init, so replies vary with the prompt.
    let layout = ParamLayout::new(&cfg);
    let mut rng = Rng::new(seed);
    let mut p = layout.init(seed);
    for t in &layout.tensors {
        for x in &mut p[t.range()] {
            *x = if t.kind == TensorKind::Norm { 1.0 } else { 0.15 * rng.normal() as f32 };
        }
    }
    if !can_stop {
        let classifier = layout.classifier();
        for t in ["<|im_end|>", "<|endoftext|>"] {
            let id = tok.token_to_id(t).unwrap() as usize;
            layout.view_mut(&mut p, classifier)[id * dim..(id + 1) * dim].fill(0.0);
        }
    }
    anetrain::checkpoint::hf::save(dir, &cfg, &p, anetrain::checkpoint::safetensors::Dtype::F32).unwrap();
    tok.save_to_dir(dir).unwrap();
    ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap().save_to_dir(dir).unwrap();
    cfg
}
