//! anetrain: train Llama-family decoder transformers with hand-written forward and backward
//! passes, on the CPU everywhere (and, later, on the Apple Neural Engine through generated MIL
//! programs). See docs/ARCHITECTURE.md for the map of the crate.

pub mod ane;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod data;
pub mod eval;
pub mod generate;
pub mod memory;
pub mod mil;
pub mod model;
pub mod ops;
pub mod params;
pub mod prepare;
pub mod reference;
pub mod rng;
pub mod signals;
pub mod telemetry;
pub mod tokenizer;
pub mod train;
