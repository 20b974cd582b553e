//! Where checkpoints come from: a directory given at start (`--model`), a checkpoint root on a
//! shared volume (`--watch-dir`), or a trainer followed over gRPC (`--trainer`). Each hands
//! directories to the same swap pipeline.

pub mod cache;
pub mod download;
pub mod trainer;
pub mod watch_dir;
