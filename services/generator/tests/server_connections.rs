//! `--max-connection-age-secs`: a client connection gets a GOAWAY once it is that old, the
//! stream in flight on it still runs to its end, the server then closes the connection, and the
//! client's next call opens a new one (which is when a gRPC client resolves the Service again
//! and finds replicas added since). Connections are counted by a TCP relay between the two.

mod server_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use server_support::*;
use synopsis_proto::v1::generator_client::GeneratorClient;
use tonic::transport::Endpoint;

#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    closed: AtomicUsize,
}

/// Relays every connection made to the returned address to `target`, counting them.
async fn relay(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Counts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            c.opened.fetch_add(1, Ordering::SeqCst);
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_connections_get_a_goaway_after_their_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck");
    write_tiny_checkpoint(&ckpt, "ck-1", 1, serde_json::Value::Null);
    let server = TestServer::start(&[
        "--model",
        ckpt.to_str().unwrap(),
        "--max-connection-age-secs",
        "1",
    ])
    .await;
    server
        .wait_for_info("the model", |i| !i.live_checkpoint_id.is_empty())
        .await;
    let (addr, counts) = relay(server.addr).await;

    // Tiny HTTP/2 windows and a reader that pauses between messages: the stream is still open
    // on the server when the connection comes of age.
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(256)
        .initial_connection_window_size(256)
        .connect()
        .await
        .expect("connect");
    let mut client = GeneratorClient::new(channel);
    let mut stream = client
        .generate(request("Once upon a time", 40))
        .await
        .expect("accepted")
        .into_inner();
    let mut finished = false;
    let mut messages = 0;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                messages += 1;
                if matches!(
                    m.event,
                    Some(synopsis_proto::v1::generate_response::Event::Finished(_))
                ) {
                    finished = true;
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            Ok(None) => break,
            Err(status) => panic!("the stream was cut after {messages} messages: {status}"),
        }
    }
    assert!(finished, "the stream in flight ran to its end");
    assert_eq!(counts.opened.load(Ordering::SeqCst), 1);

    // With its stream done, the aged connection is closed by the server, unasked.
    within(async {
        while counts.closed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server closes a connection past its age");

    // The same channel carries on over a new connection.
    let ok = generate(&mut client, request("Again", 4))
        .await
        .expect("a call after the GOAWAY");
    assert_eq!(ok.finished.len(), 1);
    assert_eq!(counts.opened.load(Ordering::SeqCst), 2);
}
