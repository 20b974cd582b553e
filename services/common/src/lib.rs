//! What both gRPC servers share, so the trainer and the generator start, log, stop, expose
//! metrics and guard their sockets the same way: tracing setup, shutdown signals, the metrics
//! endpoint, TLS and bearer-token auth, health and reflection services.

mod auth;
mod grpc;
mod memory;
mod metrics;
mod security;
mod telemetry;
mod text;

pub use auth::{auth_layer, AuthLayer, AuthService, BearerInterceptor, HEALTH_PATH_PREFIX};
pub use grpc::{health_service, reflection_service, reflection_service_v1alpha, STANDARD_SERVICES};
pub use memory::{available_host_memory, human_bytes};
pub use metrics::{
    always_ready, rss_bytes, rss_bytes_of, serve_metrics, serve_metrics_with_readiness,
    spawn_metrics, spawn_metrics_with_readiness, Readiness,
};
pub use security::{ClientSecurityArgs, SecurityArgs};
pub use telemetry::{init_tracing, shutdown_signal};
pub use text::{
    bounded_message, bounded_status, escape_control, internal_message, quote, MAX_STATUS_CHARS,
    QUOTE_CHARS,
};
