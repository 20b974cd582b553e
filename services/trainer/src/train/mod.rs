//! Training: a request resolved into a [`plan::Plan`] (data, tokenizer, model, optimizer),
//! then the loop that runs it on the device thread and reports through a run's events.

pub mod batches;
pub mod hyper;
pub mod memory;
pub mod optimizer;
pub mod plan;
pub mod precheck;
pub mod schedule;
mod snapshot;
mod sources;
#[path = "loop.rs"]
mod train_loop;

use serde::{Deserialize, Serialize};

pub use hyper::Hyper;
pub use plan::{prepare, Env, Plan, ResolvedConfig};
pub use train_loop::{run, CheckpointEvery, Outcome, RunContext};

/// Where a run stands, saved with every checkpoint (in `optimizer.safetensors`) so a resumed
/// run picks up the schedule, the data order and the epoch's running loss where they were.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done (the schedule's position).
    pub step: u64,
    /// Epochs fully done.
    pub epoch: u32,
    /// Micro-batches of the current epoch already trained on. The data order of an epoch is
    /// a function of (seed, epoch), so this index is all it takes to continue mid-epoch.
    pub micro_in_epoch: u64,
    /// Token-weighted sum of the current epoch's step losses, and its token count.
    pub epoch_loss_sum: f64,
    pub epoch_tokens: u64,
    /// fp16 loss scaler (CUDA only; inert on CPU).
    pub scaler: Option<schedule::LossScaler>,
    /// Tokens per epoch of the run that wrote it: a resume on different data is reported.
    pub train_tokens: u64,
}

/// Seed of libtorch's RNG (dropout) for one optimizer step. Re-seeding every step makes the
/// dropout masks a function of (seed, step), so no RNG state has to be saved for resume.
pub fn step_seed(seed: u64, step: u64) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (z >> 1) as i64
}
