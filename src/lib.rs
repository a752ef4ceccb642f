//! anetrain: train Llama-family decoder transformers with hand-written forward and backward
//! passes, on the CPU everywhere, and through generated MIL programs in an fp16 simulator or on
//! the Apple Neural Engine (that runtime is compiled and unit-tested but has not yet run on
//! Apple hardware). See docs/ARCHITECTURE.md for the map of the crate.

pub mod ane;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod data;
pub mod eval;
pub mod fsio;
pub mod generate;
pub mod hash;
pub mod memory;
pub mod mil;
pub mod model;
pub mod ops;
pub mod params;
pub mod prepare;
pub mod reference;
pub mod rng;
#[cfg(test)]
#[path = "../tests/common/shared_data.rs"]
mod shared_data;
pub mod signals;
pub mod sysstat;
pub mod telemetry;
pub mod tokenizer;
pub mod train;
