//! Process-wide logging setup and the shutdown signal every server waits on.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber: level filter from `RUST_LOG` (default `info`),
/// human-readable lines or one JSON object per event when `json` is set (what log collectors
/// in a cluster want). Logs go to stderr so stdout stays free for anything a tool prints.
///
/// Calling it again is harmless: the first subscriber stays, later calls do nothing, which lets
/// tests and binaries share code paths that both initialise logging.
pub fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already set: that is the "second call" case.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Resolves when the process is asked to stop: SIGTERM (how Kubernetes and `docker stop` ask)
/// or Ctrl-C. Logs which one arrived, so a drain in the logs can be traced to its cause.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl-C, shutting down"),
        () = terminate => tracing::info!("received SIGTERM, shutting down"),
    }
}
