//! `bench-train`: the trainer's step against the original project's pipeline and a lean loop.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    synopsis_bench::train::run(&synopsis_bench::train::Args::parse())
}
