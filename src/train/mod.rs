//! Training: AdamW, the learning-rate schedule, and the loop that ties model, data, optimizer
//! and telemetry together.

pub mod adamw;
pub mod loss_scale;
pub mod schedule;
pub mod trainer;

pub use adamw::AdamW;
pub use schedule::Schedule;
pub use trainer::{CheckpointPolicy, TrainOptions, TrainSummary, Trainer};
