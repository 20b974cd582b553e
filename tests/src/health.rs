//! Asking a server whether it is ready, the way orchestrators do: `grpc.health.v1` Check.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The overall status (service `""`) reported by the server at `endpoint`; an error when it
/// cannot be reached within a few seconds or does not answer.
pub async fn health_status(endpoint: Endpoint) -> anyhow::Result<ServingStatus> {
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}
