//! The standard gRPC services both servers carry: health (for probes and clients waiting on
//! readiness) and reflection (so grpcurl and similar tools work without the .proto files).

use anyhow::Context;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_reflection::server::{v1, v1alpha};

/// The health service and its reporter, with the overall status (service `""`) set to
/// NOT_SERVING: a server reports SERVING itself once it is ready
/// (`reporter.set_service_status("", ServingStatus::Serving).await`), and NOT_SERVING again
/// while it drains.
pub async fn health_service() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, server) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    (reporter, server)
}

/// The services every server lists besides its own.
pub const STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Both servers' types live in one descriptor set; naming the services keeps each server's
/// listing to what it serves (a client driven by reflection would otherwise call the other
/// server's service and get UNIMPLEMENTED).
fn reflection_builder(own: &str) -> tonic_reflection::server::Builder<'static> {
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(synopsis_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(own);
    STANDARD_SERVICES
        .iter()
        .fold(builder, |b, name| b.with_service_name(*name))
}

/// gRPC reflection (`grpc.reflection.v1`) listing `own` (e.g. `synopsis.v1.Trainer`), health
/// and reflection.
pub fn reflection_service(
    own: &str,
) -> anyhow::Result<v1::ServerReflectionServer<impl v1::ServerReflection>> {
    reflection_builder(own)
        .build_v1()
        .context("cannot build the reflection service")
}

/// The same reflection under `grpc.reflection.v1alpha`, which older grpcurl releases and
/// other tools still ask for; serve both.
pub fn reflection_service_v1alpha(
    own: &str,
) -> anyhow::Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>> {
    reflection_builder(own)
        .build_v1alpha()
        .context("cannot build the v1alpha reflection service")
}
