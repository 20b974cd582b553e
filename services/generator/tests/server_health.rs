//! Readiness and shutdown as a load balancer sees them: NOT_SERVING until a model is live,
//! SERVING after, NOT_SERVING while draining, the listener closes and connections get a GOAWAY
//! as the drain starts, streams in flight finish, then `serve` returns.

mod server_support;

use server_support::*;
use synopsis_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_until_a_model_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&["--load-root", dir.path().to_str().unwrap()]).await;
    assert_eq!(server.health("").await, ServingStatus::NotServing);
    assert_eq!(
        server.health("synopsis.v1.Generator").await,
        ServingStatus::NotServing
    );
    let info = server.model_info().await;
    assert_eq!(info.state, pb::ServingState::Waiting as i32);
    assert_eq!(info.device, "cpu");

    let mut client = server.client().await;
    let status = client
        .generate(request("Hello", 4))
        .await
        .expect_err("no model");
    assert_eq!(status.code(), Code::Unavailable);

    let ckpt = dir.path().join("ck");
    write_tiny_checkpoint(&ckpt, "ck-1", 1, serde_json::Value::Null);
    // The same checkpoint outside the load roots, or reached through `..`, is not loaded.
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("ck");
    write_tiny_checkpoint(&outside, "ck-out", 1, serde_json::Value::Null);
    let escaping = dir.path().join("..").join(
        elsewhere
            .path()
            .strip_prefix(dir.path().parent().unwrap())
            .unwrap_or(elsewhere.path()),
    );
    for path in [outside.clone(), escaping.join("ck")] {
        let refused = client
            .load_checkpoint(pb::LoadCheckpointRequest {
                source: Some(pb::load_checkpoint_request::Source::Path(
                    path.display().to_string(),
                )),
            })
            .await
            .expect_err("a path outside the load roots");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("--load-root"), "{refused:?}");
    }
    assert_eq!(server.health("").await, ServingStatus::NotServing);
    let loaded = client
        .load_checkpoint(pb::LoadCheckpointRequest {
            source: Some(pb::load_checkpoint_request::Source::Path(
                ckpt.display().to_string(),
            )),
        })
        .await
        .expect("load by path")
        .into_inner();
    assert_eq!(loaded.info.unwrap().checkpoint_id, "ck-1");
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert_eq!(
        server.health("synopsis.v1.Generator").await,
        ServingStatus::Serving
    );
    let info = server.model_info().await;
    assert_eq!(info.state, pb::ServingState::Serving as i32);
    assert_eq!(info.live_checkpoint_id, "ck-1");
    assert_eq!(info.n_positions, N_POSITIONS as u32);

    server.signal_shutdown();
    server.join().await.expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_goaway_at_once_and_lets_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck");
    write_tiny_checkpoint(&ckpt, "ck-1", 1, serde_json::Value::Null);
    let mut server = TestServer::start(&["--model", ckpt.to_str().unwrap()]).await;
    server
        .wait_for_info("the model", |i| !i.live_checkpoint_id.is_empty())
        .await;

    // A client with a tiny HTTP/2 window that reads only `started`: the server cannot push the
    // rest, so the stream is still open when the drain begins.
    let mut slow = server.slow_client().await;
    let mut req = request("Once upon a time", 100);
    req.n = 4;
    let mut stream = slow.generate(req).await.expect("accepted").into_inner();
    let first = stream
        .message()
        .await
        .expect("first message")
        .expect("started");
    assert!(matches!(
        first.event,
        Some(pb::generate_response::Event::Started(_))
    ));
    // A second client, connected before the drain, and a health Watch that will see it begin.
    let mut other = server.client().await;
    let channel = server.endpoint().connect().await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health Watch")
        .into_inner();
    let serving = health.message().await.expect("health answers");
    assert_eq!(serving.map(|h| h.status()), Some(ServingStatus::Serving));

    server.signal_shutdown();
    let next = within(health.message())
        .await
        .expect("a health change after the signal")
        .expect("the Watch stays up until the change is sent");
    assert_eq!(next.map(|h| h.status()), Some(ServingStatus::NotServing));
    drop(health);

    // The graceful shutdown started with the drain, while a stream is still in flight: the
    // listener is closed, so a client that reconnects (as one must after a GOAWAY) finds
    // another replica instead of this one...
    let addr = server.addr;
    within(async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the listener closes as soon as the drain starts");
    // ...and a new call on a channel connected before is refused: UNAVAILABLE (the code
    // clients retry elsewhere) from the closed port, or CANCELLED when the call crossed the
    // GOAWAY on the wire, tonic's report of a call the server never processed.
    let status = other
        .generate(request("Hello", 4))
        .await
        .expect_err("draining");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Cancelled),
        "{status:?}"
    );

    // The stream in flight still runs to its end.
    let rest = collect(stream).await;
    assert!(rest.error.is_none(), "{:?}", rest.error);
    assert_eq!(rest.finished.len(), 4);
    server.join().await.expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_outlives_the_drain_grace_does_not_keep_the_server_up() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck");
    write_tiny_checkpoint(&ckpt, "ck-1", 1, serde_json::Value::Null);
    let mut server =
        TestServer::start(&["--model", ckpt.to_str().unwrap(), "--drain-grace-secs", "1"]).await;
    server
        .wait_for_info("the model", |i| !i.live_checkpoint_id.is_empty())
        .await;

    // A reader that never reads past `started` cannot finish its stream.
    let mut stalled = server.slow_client().await;
    let mut req = request("Once upon a time", 100);
    req.n = 4;
    let mut stream = stalled.generate(req).await.expect("accepted").into_inner();
    stream
        .message()
        .await
        .expect("first message")
        .expect("started");

    server.signal_shutdown();
    server.join().await.expect("serve returns after the grace");
    let rest = collect(stream).await;
    assert!(rest.finished.len() < 4, "the stalled stream was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_plain_hugging_face_directory_and_reports_metrics() {
    // A Hugging Face GPT-2 directory: no manifest.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck");
    write_tiny_checkpoint(&ckpt, "ignored", 1, serde_json::Value::Null);
    let plain = dir.path().join("plain-gpt2");
    std::fs::create_dir(&plain).unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(ckpt.join(file), plain.join(file)).unwrap();
    }

    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let metrics_flag = metrics_addr.to_string();
    let server = TestServer::start(&[
        "--model",
        plain.to_str().unwrap(),
        "--metrics-listen",
        &metrics_flag,
    ])
    .await;
    let info = server
        .wait_for_info("the model", |i| !i.live_checkpoint_id.is_empty())
        .await;
    assert!(
        info.live_checkpoint_id.starts_with("plain-gpt2@"),
        "{}",
        info.live_checkpoint_id
    );

    let mut client = server.client().await;
    let ok = generate(&mut client, request("Hello", 4))
        .await
        .expect("generate");
    assert!(ok.error.is_none(), "{:?}", ok.error);
    let bad = client.generate(request("Hello", 100_000)).await;
    assert_eq!(bad.expect_err("too long").code(), Code::InvalidArgument);

    let text = http_get(metrics_addr, "/metrics").await;
    assert!(
        text.contains("synopsis_generator_requests_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("synopsis_generator_requests_total{outcome=\"invalid_argument\"} 1"),
        "{text}"
    );
    assert!(text.contains("synopsis_generator_swaps_total 1"), "{text}");
    assert!(
        text.contains("synopsis_generator_tokens_generated_total"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_only_health_is_open() {
    let server = TestServer::start(&["--auth-token", "s3cret"]).await;
    assert_eq!(server.health("").await, ServingStatus::NotServing);
    let mut client = server.client().await;
    let status = client
        .model_info(pb::ModelInfoRequest {})
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::ModelInfoRequest {});
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    client.model_info(req).await.expect("with the token");
}

/// A bare HTTP/1.1 GET, enough for the metrics endpoint.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut body = String::new();
    socket.read_to_string(&mut body).await.unwrap();
    body
}
