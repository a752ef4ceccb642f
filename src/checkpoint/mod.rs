//! Model and checkpoint files: safetensors, HF model directories.

pub mod hf;
pub mod llama2c;
pub mod safetensors;
