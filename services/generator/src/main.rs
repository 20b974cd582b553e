//! `synopsis-generator`: parse flags, start logging, bind, serve until SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use synopsis_generator::{serve, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    synopsis_common::init_tracing(config.log_json);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    serve(config, listener, synopsis_common::shutdown_signal()).await
}
