//! SIGTERM while the generator streams: health turns NOT_SERVING, new requests are refused
//! with UNAVAILABLE, the streams in flight run to their end within the grace period, and the
//! process exits 0.

mod e2e;

use std::time::Duration;

use e2e::{Generator, LONG};
use synopsis_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const STREAMS: usize = 8;
const TOKENS: u32 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_in_flight_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = e2e::trained_model(dir.path()).await;
    let generator = Generator::start(&[
        "--model".into(),
        model.display().to_string(),
        "--drain-grace-secs".into(),
        "60".into(),
    ])
    .await;
    let client = generator.client().await;

    // Readers that take their time, so the streams are still open when the signal comes.
    let (first_token_tx, mut first_token_rx) = tokio::sync::mpsc::channel(STREAMS);
    let mut readers = Vec::new();
    for i in 0..STREAMS {
        let mut client = client.clone();
        let first_token = first_token_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut request = e2e::generate_request(TOKENS);
            request.sampling = Some(pb::SamplingParams {
                temperature: 1.0,
                seed: Some(i as u64),
                ..Default::default()
            });
            let mut stream = client.generate(request).await?.into_inner();
            let mut finished = None;
            let mut tokens = 0;
            while let Some(response) = stream.message().await? {
                match response.event {
                    Some(pb::generate_response::Event::Token(_)) => {
                        tokens += 1;
                        if tokens == 1 {
                            let _ = first_token.send(()).await;
                        }
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                    Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
                    _ => {}
                }
            }
            Ok::<_, tonic::Status>((tokens, finished))
        }));
    }
    for _ in 0..STREAMS {
        first_token_rx.recv().await.expect("every stream started");
    }

    // Watched from before the signal: the server pushes the change, so it is seen even when
    // the drain is over within milliseconds (the streams' last tokens may already sit in the
    // transport's buffers) and a fresh health check would find the port closed.
    let mut health = HealthClient::new(e2e::channel(&generator.url()).await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health Watch")
        .into_inner();
    let first = health.message().await.expect("health answers");
    assert_eq!(first.map(|h| h.status()), Some(ServingStatus::Serving));

    generator.process.sigterm();
    let next = tokio::time::timeout(LONG, health.message())
        .await
        .expect("a health change after SIGTERM")
        .expect("the Watch stream stays up until the change is sent");
    assert_eq!(next.map(|h| h.status()), Some(ServingStatus::NotServing));
    // A Watch never ends by itself: closing it lets the server's own shutdown finish at once.
    drop(health);
    // Refused by the draining server, or by its closed port once the GOAWAY has sent the client
    // away: UNAVAILABLE, a cue to retry elsewhere. A call that crossed the GOAWAY on the wire is
    // one the server never processed: tonic reports it as CANCELLED (grpc-go and grpcio retry
    // it transparently). (The draining server's own refusal is pinned down in-process by the
    // generator's `server_health` tests.)
    let refused = client.clone().generate(e2e::generate_request(4)).await;
    match refused {
        Err(status)
            if status.code() == tonic::Code::Unavailable
                || status.code() == tonic::Code::Cancelled => {}
        other => panic!(
            "generate while draining: expected UNAVAILABLE or CANCELLED, got {:?}",
            other.map(|_| ())
        ),
    }
    let info = client.clone().model_info(pb::ModelInfoRequest {}).await;
    if let Ok(info) = info {
        assert_eq!(info.into_inner().state, pb::ServingState::Draining as i32);
    }

    for reader in readers {
        let (tokens, finished) = reader.await.unwrap().expect("stream in flight completes");
        let finished = finished.expect("finished event");
        assert!(
            finished.reason == pb::FinishReason::Length as i32
                || finished.reason == pb::FinishReason::Eos as i32,
            "{finished:?}"
        );
        assert_eq!(finished.generated_tokens as usize, tokens);
        if finished.reason == pb::FinishReason::Length as i32 {
            assert_eq!(tokens, TOKENS as usize);
        }
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = generator.process.wait_exit(LONG);
        (status, generator)
    })
    .await
    .unwrap();
    let (status, generator) = status;
    let status = status.expect("generator exits after draining");
    assert!(
        status.success(),
        "exit {status}: {}",
        generator.process.log_tail()
    );
}
