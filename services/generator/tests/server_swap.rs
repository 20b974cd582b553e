//! Hot swap as an operator sees it: a corrupt checkpoint is refused while the live one keeps
//! serving; a new checkpoint becomes live under load without failing a single stream; a
//! resident checkpoint can be made live again (rollback).

mod server_support;

use server_support::*;
use synopsis_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_refused_and_the_live_one_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(
        &root.path().join("step-1"),
        "run/step-1",
        1,
        serde_json::Value::Null,
    );
    let server = TestServer::start(&["--watch-dir", root.path().to_str().unwrap()]).await;
    server
        .wait_for_info("step-1 live", |i| i.live_checkpoint_id == "run/step-1")
        .await;

    // A newer checkpoint whose weights were damaged after the manifest was written.
    let bad = root.path().join("step-2");
    write_tiny_checkpoint(&bad, "run/step-2", 2, serde_json::Value::Null);
    flip_byte(&bad.join("model.safetensors"));

    let info = server
        .wait_for_info("step-2 refused", |i| {
            i.refused.iter().any(|r| r.checkpoint_id == "run/step-2")
        })
        .await;
    let refusal = info
        .refused
        .iter()
        .find(|r| r.checkpoint_id == "run/step-2")
        .unwrap();
    assert!(
        refusal.reason.contains("model.safetensors"),
        "{}",
        refusal.reason
    );
    assert_eq!(info.live_checkpoint_id, "run/step-1");
    assert!(info
        .resident
        .iter()
        .all(|r| r.info.as_ref().unwrap().checkpoint_id != "run/step-2"));

    let mut client = server.client().await;
    let ok = generate(&mut client, request("Still here", 8))
        .await
        .expect("generate");
    assert!(ok.error.is_none(), "{:?}", ok.error);
    assert_eq!(ok.started.unwrap().checkpoint_id, "run/step-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_fails_no_stream() {
    let root = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(
        &root.path().join("step-1"),
        "run/step-1",
        1,
        serde_json::Value::Null,
    );
    let server = TestServer::start(&["--watch-dir", root.path().to_str().unwrap()]).await;
    server
        .wait_for_info("step-1 live", |i| i.live_checkpoint_id == "run/step-1")
        .await;

    // 16 streams open on step-1, held open by readers with a tiny HTTP/2 window that read
    // nothing but `started` until the swap is done ...
    let mut streams = Vec::new();
    for i in 0..16u64 {
        let mut client = server.slow_client().await;
        let mut req = request("The city of", 100);
        req.sampling.as_mut().unwrap().seed = Some(i);
        let mut stream = client.generate(req).await.expect("accepted").into_inner();
        let first = stream
            .message()
            .await
            .expect("first message")
            .expect("started");
        let Some(pb::generate_response::Event::Started(started)) = first.event else {
            panic!("the first message must be `started`");
        };
        assert_eq!(started.checkpoint_id, "run/step-1");
        streams.push(stream);
    }
    // ... while step-2 appears and becomes live.
    write_tiny_checkpoint(
        &root.path().join("step-2"),
        "run/step-2",
        2,
        serde_json::Value::Null,
    );
    let info = server
        .wait_for_info("step-2 live", |i| i.live_checkpoint_id == "run/step-2")
        .await;
    assert!(info.refused.is_empty(), "{:?}", info.refused);

    for stream in streams {
        let c = within(collect(stream)).await.expect("stream ended");
        assert!(
            c.error.is_none(),
            "no stream may fail during a swap: {:?}",
            c.error
        );
        assert_eq!(c.finished.len(), 1);
        assert!(c.finished[0].generated_tokens > 0);
    }

    let mut client = server.client().await;
    let after = generate(&mut client, request("After the swap", 8))
        .await
        .expect("generate");
    assert!(after.error.is_none(), "{:?}", after.error);
    assert_eq!(after.started.unwrap().checkpoint_id, "run/step-2");

    // Roll back to the resident step-1 by id.
    let rolled = client
        .load_checkpoint(pb::LoadCheckpointRequest {
            source: Some(pb::load_checkpoint_request::Source::CheckpointId(
                "run/step-1".into(),
            )),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!(rolled.info.unwrap().checkpoint_id, "run/step-1");
    let back = generate(&mut client, request("Rolled back", 8))
        .await
        .expect("generate");
    assert_eq!(back.started.unwrap().checkpoint_id, "run/step-1");
    let info = server.model_info().await;
    assert_eq!(info.resident.len(), 2);
    assert!(info
        .resident
        .iter()
        .any(|r| r.live && r.info.as_ref().unwrap().checkpoint_id == "run/step-1"));
}
