//! Chat: templates (`template`), chat and instruction training data (`data`), multi-turn
//! conversations over one KV cache (`session`).

pub mod data;
pub mod session;
pub mod template;
