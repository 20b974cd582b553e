//! TLS and mutual TLS on a real tonic server, with certificates made by the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use synopsis_common::{health_service, ClientSecurityArgs, SecurityArgs};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::pb::health_check_response::ServingStatus as Reported;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;

/// A CA plus a server certificate for `localhost` and a client certificate, as PEM files.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("generator");
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server.key", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client.key", client_key),
        _dir: dir,
    }
}

/// Serves a SERVING health service with `args`' TLS until the returned sender is dropped.
async fn start(args: &SecurityArgs) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let tls = args.server_tls().unwrap().expect("TLS configured");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = health_service().await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(health);
    tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

/// Health check through `client`'s endpoint for `url`; any failure becomes `Err`.
async fn check(client: &ClientSecurityArgs, url: &str) -> anyhow::Result<i32> {
    let call = async {
        let channel = client.endpoint(url)?.connect().await?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(response.into_inner().status)
    };
    tokio::time::timeout(Duration::from_secs(30), call).await?
}

fn trusting(ca: &Path) -> ClientSecurityArgs {
    ClientSecurityArgs {
        upstream_tls_ca: Some(ca.to_owned()),
        // The server certificate names localhost; we dial the IP to avoid IPv6 surprises.
        upstream_tls_domain: Some("localhost".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_client_trusting_the_ca_connects_plaintext_does_not() {
    let pki = make_pki();
    let server = SecurityArgs {
        tls_cert: Some(pki.server_cert.clone()),
        tls_key: Some(pki.server_key.clone()),
        ..Default::default()
    };
    let (addr, _stop) = start(&server).await;

    let status = check(&trusting(&pki.ca), &format!("https://{addr}"))
        .await
        .unwrap();
    assert_eq!(status, Reported::Serving as i32);

    let plain = check(&ClientSecurityArgs::default(), &format!("http://{addr}")).await;
    assert!(plain.is_err(), "plaintext reached a TLS server: {plain:?}");

    // A CA that did not sign the server certificate is not trusted.
    let other = make_pki();
    let wrong_ca = check(&trusting(&other.ca), &format!("https://{addr}")).await;
    assert!(
        wrong_ca.is_err(),
        "untrusted certificate accepted: {wrong_ca:?}"
    );
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate() {
    let pki = make_pki();
    let server = SecurityArgs {
        tls_cert: Some(pki.server_cert.clone()),
        tls_key: Some(pki.server_key.clone()),
        tls_client_ca: Some(pki.ca.clone()),
        ..Default::default()
    };
    let (addr, _stop) = start(&server).await;
    let url = format!("https://{addr}");

    let anonymous = check(&trusting(&pki.ca), &url).await;
    assert!(
        anonymous.is_err(),
        "client without certificate got in: {anonymous:?}"
    );

    let identified = ClientSecurityArgs {
        upstream_tls_cert: Some(pki.client_cert.clone()),
        upstream_tls_key: Some(pki.client_key.clone()),
        ..trusting(&pki.ca)
    };
    assert_eq!(
        check(&identified, &url).await.unwrap(),
        Reported::Serving as i32
    );
}

#[test]
fn bad_tls_settings_fail_early_naming_the_file() {
    let pki = make_pki();
    assert!(SecurityArgs::default().server_tls().unwrap().is_none());

    let no_key = SecurityArgs {
        tls_cert: Some(pki.server_cert.clone()),
        ..Default::default()
    };
    assert!(no_key.server_tls().is_err());

    let missing = SecurityArgs {
        tls_cert: Some(pki._dir.path().join("nowhere.pem")),
        tls_key: Some(pki.server_key.clone()),
        ..Default::default()
    };
    let err = format!("{:#}", missing.server_tls().unwrap_err());
    assert!(err.contains("nowhere.pem"), "{err}");

    // A certificate where the key should be.
    let swapped = SecurityArgs {
        tls_cert: Some(pki.server_cert.clone()),
        tls_key: Some(pki.server_cert.clone()),
        ..Default::default()
    };
    let err = format!("{:#}", swapped.server_tls().unwrap_err());
    assert!(err.contains("server.pem"), "{err}");

    let ca_alone = SecurityArgs {
        tls_client_ca: Some(pki.ca.clone()),
        ..Default::default()
    };
    assert!(ca_alone.server_tls().is_err());

    // TLS options on an http:// upstream would silently be ignored by tonic: refuse them.
    assert!(trusting(&pki.ca).endpoint("http://127.0.0.1:1").is_err());
    assert!(ClientSecurityArgs::default()
        .endpoint("https://127.0.0.1:1")
        .is_err());
}
