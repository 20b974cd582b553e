//! The HTTP side door of each server: Prometheus metrics, a liveness probe (`/healthz`) and a
//! readiness probe (`/readyz`), kept off the gRPC port so scrapers and kubelets need neither
//! HTTP/2, TLS nor credentials. The kubelet's gRPC probes speak plaintext only, so where the
//! gRPC port serves TLS, `/readyz` is what keeps readiness meaning "able to answer".

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};

/// Name of the resident-memory gauge added to every scrape unless the registry has its own.
const RSS_METRIC: &str = "process_resident_memory_bytes";

/// Whether the server can take traffic now, asked on every `GET /readyz`.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// A readiness that is true whenever the process answers.
pub fn always_ready() -> Readiness {
    Arc::new(|| true)
}

#[derive(Clone)]
struct Endpoints {
    registry: Registry,
    ready: Readiness,
}

/// Serves `GET /metrics` (Prometheus text format of `registry`), `GET /healthz` (`200 ok`) and
/// `GET /readyz` (always `200 ready`) on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_metrics_with_readiness(listener, registry, always_ready(), shutdown).await
}

/// [`serve_metrics`] with `GET /readyz` answering `200 ready` while `ready()` holds and
/// `503 not ready` otherwise.
pub async fn serve_metrics_with_readiness(
    listener: tokio::net::TcpListener,
    registry: Registry,
    ready: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { registry, ready });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("metrics server failed")
}

/// Binds `addr` now (so a taken port is an error at startup, not a log line later) and serves
/// metrics on it in a background task for the life of the runtime. Must be called from
/// within a tokio runtime.
pub fn spawn_metrics(
    addr: SocketAddr,
    registry: Registry,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    spawn_metrics_with_readiness(addr, registry, always_ready())
}

/// [`spawn_metrics`] with `/readyz` following `ready`.
pub fn spawn_metrics_with_readiness(
    addr: SocketAddr,
    registry: Registry,
    ready: Readiness,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind metrics address {addr}"))?;
    std_listener
        .set_nonblocking(true)
        .context("cannot make the metrics socket non-blocking")?;
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .context("cannot register the metrics socket with tokio")?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "metrics listening");
    Ok(tokio::spawn(async move {
        let serving =
            serve_metrics_with_readiness(listener, registry, ready, std::future::pending());
        if let Err(err) = serving.await {
            tracing::error!(err = format!("{err:#}"), "metrics server stopped");
        }
    }))
}

async fn readyz(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    if (endpoints.ready)() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let mut families = endpoints.registry.gather();
    if !families.iter().any(|f| f.name() == RSS_METRIC) {
        families.extend(rss_family());
    }
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&families, &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("cannot encode metrics: {err}").into_bytes(),
        ),
    }
}

/// Resident memory measured at scrape time, so memory growth is visible without a process
/// collector (the `process` feature of `prometheus` is not enabled in this workspace).
fn rss_family() -> Vec<prometheus::proto::MetricFamily> {
    let Some(rss) = rss_bytes() else {
        return Vec::new();
    };
    let Ok(gauge) = prometheus::Gauge::new(RSS_METRIC, "Resident memory size in bytes.") else {
        return Vec::new();
    };
    gauge.set(rss as f64);
    let registry = Registry::new();
    if registry.register(Box::new(gauge)).is_err() {
        return Vec::new();
    }
    registry.gather()
}

/// Resident memory of this process in bytes (Linux only; `None` elsewhere or on a read error).
pub fn rss_bytes() -> Option<u64> {
    read_rss("/proc/self/status")
}

/// Resident memory of process `pid` in bytes (Linux only; `None` if it is gone or unreadable).
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    read_rss(&format!("/proc/{pid}/status"))
}

// `VmRSS` in /proc/<pid>/status is already in kB, which avoids asking the OS for its page size
// (statm counts pages, and pages are not 4 KiB everywhere).
fn read_rss(path: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_of_this_process_is_plausible() {
        let rss = rss_bytes().expect("linux exposes VmRSS");
        assert!(rss > 1 << 20, "a test binary uses more than 1 MiB: {rss}");
        assert_eq!(rss_bytes_of(u32::MAX), None);
    }
}
