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

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(synopsis_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// gRPC reflection (`grpc.reflection.v1`) describing `synopsis.v1` and `grpc.health.v1`.
pub fn reflection_service() -> anyhow::Result<v1::ServerReflectionServer<impl v1::ServerReflection>>
{
    reflection_builder()
        .build_v1()
        .context("cannot build the reflection service")
}

/// The same reflection under `grpc.reflection.v1alpha`, which older grpcurl releases and
/// other tools still ask for; serve both.
pub fn reflection_service_v1alpha(
) -> anyhow::Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>> {
    reflection_builder()
        .build_v1alpha()
        .context("cannot build the v1alpha reflection service")
}
