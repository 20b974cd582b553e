//! synopsis-generator: serves synopses from GPT-2 checkpoints over gRPC, token by token, and
//! hot-swaps new checkpoints (from `--model`, `--watch-dir` or a followed `--trainer`) without
//! interrupting the streams in flight.

pub mod conditioning;
pub mod config;
pub mod engine;
pub mod error;
pub mod load_checks;
pub mod metrics;
pub mod service;
pub mod sources;
pub mod state;
pub mod swap;
pub mod validation;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use synopsis_model::WeightDtype;
use synopsis_proto::v1::generator_server::GeneratorServer;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{error, info, warn};

pub use config::Config;

use crate::engine::{spawn_engine, EngineConfig};
use crate::metrics::Metrics;
use crate::service::GeneratorService;
use crate::sources::trainer::TrainerLink;
use crate::state::{State, StateParts};

/// How long the gRPC server may take to close its connections once the drain is over.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves the generator on `listener` until `shutdown` resolves, then drains: health turns
/// NOT_SERVING, every connection gets a GOAWAY and the listener closes, new requests get
/// UNAVAILABLE, streams in flight get `--drain-grace-secs` to finish, and the function returns.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let device = synopsis_model::parse_device(&config.device).context("--device")?;
    let dtype = WeightDtype::resolve(&config.dtype, device).context("--dtype")?;
    let tls = config.security.server_tls()?;
    let token = config.security.auth_token()?;
    let addr = listener.local_addr().context("listener address")?;
    config.security.warn_if_exposed(addr);

    let metrics = Arc::new(Metrics::new().context("metrics registry")?);
    let max_batch = config
        .max_batch
        .unwrap_or_else(|| config::default_max_batch(device))
        .max(1);
    let engine = spawn_engine(EngineConfig {
        device,
        max_batch,
        max_queue: config.queue.max(1),
        max_resident: config.max_resident.max(1),
        sampling_on_device: config.sampling.on_device(device),
        metrics: metrics.engine.clone(),
    })?;

    // Kept alive until serve returns: the default cache is removed with it.
    let (cache_dir, _cache_guard) = cache_dir(config.cache_dir.clone())?;
    let trainer = match &config.trainer {
        Some(url) => Some(Arc::new(TrainerLink::new(
            url,
            &config.trainer_security,
            cache_dir.clone(),
        )?)),
        None => None,
    };
    let load_roots = load_roots(&config, &cache_dir);
    let (health, health_service) = synopsis_common::health_service().await;
    let state = Arc::new(State::new(StateParts {
        engine: engine.clone(),
        metrics,
        limits: config.limits(),
        device,
        dtype,
        cache_dir,
        load_roots,
        trainer: trainer.clone(),
        cache_budget: swap::CacheBudget {
            max_batch,
            max_memory: config.max_cache_memory,
        },
        health,
    }));
    state.refresh_health().await;
    if let Some(metrics_addr) = config.metrics_listen {
        // `/readyz` means what gRPC health means: a model is live and the server not draining.
        let ready: synopsis_common::Readiness = {
            let state = Arc::clone(&state);
            Arc::new(move || !state.is_draining() && state.engine.live().is_some())
        };
        synopsis_common::spawn_metrics_with_readiness(
            metrics_addr,
            state.metrics.registry.clone(),
            ready,
        )?;
    }

    let mut sources = Vec::new();
    if let Some(dir) = config.model.clone() {
        // Loaded before the server listens: a --model that cannot be served ends the process
        // with the reason (a generator left running with no model only answers UNAVAILABLE).
        let source = format!("model:{}", dir.display());
        if let Err(e) = swap::install_dir(&state, &dir, &source, true).await {
            error!(dir = %dir.display(), error = %e, "cannot serve --model");
            return Err(anyhow::anyhow!(
                "cannot serve --model {}: {e}",
                dir.display()
            ));
        }
    }
    if let Some(root) = config.watch_dir.clone() {
        let interval = Duration::from_millis(config.watch_interval_ms.max(10));
        sources.push(tokio::spawn(sources::watch_dir::watch(
            Arc::clone(&state),
            root,
            interval,
        )));
    }
    if let Some(link) = trainer {
        sources.push(tokio::spawn(sources::trainer::follow(
            Arc::clone(&state),
            link,
        )));
    }

    // The drain starts the server's graceful shutdown at once: every connection gets a GOAWAY,
    // so clients stop sending here and reconnect (to another replica) while the streams in
    // flight run to their end; the listener closes, so reconnecting finds another address.
    let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
    let (drained_tx, drained_rx) = tokio::sync::watch::channel(false);
    let drain = {
        let state = Arc::clone(&state);
        let grace = Duration::from_secs(config.drain_grace_secs);
        tokio::spawn(async move {
            shutdown.await;
            state.begin_drain().await;
            draining_tx.send_replace(true);
            drain(&state, grace).await;
            drained_tx.send_replace(true);
        })
    };

    let mut builder = tonic::transport::Server::builder();
    if config.max_connection_age_secs > 0 {
        // No max_connection_age_grace: in tonic 0.14 setting it replaces the GOAWAY at the age
        // with a hard close at age + grace, which would cut streams in flight. A stream is
        // bounded by --max-new-tokens-cap anyway, so the graceful close always ends.
        builder = builder.max_connection_age(Duration::from_secs(config.max_connection_age_secs));
    }
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    let router = builder
        .layer(synopsis_common::auth_layer(token))
        .add_service(health_service)
        .add_service(synopsis_common::reflection_service(
            "synopsis.v1.Generator",
        )?)
        .add_service(synopsis_common::reflection_service_v1alpha(
            "synopsis.v1.Generator",
        )?)
        .add_service(GeneratorServer::new(GeneratorService::new(Arc::clone(
            &state,
        ))));
    info!(%addr, device = %synopsis_model::device_name(device), "generator listening");

    let mut draining = draining_rx;
    let server =
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = draining.wait_for(|d| *d).await;
        });
    let mut forced = drained_rx;
    let result = tokio::select! {
        r = server => r.context("gRPC server failed"),
        _ = async {
            let _ = forced.wait_for(|d| *d).await;
            tokio::time::sleep(CLOSE_GRACE).await;
        } => {
            warn!("connections still open after the drain; exiting anyway");
            Ok(())
        }
    };
    drain.abort();
    for task in sources {
        task.abort();
    }
    engine.shutdown();
    info!("generator stopped");
    result
}

/// With new work refused, waits up to `grace` for open streams; the rest are ended.
async fn drain(state: &Arc<State>, grace: Duration) {
    let open = state.open_streams();
    info!(
        open_streams = open,
        grace_secs = grace.as_secs(),
        "draining"
    );
    if tokio::time::timeout(grace, state.streams_finished())
        .await
        .is_err()
    {
        warn!(
            open_streams = state.open_streams(),
            "drain grace over; ending the streams still open"
        );
        state.stop_streams();
        let _ = tokio::time::timeout(CLOSE_GRACE, state.streams_finished()).await;
    }
    state.engine.shutdown();
}

/// The download cache: `--cache-dir`, or a fresh temporary directory removed on exit.
/// The directories LoadCheckpoint may load from, canonical so that `..` and symlinks in a
/// request cannot step out of them: every `--load-root`, the watch directory and the cache.
fn load_roots(config: &Config, cache_dir: &std::path::Path) -> Vec<PathBuf> {
    let mut dirs = config.load_roots.clone();
    dirs.extend(config.watch_dir.clone());
    dirs.push(cache_dir.to_path_buf());
    dirs.into_iter()
        .filter_map(|dir| match std::fs::canonicalize(&dir) {
            Ok(root) => Some(root),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "load root unusable; ignored");
                None
            }
        })
        .collect()
}

fn cache_dir(flag: Option<PathBuf>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match flag {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create --cache-dir {}", dir.display()))?;
            Ok((dir, None))
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("synopsis-generator-cache-")
                .tempdir()
                .context("cannot create a cache directory under the system temp dir")?;
            Ok((tmp.path().to_path_buf(), Some(tmp)))
        }
    }
}
