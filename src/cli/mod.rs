//! Subcommand implementations of the `anetrain` binary (the argument structs live in
//! `main.rs`).

pub mod choices;
pub mod commands;
pub mod train;
