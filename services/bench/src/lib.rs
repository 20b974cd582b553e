//! Benchmarks of the product against the pipelines it replaces, measured side by side in one
//! run on the same torch (the machine is shared, so only ratios from one run are comparable).
//! `bench-train` times the trainer's training step, `bench-generate` the generator's engine and
//! gRPC server; the Python references live in `scripts/bench/`.

pub mod generate;
pub mod machine;
pub mod reference;
pub mod report;
pub mod server;
pub mod train;

/// Libtorch threads on both sides: the benchmark machine has two cores.
pub const DEFAULT_THREADS: i32 = 2;

/// The shared data directory beside the repository (`/work/shared/data` on the build machine).
pub const DEFAULT_DATA_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data");
