//! `synopsis-trainer`: parse flags, set up logging, bind, serve until SIGTERM or Ctrl-C. A
//! running run writes a checkpoint before the process exits.

use anyhow::Context;
use clap::Parser;
use synopsis_trainer::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    synopsis_common::init_tracing(config.log_json);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    synopsis_trainer::serve(config, listener, synopsis_common::shutdown_signal()).await
}
