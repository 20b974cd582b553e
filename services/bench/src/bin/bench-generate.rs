//! `bench-generate`: the generator's engine and server against Hugging Face `generate()`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    synopsis_bench::generate::run(&synopsis_bench::generate::Args::parse()).await
}
