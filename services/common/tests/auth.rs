//! The auth layer guards every RPC of a real tonic server except health checks.

use std::net::SocketAddr;

use synopsis_common::{
    auth_layer, health_service, reflection_service, reflection_service_v1alpha, ClientSecurityArgs,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus as Reported;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const TOKEN: &str = "correct-horse-battery-staple";

struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(token: Option<&str>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = health_service().await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder()
        .layer(auth_layer(token.map(str::to_owned)))
        .add_service(health)
        .add_service(reflection_service("synopsis.v1.Trainer").unwrap())
        .add_service(reflection_service_v1alpha("synopsis.v1.Trainer").unwrap());
    tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async move {
            let _ = stopped.await;
        },
    ));
    TestServer {
        addr,
        stop: Some(stop),
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    ClientSecurityArgs::default()
        .endpoint(&format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn client_with(token: Option<&str>) -> ClientSecurityArgs {
    ClientSecurityArgs {
        upstream_token: token.map(str::to_owned),
        ..Default::default()
    }
}

/// Lists services through reflection, sending `token` if given.
async fn list_services(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let interceptor = client_with(token).interceptor().unwrap();
    let mut client = ServerReflectionClient::with_interceptor(channel(addr).await, interceptor);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = stream.message().await?.expect("one reflection response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

async fn health_check(addr: SocketAddr) -> Result<i32, tonic::Status> {
    let mut client = HealthClient::new(channel(addr).await);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status)
}

#[tokio::test]
async fn health_is_open_everything_else_needs_the_token() {
    let server = start(Some(TOKEN)).await;

    assert_eq!(
        health_check(server.addr).await.unwrap(),
        Reported::Serving as i32
    );

    let err = list_services(server.addr, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = list_services(server.addr, Some("wrong-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let services = list_services(server.addr, Some(TOKEN)).await.unwrap();
    for expected in [
        "synopsis.v1.Trainer",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(services.iter().any(|s| s == expected), "{services:?}");
    }
    // Only what this server serves: the generator's service lives in the same descriptor
    // set but a client calling it here would get UNIMPLEMENTED.
    assert!(
        !services.iter().any(|s| s == "synopsis.v1.Generator"),
        "{services:?}"
    );
}

#[tokio::test]
async fn no_token_configured_lets_everything_through() {
    let server = start(None).await;
    let services = list_services(server.addr, None).await.unwrap();
    assert!(
        services.iter().any(|s| s == "synopsis.v1.Trainer"),
        "{services:?}"
    );
}

#[tokio::test]
async fn health_starts_not_serving() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = health_service().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stopped.await;
            }),
    );
    assert_eq!(
        health_check(addr).await.unwrap(),
        Reported::NotServing as i32
    );
    let _ = stop.send(());
}

#[test]
fn token_sources_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let args = synopsis_common::SecurityArgs {
        auth_token_file: Some(file.clone()),
        ..Default::default()
    };
    assert_eq!(args.auth_token().unwrap().as_deref(), Some(TOKEN));

    let both = synopsis_common::SecurityArgs {
        auth_token: Some(TOKEN.into()),
        ..args.clone()
    };
    assert!(both.auth_token().is_err());

    let missing = synopsis_common::SecurityArgs {
        auth_token_file: Some(dir.path().join("absent")),
        ..Default::default()
    };
    let err = format!("{:#}", missing.auth_token().unwrap_err());
    assert!(err.contains("absent"), "{err}");

    std::fs::write(&file, "\n").unwrap();
    assert!(args.auth_token().is_err(), "an empty token file is refused");

    let bearer = client_with(Some(TOKEN)).bearer().unwrap().unwrap();
    assert_eq!(bearer.to_str().unwrap(), format!("Bearer {TOKEN}"));
    assert!(client_with(None).bearer().unwrap().is_none());
}
