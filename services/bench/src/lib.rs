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
pub mod train_overhead;

/// Libtorch threads on both sides: the benchmark machine has two cores.
pub const DEFAULT_THREADS: i32 = 2;

/// The GPT-2 tokenizer the repository keeps as a test fixture (`tests/fixtures/gpt2_tokenizer`).
pub const DEFAULT_TOKENIZER_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/gpt2_tokenizer"
);
