//! Subcommand implementations of the `anetrain` binary (the argument structs live in
//! `main.rs`).

pub mod chat;
pub mod choices;
pub mod commands;
pub mod dashboard;
pub mod dashboard_ui;
pub mod plot;
pub mod restart;
pub mod serve;
pub mod train;
