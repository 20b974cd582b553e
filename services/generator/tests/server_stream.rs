//! What a client of Generate sees: `started`, then tokens, then `finished` per sequence; text
//! that is always valid UTF-8 (a Japanese prompt on a random model produces split characters);
//! the seed echoed and reproducible; deadlines honoured.

mod server_support;

use std::time::Duration;

use server_support::*;
use synopsis_proto::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_japanese_prompt_streams_in_order_and_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck");
    write_tiny_checkpoint(&ckpt, "ck-jp", 1, serde_json::Value::Null);
    let server = TestServer::start(&["--model", ckpt.to_str().unwrap()]).await;
    server
        .wait_for_info("the model", |i| !i.live_checkpoint_id.is_empty())
        .await;
    let mut client = server.client().await;

    let mut req = request("東京の高校生が巨大ロボットに乗る。", 40);
    req.n = 2;
    req.sampling.as_mut().unwrap().seed = None;
    let first = generate(&mut client, req.clone()).await.expect("generate");
    assert!(first.error.is_none(), "{:?}", first.error);
    let started = first.started.clone().expect("started");
    assert_eq!(started.checkpoint_id, "ck-jp");
    assert_eq!(started.request_id.len(), 32);
    assert!(started.request_id.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(started.prompt_tokens > 0);
    assert_eq!(started.model_input, "東京の高校生が巨大ロボットに乗る。");

    // started first, finished last for each sequence, nothing after the last finished.
    assert!(first.order.starts_with('s'));
    assert_eq!(first.order.matches('s').count(), 1);
    assert_eq!(first.finished.len(), 2);
    assert!(first.order.ends_with('f'));
    for index in 0..2u32 {
        let text: String = first
            .tokens
            .iter()
            .filter(|t| t.index == index)
            .map(|t| t.text.as_str())
            .collect();
        let fin = first
            .finished
            .iter()
            .find(|f| f.index == index)
            .expect("finished");
        assert_eq!(
            text, fin.text,
            "tokens of sequence {index} add up to its text"
        );
        assert!(fin.generated_tokens > 0);
        assert!(fin.reason != pb::FinishReason::Unspecified as i32);
    }

    // The random seed is echoed; sending it back gives the same text.
    let mut again = req.clone();
    again.sampling.as_mut().unwrap().seed = Some(started.seed);
    let second = generate(&mut client, again).await.expect("generate");
    let texts = |c: &Collected| {
        let mut t: Vec<_> = c
            .finished
            .iter()
            .map(|f| (f.index, f.text.clone()))
            .collect();
        t.sort();
        t
    };
    assert_eq!(second.started.as_ref().unwrap().seed, started.seed);
    assert_eq!(texts(&first), texts(&second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_ends_the_stream_with_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck");
    write_tiny_checkpoint(&ckpt, "ck-dl", 1, serde_json::Value::Null);
    let server = TestServer::start(&["--model", ckpt.to_str().unwrap()]).await;
    server
        .wait_for_info("the model", |i| !i.live_checkpoint_id.is_empty())
        .await;

    // A reader with a tiny HTTP/2 window that waits past its deadline before reading: the
    // stream cannot complete in time whatever the speed of the machine.
    let mut slow = server.slow_client().await;
    let mut req = request("A long story", 120);
    req.n = 8;
    let mut req = tonic::Request::new(req);
    req.set_timeout(Duration::from_secs(2));
    let sent = tokio::time::Instant::now();
    let stream = slow.generate(req).await.expect("accepted").into_inner();
    tokio::time::sleep_until(sent + Duration::from_secs(3)).await;
    let c = collect(stream).await;
    let status = c.error.expect("the stream must end with an error");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(c.finished.len() < 8);

    // The server is fine afterwards.
    let mut client = server.client().await;
    let ok = generate(&mut client, request("Again", 4))
        .await
        .expect("generate");
    assert!(ok.error.is_none(), "{:?}", ok.error);
    assert_eq!(ok.finished.len(), 1);
}
