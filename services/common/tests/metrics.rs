//! The metrics side door answers plain HTTP/1.1 scrapes and liveness probes.

use std::time::Duration;

use prometheus::{IntCounter, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One HTTP/1.1 GET over a fresh connection; returns the whole raw response.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("response arrives")
    .expect("read");
    response
}

#[tokio::test]
async fn serves_registered_metrics_and_healthz_until_shutdown() {
    let registry = Registry::new();
    let counter = IntCounter::new("synopsis_test_requests_total", "Requests seen.").unwrap();
    registry.register(Box::new(counter.clone())).unwrap();
    counter.inc_by(7);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(synopsis_common::serve_metrics(
        listener,
        registry,
        async move {
            let _ = stopped.await;
        },
    ));

    let metrics = get(addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
    assert!(
        metrics.contains("# TYPE synopsis_test_requests_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("synopsis_test_requests_total 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("process_resident_memory_bytes "),
        "{metrics}"
    );

    let health = get(addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok"), "{health}");

    let missing = get(addr, "/nope").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops after shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn spawn_metrics_serves_and_refuses_a_taken_port() {
    let registry = Registry::new();
    // Bind a free port, release it, then let spawn_metrics take it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let handle = synopsis_common::spawn_metrics(addr, registry.clone()).unwrap();
    let health = get(addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let err = synopsis_common::spawn_metrics(addr, registry).unwrap_err();
    assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
    handle.abort();
}

#[tokio::test]
async fn readyz_follows_the_readiness_function_and_healthz_does_not() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let flag = Arc::new(AtomicBool::new(false));
    let ready: synopsis_common::Readiness = {
        let flag = Arc::clone(&flag);
        Arc::new(move || flag.load(Ordering::SeqCst))
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(synopsis_common::serve_metrics_with_readiness(
        listener,
        Registry::new(),
        ready,
        std::future::pending(),
    ));

    let not_ready = get(addr, "/readyz").await;
    assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    flag.store(true, Ordering::SeqCst);
    let ready = get(addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.ends_with("ready"), "{ready}");
    server.abort();
}
